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


def dots(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Sum over parameters of a . b (float32 or wider), with one host synchronisation."""
    terms = [torch.dot(x.reshape(-1).to(_wide(x, y)), y.reshape(-1).to(device=x.device, dtype=_wide(x, y)))
             for x, y in zip(a, b) if x is not None and y is not None]
    return float(torch.stack([t.to(terms[0].device, torch.float64) for t in terms]).sum()) if terms else 0.0


def _wide(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)


class GradAccumulator:
    """A running weighted sum of gradients, one float32 (or wider) tensor per parameter."""

    def __init__(self, params: Params):
        self.names = [n for n, _ in params]
        self.tensors: list[torch.Tensor | None] = [None] * len(params)

    def add(self, grads: Sequence[torch.Tensor | None], scale: float = 1.0) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.tensors[i] is None:
                self.tensors[i] = g.to(torch.promote_types(g.dtype, torch.float32)) * scale  # a copy
            else:
                self.tensors[i].add_(g, alpha=scale)  # in place, no temporary

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


def _tensor_stats(g: torch.Tensor, r: torch.Tensor) -> list[float]:
    """||d||², ||r||², ||g||², d·r, g·r and max|d| for d = g - r, two flat tensors in their
    (float32 or wider) dtype: dot products read each tensor once and make no temporary but d.
    Where g ~ r, d is exact (Sterbenz), so what is small there is read from d (see _near)."""
    if not g.numel():
        return [0.0] * 6
    d = g - r
    low, high = torch.aminmax(d)  # max|d| without |d| (vector_norm(ord=inf) costs ~9x more on CPU)
    stats = torch.stack([torch.dot(d, d), torch.dot(r, r), torch.dot(g, g), torch.dot(d, r), torch.dot(g, r),
                         torch.maximum(-low, high)])
    return stats.tolist()


def _near(d2: float, r2: float, g2: float) -> bool:
    """|g - r| under half of |g| and of |r|: then cosine and scale are read from d, keeping the
    precision of 1 - cos and of scale - 1, which float32 sums of g·r and g·g would round away."""
    return d2 < 0.25 * min(r2, g2)


def _cosine(d2: float, r2: float, g2: float, dr: float, gr: float) -> float:
    if not (g2 > 0 and r2 > 0):
        return float("nan")
    g, r = math.sqrt(g2), math.sqrt(r2)
    if _near(d2, r2, g2):  # 1 - cos = (|d|² - (|g| - |r|)²) / (2|g||r|), |g|² - |r|² = d·(g+r) = |d|² + 2 d·r
        cos = 1.0 - (d2 - ((d2 + 2 * dr) / (g + r)) ** 2) / (2 * g * r)
    else:
        cos = gr / (g * r)
    return min(1.0, max(-1.0, cos)) if math.isfinite(cos) else float("nan")


def _scale(d2: float, r2: float, g2: float, dr: float, gr: float) -> float:
    """Least-squares c in g ~ c r: g·r / r·r, with g·r = r·r + d·r near r."""
    if not r2 > 0:
        return float("nan")
    return 1.0 + dr / r2 if _near(d2, r2, g2) else gr / r2


def compare_grads(reference: dict[str, torch.Tensor], grads: Iterable[tuple[str, torch.Tensor | None]]) -> GradDiff:
    diff2 = ref2 = got2 = d_ref = g_ref = 0.0
    max_abs = worst_rel = 0.0
    worst = ""
    nonfinite = None
    per_tensor = []
    for name, g in grads:
        r = reference[name]
        wide = torch.promote_types(torch.promote_types(r.dtype, torch.float32 if g is None else g.dtype), torch.float32)
        r = r.to(wide).reshape(-1)
        g = torch.zeros_like(r) if g is None else g.to(device=r.device, dtype=wide).reshape(-1)
        d2, r2, g2, dr, gr, d_max = _tensor_stats(g, r)
        if nonfinite is None and not math.isfinite(g2) and not bool(torch.isfinite(g).all()):
            nonfinite = name
        diff2, ref2, got2, d_ref, g_ref = diff2 + d2, ref2 + r2, got2 + g2, d_ref + dr, g_ref + gr
        max_abs = max(max_abs, d_max)
        rel = math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)
        per_tensor.append((name, rel))
        if not rel <= worst_rel:  # also takes NaN
            worst, worst_rel = name, rel
    return GradDiff(
        rel_err=math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf),
        cosine=_cosine(diff2, ref2, got2, d_ref, g_ref),
        max_abs=max_abs,
        scale=_scale(diff2, ref2, got2, d_ref, g_ref),
        worst_param=worst,
        worst_rel_err=worst_rel,
        nonfinite_param=nonfinite,
        per_tensor=tuple(per_tensor),
    )

