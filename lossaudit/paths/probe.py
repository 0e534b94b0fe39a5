"""Reads the update an optimizer applies, exactly, and puts the weights back, without copying
the weights or moving anything off the model's device.

Where the optimizer is plain SGD (torch's ``SGD``, every param group lr 1 and nothing else:
``plain_sgd``, read from its param_groups at each step), the update it would apply is exactly
-grad: just before it steps, each parameter's gradient is taken as the update and ``.grad``
set to None, so the step changes nothing. No tensor is allocated and the weights are never
touched: the update is the very gradient a training step holds (what a step path holds is a
training step's peak, no parameter-sized tensor beyond it).

Otherwise (momentum, weight decay, Adam, a scheduler's lr, a subclass): just before the optimizer steps, each trainable parameter's tensor is parked and replaced by
zeros, so SGD(lr=1) leaves exactly -grad in the fresh tensor: no rounding of ``w - g`` in the
model's dtype blurs the comparison (``params_before - params_after`` would round by
ulp(param)). Afterwards the parked tensors become the parameters again (the very tensors, so
the weights come back bit for bit) and the stepped tensors, negated in place, are the update.

What that costs: one tensor of zeros per parameter, allocated at the optimizer step (when the
step's activations are gone), which becomes the update the judge reads; no copy of the weights
before the step, no copy of the update after it, no host transfer and no host synchronisation.
Nothing else may hold a parameter's tensor (``p.data``) across the step: the optimizer holds
the Parameter objects, which stay the same.
"""

from __future__ import annotations

import torch

from ..core.grads import trainable


PLAIN_SGD = {"lr": 1.0, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False}


def plain_sgd(optimizer: torch.optim.Optimizer, params) -> bool:
    """Whether ``optimizer`` applies exactly -grad to every one of ``params`` (``(name,
    parameter)`` pairs): torch's own SGD (not a subclass), every param group set as
    ``PLAIN_SGD`` (a key missing is not plain), every parameter in a group, and every gradient
    dense (a sparse one is added into zeros densely)."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    held = set()
    for group in optimizer.param_groups:
        for key, value in PLAIN_SGD.items():
            if key not in group or (float(group[key]) if key == "lr" else group[key]) != value:
                return False
        held |= {id(p) for p in group["params"]}
    return all(id(p) in held and (p.grad is None or p.grad.layout == torch.strided) for _, p in params)


class UpdateProbe:
    def __init__(self, model: torch.nn.Module):
        self.params = trainable(model)
        self.steps = 0
        self.took_grad = False  # the last step's update is its gradient (plain SGD), not a step from zeros
        self._parked: list[torch.Tensor] | None = None  # the weights, set aside while the optimizer steps
        self._taken: list[torch.Tensor] | None = None  # the gradients taken as the update (plain SGD)
        self._update: list[tuple[str, torch.Tensor]] | None = None
        self._hooks: list = []

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        self._hooks.append(optimizer.register_step_pre_hook(self._before_step))

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.took_grad = self._parked is None and plain_sgd(optimizer, self.params)
        if self.took_grad:  # the update is -grad: take it, and the step (no gradients left) changes nothing
            self._taken = [torch.zeros_like(p) if p.grad is None else p.grad for _, p in self.params]
            for _, p in self.params:
                p.grad = None
            return
        self._taken = None
        with torch.no_grad():
            if self._parked is None:
                self._parked = [p.data for _, p in self.params]
                for _, p in self.params:
                    p.data = torch.zeros_like(p)
            else:  # a second step (a loop that steps too often): read only the last one, as SGD from 0
                for _, p in self.params:
                    p.zero_()

    def gradient(self) -> list[tuple[str, torch.Tensor | None]]:
        """The applied update as a gradient (update = -lr * grad, lr = 1), on the model's
        device; None everywhere if no step ran. The weights are back once this returns."""
        if self.steps == 0:
            return [(n, None) for n, _ in self.params]
        if self._update is None:
            if self._taken is not None:
                taken, self._taken = self._taken, None
                self.restore()
                self._update = list(zip((n for n, _ in self.params), taken))
                return list(self._update)
            stepped = [p.data for _, p in self.params]
            self.restore()
            self._update = [(n, u.neg_()) for (n, _), u in zip(self.params, stepped)]  # in place: no copy
        return list(self._update)

    def restore(self) -> None:
        """The parked weights back in the parameters (a no-op for those never parked), no
        gradients left, the optimizer unwatched."""
        with torch.no_grad():
            if self._parked is not None:
                for (_, p), w in zip(self.params, self._parked):
                    p.data = w
                self._parked = None
            for _, p in self.params:
                p.grad = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class StepUpdates(UpdateProbe):
    """Every optimizer step's update, each read as ``UpdateProbe`` reads one, with the weights put
    back right after each step: a loop of several steps (GRPO's generation batch) runs every step
    on the weights it started with, and ``updates`` holds one gradient per step, in order."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.updates: list[list[tuple[str, torch.Tensor]]] = []

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        super().watch(optimizer)
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._taken is not None:
            self.updates.append(list(zip((n for n, _ in self.params), self._taken)))
            self._taken = None
            return
        with torch.no_grad():
            stepped = [p.data for _, p in self.params]
            for (_, p), w in zip(self.params, self._parked):
                p.data = w
            self._parked = None
        self.updates.append([(n, u.neg_()) for (n, _), u in zip(self.params, stepped)])
