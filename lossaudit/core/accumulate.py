"""Gradient sums over one layout's microbatches, filled straight from the backward.

A hook on each trainable parameter takes its gradient the moment the backward has produced
it, adds it (times a scale) into every sum that wants this backward, takes its dot products
with the reference gradient (and, where asked, with the microbatch's correct gradient), and
frees it. So no gradient of the whole model is held beside the sums, unless a path with a loss
of its own needs the correct one to measure its weight (``keep``).

A sum holds the model's dtype when that is 16-bit (what a training loop's ``.grad`` holds
there: an 8B model's float32 sum would be 30 GiB) and float32 or wider otherwise. The dot
products are float32 or wider whatever the sums hold, so what is read from them (each
microbatch's weight, a path's projection on the reference and so its scale) does not see the
sums' rounding.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .grads import Params, dot, total

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def sum_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """What a gradient sum holds for parameters of ``param_dtype``."""
    return param_dtype if param_dtype in SIXTEEN_BIT else torch.promote_types(param_dtype, torch.float32)


class GradientSum:
    """sum over microbatches of scale x gradient, one tensor per parameter (None until one
    arrives), held as ``unit`` x tensors, ``unit`` the first scale added: a gradient added at
    that scale in the sum's dtype is taken as it is, without a copy."""

    def __init__(self, params: Params):
        self.names = [n for n, _ in params]
        self.tensors: list[torch.Tensor | None] = [None] * len(params)
        self.dtype = sum_dtype(params[0][1].dtype) if params else torch.float32
        self.unit: float | None = None

    def add(self, i: int, grad: torch.Tensor, scale: float, *, adopt: bool = False) -> bool:
        """Add scale x grad; ``adopt``: the sum may keep ``grad`` itself. Whether it did."""
        if self.unit is None:
            self.unit = scale if scale and math.isfinite(scale) else 1.0
        relative = scale / self.unit
        if self.tensors[i] is not None:
            self.tensors[i].add_(grad, alpha=relative)  # in place, no temporary
            return False
        if adopt and relative == 1.0 and grad.dtype == self.dtype:
            self.tensors[i] = grad
            return True
        self.tensors[i] = grad.to(self.dtype) * relative  # a copy
        return False

    def items(self) -> Iterable[tuple[str, torch.Tensor | None]]:
        """(name, tensor): the sum is ``unit`` x these."""
        return zip(self.names, self.tensors)

    @property
    def narrow(self) -> bool:
        """Holds fewer bits than float32: its own rounding is then above the dot products'."""
        return self.dtype in SIXTEEN_BIT


class Backward:
    """One backward's products: for each parameter the dot of its gradient with the reference
    (and with the kept correct gradient), read after the backward with one synchronisation."""

    def __init__(self, sinks: Sequence[tuple[GradientSum, float]], kept: list | None, against: list | None):
        self.sinks, self.against = sinks, against
        self.kept: list[torch.Tensor | None] | None = kept  # filled with each gradient, where asked
        self.reference_terms: list[torch.Tensor] = []
        self.against_terms: list[torch.Tensor] = []

    def results(self) -> tuple[float, float | None]:
        """(gradient . reference, gradient . kept correct gradient or None)."""
        return total(self.reference_terms), (total(self.against_terms) if self.against is not None else None)


class Hooks:
    """Post-accumulate-grad hooks on ``params`` for one layout (a context manager): each
    ``backward`` routes the gradients it produces into the sums it is given."""

    def __init__(self, params: Params, reference: Sequence[torch.Tensor]):
        self.params = [p for _, p in params]
        self.reference = list(reference)
        self.current: Backward | None = None
        self.handles = []

    def __enter__(self) -> "Hooks":
        for i, p in enumerate(self.params):
            p.grad = None
            self.handles.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self._take(i, p)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for p in self.params:
            p.grad = None

    def _take(self, i: int, p: torch.Tensor) -> None:
        g, b = p.grad, self.current
        p.grad = None  # freed here unless a sum or the kept copy holds it
        if b is None:
            return
        b.reference_terms.append(dot(g, self.reference[i]))
        if b.against is not None and b.against[i] is not None:
            b.against_terms.append(dot(g, b.against[i]))
        free = b.kept is None  # a kept gradient is read again: no sum may add into it
        for acc, scale in b.sinks:
            free = not acc.add(i, g, scale, adopt=free) and free
        if b.kept is not None:
            b.kept[i] = g

    def backward(self, loss: torch.Tensor, sinks: Sequence[tuple[GradientSum, float]], keep: bool = False,
                 against: list | None = None, last: bool = False) -> Backward:
        """d loss / d params into ``sinks`` (sum += scale x gradient each). ``keep``: also return
        the gradient itself (``Backward.kept``); ``against``: a kept gradient to take dots with.
        ``last``: no other backward goes through this graph, so it frees what the forward saved
        as it goes (as a training step's backward does), not after it."""
        b = Backward(sinks, [None] * len(self.params) if keep else None, against)
        self.current = b
        try:
            torch.autograd.backward(loss, inputs=self.params, retain_graph=not last)
        finally:
            self.current = None
        return b
