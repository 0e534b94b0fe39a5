"""Tolerances, verdicts and the explanation a finding carries."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .aux import aux_info, carried_aux
from .batch import Batch
from .paths.base import Measurement
from .reductions import REDUCTIONS
from .reference import Reference

# Smallest and largest relative error a dtype's rounding may explain. The measured noise
# floor (spread of the correct num_items reduction over layouts) moves the tolerance
# between them; a model whose noise passes the cap is itself a finding. float64's cap is
# float32-sized on purpose: transformers keeps some layers (RMSNorm's variance, rotary
# tables) in float32 whatever the model's dtype, which puts a float64 model's noise near 1e-7.
FLOOR = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
CAP = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 1e-1, "float16": 2e-2}
NOISE_FACTOR = 5.0


@dataclass(frozen=True, slots=True)
class Tolerance:
    dtype: str
    rtol: float  # on loss_rel_err and grad_rel_err
    noise_floor: float  # measured: worst num_items error over all layouts
    floor: float
    cap: float

    @classmethod
    def measure(cls, dtype: str, measurements: list[Measurement], reference: Reference) -> "Tolerance":
        floor, cap = FLOOR[dtype], CAP[dtype]
        noise = 0.0
        for m in measurements:
            if m.path == "reduction" and m.reduction == "num_items" and m.grads is not None:
                errors = (loss_rel_err(m, reference), m.grads.rel_err)
                if all(math.isfinite(e) for e in errors):
                    noise = max(noise, *errors)
        return cls(dtype, min(max(floor, NOISE_FACTOR * noise), cap), noise, floor, cap)

    def to_dict(self) -> dict:
        return asdict(self)


def target_loss(m: Measurement, reference: Reference) -> float:
    """What the case's loss must equal: the token-mean reference, plus coef times the layout's
    mean aux loss when the path trains with a router aux loss (aux.py)."""
    return reference.loss + (m.aux_target.contribution if m.aux_target is not None else 0.0)


def reference_loss(m: Measurement, reference: Reference) -> float:
    """The reference objective reported beside a case: with an aux loss, the full batch's."""
    return reference.loss + (m.aux_target.coef * m.aux_target.full if m.aux_target is not None else 0.0)


def loss_rel_err(m: Measurement, reference: Reference) -> float:
    target = target_loss(m, reference)
    return abs(m.loss - target) / abs(target) if target else abs(m.loss)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def judge(m: Measurement, tol: Tolerance, reference: Reference, batch: Batch) -> tuple[str, str]:
    """(verdict, detail) for one measurement."""
    tokens = f"target tokens per microbatch {m.counts}"
    if m.error:
        return "error", m.error
    if reference.nonfinite:
        return "error", f"the reference is not finite (NaN/Inf first in {reference.nonfinite}): nothing can be compared"
    g = m.grads
    if not _finite(m.loss) or (g is not None and g.nonfinite_param):
        return nonfinite_verdict(m, reference, batch, tokens)
    rel = loss_rel_err(m, reference)
    info = aux_info(m, reference) if m.aux_target is not None else ""
    if rel <= tol.rtol and (g is None or g.rel_err <= tol.rtol):
        return "match", "; ".join(x for x in (m.note, info) if x)
    only_loss = ""
    if g is not None and g.rel_err <= tol.rtol:  # the step trains right; what it reports is wrong
        only_loss = "the gradient matches but the reported loss does not: the loss curve is wrong, not the training"
    return "diverge", "; ".join(x for x in (only_loss, m.note, likely_cause(m, reference, batch, tol), tokens, info) if x)


def nonfinite_verdict(m: Measurement, reference: Reference, batch: Batch, tokens: str) -> tuple[str, str]:
    """NaN or Inf in a case: a named ``diverge`` when a microbatch with zero targets explains
    it (a token mean of nothing is 0/0), otherwise an ``error`` naming the first tensor."""
    g = m.grads
    grad = f"first non-finite gradient in {g.nonfinite_param}" if g and g.nonfinite_param else "gradients finite"
    empty = [i for i, c in enumerate(m.counts) if c == 0]
    if m.fault is None and empty and _empty_explains(m, reference, batch):
        which = ", ".join(f"{i + 1} of {len(m.counts)}" for i in empty)
        return "diverge", (
            f"microbatch {which} holds zero target tokens: its token mean is 0/0, "
            f"so the step's loss and gradient are NaN ({tokens})"
        )
    first = m.fault or (f"non-finite loss {m.loss}" if not _finite(m.loss) else "loss finite")
    return "error", f"{first}; {grad} ({tokens})"


def _empty_explains(m: Measurement, reference: Reference, batch: Batch) -> bool:
    """For a known reduction, whether the reduction itself is NaN on this layout (predicted
    from the reference's finite token losses); other paths get the benefit of the doubt."""
    if m.path != "reduction" or m.reduction not in REDUCTIONS:
        return True
    return not math.isfinite(reference.step_loss(batch, m.layout, REDUCTIONS.get(m.reduction)))


def likely_cause(m: Measurement, reference: Reference, batch: Batch, tol: Tolerance) -> str:
    if m.aux_target is None:
        return _ce_cause(m, m.loss, reference, batch, tol)
    carried, _ = carried_aux(m, reference)
    ce = m.loss - m.aux_target.coef * carried
    if abs(ce - reference.loss) <= tol.rtol * abs(reference.loss):
        ce_cause = "the cross-entropy part matches the reference"
    else:
        ce_cause = "cross entropy: " + _ce_cause(m, ce, reference, batch, tol)
    return "; ".join(x for x in (aux_cause(m, carried), ce_cause) if x)


def aux_cause(m: Measurement, carried: float) -> str:
    """How the step's aux loss compares with the mean over microbatches it should carry."""
    k, mean = len(m.layout.groups), m.aux_target.mean  # microbatches over all ranks
    ratio = carried / mean if mean else math.nan
    if k > 1 and abs(ratio - k) <= 1e-3 * k:
        return f"aux loss summed over {k} microbatches: {k}x their mean"
    if abs(ratio - 1) <= 1e-3:
        return ""
    if carried == 0:
        return "the step carries no router aux loss"
    return f"aux loss is {ratio:.4g}x its mean over microbatches"


def _ce_cause(m: Measurement, loss: float, reference: Reference, batch: Batch, tol: Tolerance) -> str:
    """The likely cause behind a cross-entropy ``loss`` that misses the reference."""
    k = m.layout.microbatches
    if m.path == "reduction":
        if m.reduction == "num_items":
            return "the correct reduction misses: the model's output depends on padding or grouping (position ids, attention mask)"
        reduction = REDUCTIONS.get(m.reduction) if m.reduction in REDUCTIONS else None
        return f"{m.reduction}: {reduction.doc}" if reduction and reduction.doc else ""
    near = max(tol.rtol * 10, 1e-4) * abs(reference.loss)
    # first: with one microbatch per rank, per-rank means averaged over ranks are also "each
    # microbatch's mean", and a data-parallel step makes the per-rank story the likelier one
    if m.layout.world_size > 1:
        means = reference.rank_means(batch, m.layout)
        if abs(m.loss - sum(means) / len(means)) <= near:
            return ("loss equals the mean of each rank's own token mean: per-rank normalisation (each rank "
                    "divides by its local target count, not the count gathered over ranks)")
    for name, factor, cause in (
        # with equal counts per microbatch the first two coincide; the ignored count is the likelier story
        ("mean_of_means", k, "each microbatch's token mean, summed over k microbatches: num_items_in_batch ignored"),
        ("num_items", k, f"{k}x the token mean: the correct sum over N, multiplied by k"),
        ("num_items", 1 / k, f"1/{k} of the token mean: divided by k on top of the token count"),
        ("mean_of_means", 1, "each microbatch's token mean divided by k (num_items_in_batch not used)"),
        ("sum", 1, "the token sum: never divided by the token count"),
        ("sequence_mean", 1, "each sequence weighted equally, not each token"),
    ):
        if name in REDUCTIONS and abs(loss - factor * reference.step_loss(batch, m.layout, REDUCTIONS.get(name))) <= near:
            return f"loss equals {cause}"
    g = m.grads
    if g is not None and _finite(g.cosine, g.scale) and g.cosine > 1 - 1e-6:
        return f"gradient is {g.scale:.4g}x the reference in the same direction"
    return f"loss is {loss / reference.loss:.4g}x the reference" if reference.loss else ""
