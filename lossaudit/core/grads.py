"""Gradients: take them, dot them and compare them with the reference tensor by tensor (their
sums over a step are accumulate.py's).

Comparison streams over parameters and keeps only running sums, so no case ever holds a
second copy of the model's gradient beyond its own sum.
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


CHUNK = 1 << 24  # elements handled at once on a GPU: a 16-bit tensor's float32 copy stays at 64 MiB
CPU_CHUNK = 1 << 20  # on the CPU (4 MiB in float32): a piece's copies stay below what its RAM notices


def chunk(device: torch.device) -> int:
    """Elements a comparison or a dot handles at once on ``device``: on a GPU few large pieces
    (each piece costs kernel launches), on the CPU small ones (no launch to pay for)."""
    return CPU_CHUNK if device.type == "cpu" else CHUNK


def pieces(x: torch.Tensor, y: torch.Tensor):
    """(x, y) flattened on x's device, in pieces of at most ``chunk`` elements (views, no copy)."""
    n = chunk(x.device)
    return zip(x.reshape(-1).split(n), y.reshape(-1).to(x.device).split(n))


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
    if x is y:  # a squared norm: one widened copy of each piece
        return torch.stack([torch.dot(a, a) for a in (a.to(wide) for a, _ in pieces(x, x))]).sum()
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


def _difference_stats(g: torch.Tensor | None, r: torch.Tensor, factor: float, r2: torch.Tensor) -> torch.Tensor:
    """||e||², ||r||², e·r and max|e| for e = g - r / factor, on r's device as one tensor
    (compare_grads multiplies them out to d = factor·e; where g is None or factor 0 they are
    already d's: d = -r). The
    difference is formed once per piece, in the wider of the two dtypes with a single
    rounding: where G ~ r it is exact (Sterbenz), so what is small there is read from d (see
    _near)."""
    if not r.numel():
        return torch.zeros(4, dtype=torch.float64, device=r.device)
    if g is None or factor == 0.0:
        low, high = torch.aminmax(r.reshape(-1))
        return torch.stack([r2, r2, -r2, torch.maximum(-low, high).to(r2.dtype)]).double()
    parts = []
    for gc, rc in pieces(g.to(r.device), r):
        e = gc - rc if factor == 1.0 else torch.sub(gc, rc, alpha=1.0 / factor)
        low, high = torch.aminmax(e)
        parts.append(torch.stack([dot(e, e), r2, dot(e, rc), torch.maximum(-low, high).to(r2.dtype)]).double())
    if len(parts) == 1:
        return parts[0]
    parts = torch.stack(parts)
    return torch.cat([parts[:, 0].sum().reshape(1), parts[0, 1:2], parts[:, 2].sum().reshape(1), parts[:, 3].max().reshape(1)])


def _raw_stats(g: torch.Tensor | None, r: torch.Tensor) -> torch.Tensor:
    """g·g and g·r (g None: zeros), as one float64 tensor on r's device."""
    if g is None or not r.numel():
        return torch.zeros(2, dtype=torch.float64, device=r.device)
    terms = [torch.stack([dot(gc, gc), dot(gc, rc)]) for gc, rc in pieces(g.to(r.device), r)]
    return torch.stack(terms).double().sum(0)


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
                  factor: float = 1.0, norms: dict | None = None, raw: dict | None = None) -> GradDiff:
    """``factor`` x ``grads`` against ``reference``, tensor by tensor, every statistic on the
    device until one host synchronisation.

    Where the gradient is near the reference (|d| < |r| / 2), its norm and its product with the
    reference follow from d exactly enough, and that is all. Elsewhere they are read from the
    gradient itself in a second pass, since there d·r + r·r would cancel. ``norms`` caches the
    reference tensors' squared norms (name -> 0-dim tensor); ``raw`` caches a second pass's
    products per tensor pair, for gradients that several cases share with other factors."""
    grads = list(grads)  # (name, tensor) references: read twice where the case is far
    if not grads:
        return GradDiff(0.0, float("nan"), 0.0, float("nan"), "", 0.0)
    table = difference_rows(reference, grads, factor, norms)
    return summarize([n for n, _ in grads], table, lambda: _far(reference, grads, factor, raw))


def difference_rows(reference: Mapping[str, torch.Tensor], grads: list[tuple[str, torch.Tensor | None]],
                    factor: float, norms: dict | None = None) -> torch.Tensor:
    """One float64 row per tensor on the host (one synchronisation): ||d||², ||r||², d·r and
    max|d| for d = factor x gradient - reference."""
    norms = {} if norms is None else norms
    for name, _ in grads:
        if name not in norms:
            norms[name] = dot(reference[name], reference[name])
    if not grads:
        return torch.zeros((0, 4), dtype=torch.float64)
    stats = [_difference_stats(g, reference[name], factor, norms[name]) for name, g in grads]
    table = torch.stack([s.to(stats[0].device) for s in stats]).cpu()  # the synchronisation
    f = float(factor)
    to_d = [[f * f, 1.0, f, abs(f)] if g is not None and f else [1.0] * 4 for _, g in grads]
    return table * torch.tensor(to_d, dtype=torch.float64)  # e -> d = factor x e (already d where G = 0)


def raw_products(reference: Mapping[str, torch.Tensor], grads: list[tuple[str, torch.Tensor | None]],
                 factor: float) -> tuple[float, float]:
    """||G||² and G·r for G = factor x grads over these tensors (the far case's second pass)."""
    return _far(reference, grads, factor, None) if grads else (0.0, 0.0)


def summarize(names: list[str], table: torch.Tensor, far) -> GradDiff:
    """The comparison from ``difference_rows`` (rows of tensors in model order, possibly
    gathered from several blocks of parameters); ``far()`` gives ||G||² and G·r where G is not
    near the reference."""
    if not names:
        return GradDiff(0.0, float("nan"), 0.0, float("nan"), "", 0.0)
    diff2 = ref2 = d_ref = max_abs = worst_rel = 0.0
    worst, nonfinite, per_tensor = "", None, []
    for name, (d2, r2, dr, d_max) in zip(names, table.tolist()):
        if nonfinite is None and not math.isfinite(d_max):  # the reference is finite (else nothing is compared)
            nonfinite = name
        diff2, ref2, d_ref = diff2 + d2, ref2 + r2, d_ref + dr
        max_abs = max(max_abs, d_max)
        rel = math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)
        per_tensor.append((name, rel))
        if not rel <= worst_rel:  # also takes NaN
            worst, worst_rel = name, rel
    got2, g_ref = diff2 + 2 * d_ref + ref2, d_ref + ref2  # G = d + r
    if not _near(diff2, ref2, got2):
        got2, g_ref = far()
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


def _far(reference: Mapping[str, torch.Tensor], grads: list, factor: float, raw: dict | None) -> tuple[float, float]:
    """||G||² and G·r read from G itself (the second pass), G = factor x grads."""
    raw = {} if raw is None else raw
    terms = []
    for name, g in grads:
        key = (id(g), id(reference[name]))
        if key not in raw:
            raw[key] = _raw_stats(g, reference[name])
        terms.append(raw[key])
    g2, gr = torch.stack([t.to(terms[0].device) for t in terms]).sum(0).tolist()
    return factor * factor * g2, factor * gr

