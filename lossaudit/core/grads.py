"""Gradients: accumulate them per path and compare them with the reference tensor by tensor.

Comparison streams over parameters and keeps only running sums, so no case ever holds a
second copy of the model's gradient beyond its own accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

Params = Sequence[tuple[str, torch.nn.Parameter]]


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of(loss: torch.Tensor, params: Params, *, retain_graph: bool = True) -> list[torch.Tensor | None]:
    """d loss / d params without touching ``.grad`` (so paths never see each other's)."""
    return list(
        torch.autograd.grad(loss, [p for _, p in params], retain_graph=retain_graph, allow_unused=True)
    )


CHUNK = 1 << 24  # elements handled at once: a 16-bit tensor's float32 copy stays at 64 MiB


def pieces(x: torch.Tensor, y: torch.Tensor):
    """(x, y) flattened on x's device, in pieces of at most CHUNK elements (views, no copy)."""
    return zip(x.reshape(-1).split(CHUNK), y.reshape(-1).to(x.device).split(CHUNK))


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x . y in float32 or wider, as a 0-dim tensor on x's device (no host synchronisation).
    Two bf16 tensors on a GPU: products in bf16 summed in float32 (``product_dot``; float16
    products of gradients would underflow); elsewhere pieces widened, at most CHUNK elements
    at a time."""
    wide = _wide(x, y)
    if x.dtype == wide and y.dtype == wide and x.device == y.device:
        return torch.dot(x.reshape(-1), y.reshape(-1))
    if not x.numel():
        return torch.zeros((), dtype=wide, device=x.device)
    if x.device.type != "cpu" and x.dtype == y.dtype == torch.bfloat16:
        return product_dot(x, y)
    return torch.stack([torch.dot(a.to(wide), b.to(wide)) for a, b in pieces(x, y)]).sum()


def product_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x . y for two bf16 tensors: each product rounded once to bf16 (at most 2^-8 relative,
    unbiased), the sum in float32. Less than half the memory traffic of widening both, which
    bounds a GPU's dot; ``tests/core/test_compare_grads.py`` bounds its error."""
    return torch.stack([torch.sum(a * b, dtype=torch.float32) for a, b in pieces(x, y)]).sum()


def total(terms: list[torch.Tensor]) -> float:
    """The float64 sum of 0-dim tensors, read with one host synchronisation."""
    return float(torch.stack([t.to(terms[0].device, torch.float64) for t in terms]).sum()) if terms else 0.0


def dots(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Sum over parameters of a . b (float32 or wider), with one host synchronisation."""
    return total([dot(x, y) for x, y in zip(a, b) if x is not None and y is not None])


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


def _tensor_stats(g: torch.Tensor | None, r: torch.Tensor, factor: float, r2: torch.Tensor) -> torch.Tensor:
    """||d||², ||r||², ||G||², d·r, G·r and max|d| for G = factor·g (None: zeros) and d = G - r,
    on r's device as one float64 tensor. The difference is formed once per piece, in the
    wider of the two dtypes with a single rounding (``e = g - r / factor``, d = factor·e): where
    G ~ r it is exact (Sterbenz), so what is small there is read from d (see _near)."""
    if (g is None or factor == 0.0) and r.numel():
        low, high = torch.aminmax(r.reshape(-1))
        zero = torch.zeros((), dtype=torch.float64, device=r.device)
        return torch.stack([r2.double(), r2.double(), zero, -r2.double(), zero, torch.maximum(-low, high).double()])
    if not r.numel():
        return torch.zeros(6, dtype=torch.float64, device=r.device)
    e2, er, g2, gr, e_max = [], [], [], [], []
    for gc, rc in pieces(g.to(r.device), r):
        e = gc - rc if factor == 1.0 else torch.sub(gc, rc, alpha=1.0 / factor)
        low, high = torch.aminmax(e)
        e2.append(dot(e, e))
        er.append(dot(e, rc))
        g2.append(dot(gc, gc))
        gr.append(dot(gc, rc))  # not e.r + r.r: where G is far from r that would cancel
        e_max.append(torch.maximum(-low, high))
    f = float(factor)
    e2, er, g2, gr = (torch.stack(x).double().sum() for x in (e2, er, g2, gr))
    return torch.stack([f * f * e2, r2.double(), f * f * g2, f * er, f * gr, abs(f) * torch.stack(e_max).double().max()])


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


def compare_grads(reference: Mapping[str, torch.Tensor], grads: Iterable[tuple[str, torch.Tensor | None]], *,
                  factor: float = 1.0, norms: dict | None = None) -> GradDiff:
    """``factor`` x ``grads`` against ``reference``, tensor by tensor; every statistic stays on
    the device until one host synchronisation at the end. ``norms``: a cache of the reference
    tensors' squared norms (name -> 0-dim tensor), filled as they are first needed."""
    names, stats = [], []
    norms = {} if norms is None else norms
    for name, g in grads:
        r = reference[name]
        if name not in norms:
            norms[name] = dot(r, r)
        names.append(name)
        stats.append(_tensor_stats(g, r, factor, norms[name]))
    if not stats:
        return GradDiff(0.0, float("nan"), 0.0, float("nan"), "", 0.0)
    table = torch.stack([s.to(stats[0].device) for s in stats]).cpu()  # the one synchronisation
    diff2 = ref2 = got2 = d_ref = g_ref = max_abs = worst_rel = 0.0
    worst, nonfinite, per_tensor = "", None, []
    for name, (d2, r2, g2, dr, gr, d_max) in zip(names, table.tolist()):
        if nonfinite is None and not math.isfinite(d_max):  # the reference is finite (else nothing is compared)
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

