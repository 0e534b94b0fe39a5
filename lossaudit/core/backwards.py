"""Each backward's projection on the reference, taken inside a step lossaudit does not run.

A user's step (``--step``, a Trainer, a Lightning module) calls ``backward`` itself. A hook on
each trainable parameter sees the gradient that one backward brings to the parameter before it
is added into ``.grad`` and takes its dot product with the reference gradient (float32 or wider,
no host synchronisation); a callback queued at the first hook of a backward runs when that
backward ends and closes it. So a step that runs one backward per microbatch leaves one
projection per microbatch, from which the judge reads each microbatch's weight as it does on a
logit path (judge.py): the projection over the correct share of that microbatch.

What this cannot resolve, and says so (``Backwards.unresolved``):

- a step that runs one backward over all its microbatches (or more than one per microbatch):
  the number of backwards is not the number of microbatches;
- a step that changes ``.grad`` outside its backwards (zeroes it between microbatches, divides
  it afterwards): the projections then do not add up to the gradient the step leaves.

Which microbatch a backward belongs to: the order in which the model's forwards saw the
microbatches' ``input_ids`` (a step that visits them out of order is followed), else their order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .grads import Params, dot, dots, total

# |sum of the backwards' projections / the projection of what .grad holds - 1| above this: the
# step changed .grad outside its backwards. A 16-bit .grad rounds each addition: that moves the
# ratio by ~1e-5 on a tiny model; a uniform rescale worth a finding is 1e-3 and more.
ADDS_UP = 1e-3


class Backwards:
    """A context manager around a user's step: per-backward projections on ``reference``."""

    def __init__(self, model: torch.nn.Module, params: Params, reference: Sequence[torch.Tensor],
                 inputs: Sequence[torch.Tensor] = ()):
        self.model, self.params, self.reference = model, [p for _, p in params], list(reference)
        self.keys = {_key(x): i for i, x in enumerate(inputs)}  # a microbatch's input_ids -> its index
        self.forwards: list[int | None] = []  # microbatch index of each forward (None: not one of ours)
        self.terms: list[list[torch.Tensor]] = []  # per backward, the products of its gradients
        self._open = False
        self._handles: list = []

    def __enter__(self) -> "Backwards":
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(lambda g, i=i: self._take(i, g)))
        self._handles.append(self.model.register_forward_pre_hook(self._forward, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.forwards.append(self.keys.get(_key(ids)) if isinstance(ids, torch.Tensor) else None)

    def _take(self, i: int, grad: torch.Tensor) -> None:
        if not self._open:
            self._open = True
            self.terms.append([])
            torch.autograd.Variable._execution_engine.queue_callback(self._close)
        self.terms[-1].append(self._term(i, grad))

    def _term(self, i: int, grad: torch.Tensor):
        return dot(grad, self.reference[i])

    def _close(self) -> None:
        self._open = False

    def projections(self) -> list[float]:
        """Each backward's gradient . the reference, in the order the backwards ran."""
        return [total(t) for t in self.terms]

    def order(self, k: int) -> list[int]:
        """The microbatch of each backward: the forwards' order when they saw each of the k
        microbatches once, else 0..k-1."""
        seen = [f for f in self.forwards if f is not None]
        return seen if sorted(seen) == list(range(k)) else list(range(k))

    def resolve(self, k: int, gradient: Sequence[torch.Tensor | None]) -> tuple[list[float] | None, str]:
        """(each microbatch's projection on the reference, in microbatch order, or None; why
        not). ``gradient``: what the step left in ``.grad``, parameter by parameter."""
        projections = self.projections()
        if len(projections) != k:
            what = "one backward over all" if len(projections) == 1 else f"{len(projections)} backwards over"
            return None, (f"per-microbatch weights not resolved: the step ran {what} {k} microbatches "
                          "(one backward per microbatch is what can be cut)")
        left = dots(list(gradient), self.reference)
        summed = sum(projections)
        if not summed or abs(left / summed - 1.0) > ADDS_UP:
            return None, (f"per-microbatch weights not resolved: the step changed .grad outside its backwards "
                          f"(its backwards add up to {summed / left if left else float('nan'):.4g}x what .grad holds)")
        by_microbatch = [0.0] * k
        for index, projection in zip(self.order(k), projections):
            by_microbatch[index] = projection
        return by_microbatch, ""


class KeptBackwards(Backwards):
    """Each backward's gradients kept, parameter by parameter (``gradients()``), for a step whose
    reference is known only after it ran (a GRPO run: which sequences each microbatch held is
    TRL's shuffle). Costs one copy of the gradient per backward: for the tiny models lossaudit
    builds, not for a large checkpoint."""

    def __init__(self, model: torch.nn.Module, params: Params):
        super().__init__(model, params, [])
        self.names = [n for n, _ in params]

    def _term(self, i: int, grad: torch.Tensor):
        return (i, grad.detach().clone())

    def gradients(self) -> list[dict[str, torch.Tensor]]:
        """Each backward's gradient (name -> tensor; a parameter no backward reached is absent),
        in the order the backwards ran."""
        return [{self.names[i]: g for i, g in terms} for terms in self.terms]


def _key(x) -> tuple | None:
    """A tensor's identity as a forward sees it: storage, offset and shape (the same tensor
    passed on, or a view of it, without a copy)."""
    if not isinstance(x, torch.Tensor):
        return None
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape))
