"""The explanation a finding carries. A cause is named only when what it predicts fits what was
measured: its loss (from the reference's token losses) and its gradient (each microbatch's
weight on a logit path; the least-squares scale, predicted from each microbatch's share of the
reference gradient, on a step path). Otherwise the detail says what was measured and names
nothing it cannot show.

A candidate cause is a weight per microbatch, relative to the token mean's weight 1/N: a
mean of means gives microbatch m the weight N / (k n_m), a k-fold loss k, and so on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..core.batch import Batch
from ..core.aggregation import SumOver
from ..core.moe import carried_aux
from ..core.objective import Objective
from ..core.reference import Reference
from ..core.tokens import count_unshifted
from .tolerance import Tolerance

if TYPE_CHECKING:
    from .judge import LayoutFacts, Measured

PADDING_CAUSE = ("the correct reduction misses: the model's output depends on padding or grouping "
                 "(position ids, attention mask)")


def candidates(m: "Measured", batch: Batch) -> list[tuple[str, list[float]]]:
    """(what it is, weight per microbatch x the token mean's) for the known normalisation bugs."""
    counts, layout = m.counts, m.layout
    n, k, parts = sum(counts), layout.microbatches, len(counts)  # parts: microbatches over all ranks
    if not n or not all(counts):
        return []
    found = []
    if layout.world_size > 1:  # first: with one microbatch per rank, per-rank means look like microbatch means
        per_rank = layout.per_rank(counts)
        if all(per_rank):
            found.append(("the mean of each rank's own token mean: per-rank normalisation (each rank divides by "
                          "its local target count, not the count gathered over ranks)",
                          [n / (layout.world_size * per_rank[i // k]) for i in range(parts)]))
        found += _divide_factor(layout.world_size, k, parts)
    # with equal counts per microbatch the first two coincide; the ignored count is the likelier story
    found += [
        ("each microbatch's token mean, summed over k microbatches: num_items_in_batch ignored", [n / c for c in counts]),
        (f"{k}x the token mean: the correct sum over N, multiplied by k", [float(k)] * parts),
        (f"1/{k} of the token mean: divided by k on top of the token count", [1.0 / k] * parts),
        ("each microbatch's token mean divided by k (num_items_in_batch not used)", [n / (parts * c) for c in counts]),
        ("the token sum: never divided by the token count", [float(n)] * parts),
    ]
    unshifted = sum(count_unshifted(s.labels[None], batch.task) for s in batch.samples)
    if unshifted != n:
        found.append((f"the token sum over {unshifted}, the step's labels counted without the shift (each row's first "
                      f"label, which nothing predicts, counted too): {n}/{unshifted}x", [n / unshifted] * parts))
    return [(text, w) for text, w in found if any(abs(x - 1.0) > 1e-9 for x in w)]


def _divide_factor(w: int, k: int, parts: int) -> list[tuple[str, list[float]]]:
    """A data-parallel wrapper's divide factor applied twice (the gathered count already divides,
    and the wrapper averages over the ranks on top) or not at all (the loss multiplied by the
    world size, and the gradients summed, not averaged). With k = w a k-fold error is the same
    factor: the text says both."""
    also = f"; or the same factor through k = {k} microbatches" if k == w else ""
    both = [] if k == 1 else [  # a one-process loss handed to a backward that divides by k, on ranks averaged
        (f"1/{k * w} of the token mean: the count gathered over the step divides it, and then the accumulation "
         f"steps divide it again (k = {k}: accelerate's backward, or DeepSpeed's engine, scale by 1/k) and the "
         f"wrapper averages over {w} ranks (GAS division and divide factor both applied on top of the count)",
         [1.0 / (k * w)] * parts)]
    return both + [
        (f"1/{w} of the token mean: the count gathered over {w} ranks divides the step and the wrapper's "
         f"average over ranks divides it again (divide factor applied twice{also})", [1.0 / w] * parts),
        (f"{w}x the token mean: the loss is multiplied by the world size {w} to undo an average over ranks "
         f"that the wrapper did not apply (gradients summed: divide factor not applied{also})", [float(w)] * parts),
    ]


def _loss_fits(weights: list[float], loss: float, m: "Measured", reference: Reference, batch: Batch,
               tol: Tolerance) -> bool:
    sums = reference.group_sums(batch, m.layout)
    predicted = sum(w * s for w, s in zip(weights, sums)) / sum(m.counts)
    return abs(predicted - loss) <= max(10 * tol.loss_noise, 1e-4) * abs(reference.loss)


def _gradient_fits(weights: list[float], m: "Measured", tol: Tolerance, facts: "LayoutFacts | None") -> bool:
    g = m.grads
    uniform = max(weights) - min(weights) <= 1e-9 * max(1.0, max(abs(w) for w in weights))
    if g is not None and math.isfinite(g.cosine):  # only uneven weights turn the gradient
        if _aligned(g, tol) != uniform:
            return False
    if m.weights:  # measured per microbatch: each must fit
        bound = max(3 * tol.tolerances["weights"], 1e-4)
        return all(abs(w - x) <= bound * max(1.0, abs(w)) for w, x in zip(weights, m.weights))
    if m.grads is None or facts is None or facts.shares is None:
        return False  # no gradient evidence: name nothing
    predicted = sum(w * s for w, s in zip(weights, facts.shares))
    return abs(predicted - m.grads.scale) <= max(3 * tol.tolerances["scale"], 1e-3) * max(1.0, abs(predicted))


def _aligned(g, tol: Tolerance) -> bool:
    """The gradient points where the reference does. Far from the reference (a k-fold scale)
    the cosine comes from float32 dot products, good to about 1e-8: hence the 1e-6 floor."""
    return 1.0 - g.cosine <= max(tol.tolerances["direction"], 1e-6)


def measured(m: "Measured", loss: float, reference: Reference, tol: Tolerance) -> str:
    """What was measured, where no cause fits."""
    parts = []
    w, g = m.weights, m.grads
    aligned = g is not None and math.isfinite(g.cosine) and _aligned(g, tol)
    if w and len(w) > 1:  # one microbatch's projection says no more than the scale below
        mean = sum(w) / len(w)
        if aligned and all(abs(x - mean) <= tol.tolerances["weights"] * max(1.0, abs(mean)) for x in w):
            parts.append(f"every microbatch weighs {mean:.4g}x its token-mean share: a uniform rescale of the step")
        else:
            parts.append("each microbatch weighs " + ", ".join(f"{x:.4g}" for x in w) + "x its token-mean share")
    if g is not None and math.isfinite(g.cosine) and math.isfinite(g.scale):
        if aligned:
            parts.append(f"gradient is {g.scale:.4g}x the reference in the same direction")
        else:
            parts.append(f"gradient scale {g.scale:.4g} (least squares), 1 - cosine {1.0 - g.cosine:.2g}")
    if reference.loss and math.isfinite(loss):
        parts.append(f"loss is {loss / reference.loss:.4g}x the reference")
    return "; ".join(parts)


def ce_cause(m: "Measured", loss: float, reference: Reference, batch: Batch, tol: Tolerance,
             facts: "LayoutFacts | None", *, gradient: bool = True) -> str:
    """The cause behind a cross-entropy ``loss`` that misses the reference: a candidate whose
    loss and gradient fit (``gradient=False``: the gradient also carries something else, so the
    loss alone is checked and said so)."""
    if not m.loss_compared:  # no loss reported: the gradient is the only evidence
        for text, weights in candidates(m, batch):
            if gradient and _gradient_fits(weights, m, tol, facts):
                return f"its gradient equals {text} (no loss reported to confirm it)"
        return measured(m, loss, reference, tol)
    for text, weights in candidates(m, batch):
        if _loss_fits(weights, loss, m, reference, batch, tol):
            if not gradient:
                return f"its loss equals {text}"
            if _gradient_fits(weights, m, tol, facts):
                return f"loss and gradient equal {text}"
    return measured(m, loss, reference, tol)


def explain(m: "Measured", reference: Reference, batch: Batch, tol: Tolerance, facts: "LayoutFacts | None",
            *, objective: Objective = Objective(), at_one: "Measured | None" = None) -> str:
    """The cause of a finding. ``objective``: the run's declared one; ``at_one``: the same path's
    case on the whole window in one microbatch (k=1), where the run has one."""
    label = m.label
    if label.calibrates:
        return PADDING_CAUSE
    if label.expected:  # known to differ: say why, and what it measured like
        fitted = ce_cause(m, m.loss, reference, batch, tol, facts) \
            if m.aux_target is None and objective.token_mean else ""
        return "; ".join(x for x in (f"{label.reduction}: {label.cause}" if label.cause else "", fitted) if x)
    if m.aux_target is None:
        named = objective_cause(m, tol, objective)
        if named and objective.token_mean:
            # one sequence per microbatch: a mean of microbatch means is a sequence mean too; an
            # accumulation bug, unless the path is that objective on the whole window already
            cause = ce_cause(m, m.loss, reference, batch, tol, facts)
            if cause.startswith("loss and gradient equal") and not (at_one and objective_cause(at_one, tol, objective)):
                return f"{cause} (on this layout the same numbers as {named.split(' (')[0].removeprefix('loss and gradient equal ')})"
        if named:
            return named
        if objective.pairwise:
            return pair_cause(m, reference, tol) or measured(m, m.loss, reference, tol)
        if not objective.token_mean:  # the accumulation candidates are weights x the token mean's
            return sum_over_cause(m, reference, tol, objective) or measured(m, m.loss, reference, tol)
        cause = ce_cause(m, m.loss, reference, batch, tol, facts)
        if cause.startswith("loss and gradient equal"):
            return cause
        return sum_over_cause(m, reference, tol, objective) or cause
    carried, _ = carried_aux(m.loss, m.aux, reference.loss, m.aux_target.coef)
    ce = m.loss - m.aux_target.coef * carried
    if abs(ce - reference.loss) <= tol.rtol * abs(reference.loss):
        ce_part = "the cross-entropy part matches the reference"
    else:
        ce_part = "cross entropy: " + ce_cause(m, ce, reference, batch, tol, facts, gradient=False)
    return "; ".join(x for x in (aux_cause(m, carried), ce_part) if x)


def _another(declared: Objective) -> str:
    return (f"a different objective over the whole window, not an accumulation bug; the run declares "
            f"{declared.aggregation.describe()} ({declared.aggregation.spec})")


def objective_cause(m: "Measured", tol: Tolerance, declared: Objective) -> str:
    """The objective a step computes instead of the declared one, where its loss and gradient
    match that objective's own float64 reference within the run's tolerance (judge.Alternative)."""
    for alt in m.alternatives:
        if not tol.exceeded(alt.deviation(m.loss)):
            a = alt.objective.aggregation
            return (f"loss and gradient equal {a.describe()} ({a.spec}): {_another(declared)}; "
                    f"if {a.spec} is what the step means, declare it: --objective {a.spec}")
    return ""


def sum_over_cause(m: "Measured", reference: Reference, tol: Tolerance, declared: Objective) -> str:
    """A token sum over a constant: the gradient points along the token mean's, at a scale s with
    loss = s x the token-mean loss; the constant is N = target tokens / s, named when it is a whole
    number within the scale's tolerance (and not the declared one)."""
    if declared.token_mean:
        grads, token_loss = m.grads, reference.loss
    else:
        token = next((a for a in m.alternatives if a.objective.token_mean), None)
        grads, token_loss = (token.grads, token.loss) if token else (None, math.nan)
    n = sum(m.counts)
    if grads is None or not (math.isfinite(grads.cosine) and grads.scale > 0 and _aligned(grads, tol)):
        return ""
    constant = n / grads.scale
    near = round(constant)
    slack = max(3 * tol.tolerances["scale"], 1e-4) * constant
    if near < 1 or abs(constant - near) > max(slack, 1e-6) or near == n or slack > 0.1:
        return ""  # not a whole number, the token mean itself, or too coarse to tell N from N +- 0.1
    if abs(m.loss - grads.scale * token_loss) > max(10 * tol.loss_noise, 1e-4, tol.rtol) * abs(token_loss):
        return ""
    if isinstance(declared.aggregation, SumOver) and near == declared.aggregation.n:
        return ""
    steps = m.layout.microbatches * m.layout.world_size
    if near in {1, m.layout.microbatches, steps}:  # the divisor an accumulation loop applies itself
        divided = "the token sum itself" if near == 1 else f"the token sum divided by {near} (the microbatches)"
        return (f"loss and gradient equal {divided}, never divided by the step's {n} target tokens: "
                f"{n / near:.4g}x the token mean, in the same direction")
    if abs(near - n) <= 0.1 * n:  # near the step's own count: as likely a miscount as a constant
        return (f"loss and gradient equal the token sum over {near}, not over the step's {n} target tokens: "
                f"a miscount of the tokens, or a sum over a constant {near}")
    return (f"loss and gradient equal a sum over a constant {near} (the token sum / {near}, {n}/{near} = "
            f"{n / near:.4g}x the token mean): {_another(declared)}; if that is what the step means, declare "
            f"it: --objective sum-over:{near}")


def pair_cause(m: "Measured", reference: Reference, tol: Tolerance) -> str:
    """A normalisation bug of a pair mean: a uniform rescale of the step (the gradient along the
    reference, at the candidate's scale, and the loss that scale x the reference's)."""
    sizes = [len(g) // 2 for g in m.layout.groups]  # pairs per microbatch
    pairs, k = sum(sizes), len(sizes)
    found = [(f"the pair sum: never divided by the pair count ({pairs}x the pair mean)", float(pairs)),
             ("the pair losses over the rows, chosen and rejected counted apart: 1/2 of the pair mean", 0.5)]
    if k > 1 and len(set(sizes)) == 1:
        found += [(f"each microbatch's pair mean summed over {k} microbatches, not divided by k: {k}x the pair mean",
                   float(k)),
                  (f"1/{k} of the pair mean: divided by k on top of the pair count", 1.0 / k)]
    g = m.grads
    if g is None or not (math.isfinite(g.cosine) and _aligned(g, tol)):
        return ""
    for text, w in ((text, w) for text, w in found if abs(w - 1.0) > 1e-9):  # one pair: the sum is the mean
        scale_fits = abs(g.scale - w) <= max(3 * tol.tolerances["scale"], 1e-3) * max(1.0, w)
        loss_fits = abs(m.loss - w * reference.loss) <= max(10 * tol.loss_noise, 1e-4, tol.rtol) * w * abs(reference.loss)
        if scale_fits and loss_fits:
            return f"loss and gradient equal {text}"
    return ""


def aux_cause(m: "Measured", carried: float) -> str:
    """How the step's aux loss compares with the mean over microbatches it should carry (on N
    ranks: over every rank's microbatches). A factor that fits more than one story says each."""
    total, mean = len(m.layout.groups), m.aux_target.mean  # microbatches over all ranks
    ratio = carried / mean if mean else math.nan
    if abs(ratio - 1) <= 1e-3:
        return ""
    if carried == 0:
        return "the step carries no router aux loss"
    named = [text for factor, text in _aux_factors(total, m.layout.world_size) if abs(ratio - factor) <= 1e-3 * factor]
    if named:
        return " or ".join(named)
    return f"aux loss is {ratio:.4g}x its mean over microbatches"


def _aux_factors(total: int, world_size: int) -> list[tuple[int, str]]:
    """(factor, what carries it) for an aux loss off by a whole factor: summed over microbatches,
    multiplied by the world size (transformers#48690: the loss x world size that undoes the
    ranks' average also reaches the aux term), or both."""
    if world_size == 1:
        return [(total, f"aux loss summed over {total} microbatches: {total}x their mean")] if total > 1 else []
    k, n = total // world_size, world_size  # microbatches per rank, ranks
    world = f"multiplied by the world size {n} (transformers#48690)"
    factors = [(n, f"aux loss {world}: {n}x its mean over microbatches")]
    if k > 1:
        factors += [(k, f"aux loss summed over each rank's {k} microbatches: {k}x their mean"),
                    (k * n, f"aux loss summed over each rank's {k} microbatches and {world}: {k * n}x their mean")]
    return factors


def nonfinite(m: "Measured", reference: Reference, batch: Batch, tokens: str) -> tuple[str, str]:
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
    first = m.fault or (f"non-finite loss {m.loss}" if not math.isfinite(m.loss) else "loss finite")
    return "error", f"{first}; {grad} ({tokens})"


def _empty_explains(m: "Measured", reference: Reference, batch: Batch) -> bool:
    """For a known reduction, whether it is NaN on this layout itself (predicted from the
    reference's finite token losses); other paths get the benefit of the doubt."""
    if m.label.formula is None:
        return True
    return not math.isfinite(reference.step_loss(batch, m.layout, m.label.formula))


def reference_objective(m: "Measured", reference: Reference) -> float:
    """The reference objective reported beside a case: with an aux loss, the full batch's."""
    t = m.aux_target
    return reference.loss + (t.coef * t.full if t is not None else 0.0)


def aux_fields(m: "Measured", reference: Reference) -> dict:
    """The report's aux columns for a case judged with the router aux loss (none otherwise)."""
    t = m.aux_target
    if t is None:
        return {}
    carried, inferred = carried_aux(m.loss, m.aux, reference.loss, t.coef)
    return {
        "ce_loss": m.loss - t.coef * carried, "reference_ce_loss": reference.loss,
        "aux_loss": carried, "aux_inferred": inferred, "layout_aux_loss": t.mean,
        "microbatch_aux_losses": list(t.microbatch), "reference_aux_loss": t.full, "aux_coef": t.coef,
        "aux_gap": t.gap, "aux_grad_gap": t.gap_grad,
    }


def aux_info(m: "Measured", reference: Reference) -> str:
    """The aux numbers for a case's detail, the inherent gap marked as information."""
    t = m.aux_target
    carried, inferred = carried_aux(m.loss, m.aux, reference.loss, t.coef)
    return (f"aux: step carried {carried:.6g}{' (inferred from the loss)' if inferred else ''}, "
            f"mean over microbatches {t.mean:.6g}, full batch {t.full:.6g}; inherent gap {t.gap:+.2%} "
            f"(gradient {t.gap_grad:.1e}), information, not a finding")
