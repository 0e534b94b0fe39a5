"""Gradients: accumulate them per path and compare them with the reference tensor by tensor.

Comparison streams over parameters and keeps only running sums, so no case ever holds a
second copy of the model's gradient beyond its own accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

Params = Sequence[tuple[str, torch.nn.Parameter]]


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of(loss: torch.Tensor, params: Params, *, retain_graph: bool = True) -> list[torch.Tensor | None]:
    """d loss / d params without touching ``.grad`` (so paths never see each other's)."""
    return list(
        torch.autograd.grad(loss, [p for _, p in params], retain_graph=retain_graph, allow_unused=True)
    )


class GradAccumulator:
    """A running weighted sum of gradients, one float32 (or wider) tensor per parameter."""

    def __init__(self, params: Params):
        self.names = [n for n, _ in params]
        self.tensors: list[torch.Tensor | None] = [None] * len(params)

    def add(self, grads: Sequence[torch.Tensor | None], scale: float = 1.0) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.to(torch.promote_types(g.dtype, torch.float32)) * scale
            self.tensors[i] = g if self.tensors[i] is None else self.tensors[i].add_(g)

    def items(self) -> Iterable[tuple[str, torch.Tensor | None]]:
        return zip(self.names, self.tensors)


@dataclass(frozen=True, slots=True)
class GradDiff:
    rel_err: float  # ||g - r|| / ||r||
    cosine: float
    max_abs: float
    scale: float  # least-squares c in g ~ c r: 1.0 is right, k or 1/k names a scale bug
    worst_param: str  # the tensor with the largest relative error
    worst_rel_err: float
    nonfinite_param: str | None = None  # first tensor holding NaN or Inf
    # (name, relative error) per tensor in model order: floats only, never gradient copies,
    # so a report can keep them for its worst cases and show where a divergence lives
    per_tensor: tuple[tuple[str, float], ...] = ()


def compare_grads(reference: dict[str, torch.Tensor], grads: Iterable[tuple[str, torch.Tensor | None]]) -> GradDiff:
    diff2 = ref2 = got2 = dot = 0.0
    max_abs = worst_rel = 0.0
    worst = ""
    nonfinite = None
    per_tensor = []
    for name, g in grads:
        r = reference[name].to(torch.float64)
        g = torch.zeros_like(r) if g is None else g.to(device=r.device, dtype=torch.float64)
        if nonfinite is None and not bool(torch.isfinite(g).all()):
            nonfinite = name
        d = g - r
        d2, r2 = float(d.square().sum()), float(r.square().sum())
        diff2, ref2 = diff2 + d2, ref2 + r2
        got2, dot = got2 + float(g.square().sum()), dot + float((g * r).sum())
        max_abs = max(max_abs, float(d.abs().max())) if d.numel() else max_abs
        rel = math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)
        per_tensor.append((name, rel))
        if not rel <= worst_rel:  # also takes NaN
            worst, worst_rel = name, rel
    return GradDiff(
        rel_err=math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf),
        cosine=dot / math.sqrt(got2 * ref2) if got2 > 0 and ref2 > 0 else float("nan"),
        max_abs=max_abs,
        scale=dot / ref2 if ref2 > 0 else float("nan"),
        worst_param=worst,
        worst_rel_err=worst_rel,
        nonfinite_param=nonfinite,
        per_tensor=tuple(per_tensor),
    )
