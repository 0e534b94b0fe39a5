"""One place judges. Paths only measure (paths/base.py); here each outcome gets its target,
is compared with it as its gradient streams by, and, once the run's noise is known, gets a
verdict and a detail. Error cases are built here and nowhere else, behind one guard.

The target of a case is the float64 reference of the run's declared objective (by default the
token mean; label smoothing included; ``core/objective.py``), and for a path that trains a MoE model's own loss, the reference plus
coef x the layout's mean router aux loss (moe.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from . import causes, precision
from ..core.errors import LossauditError, RankFailure
from .faults import must_propagate, one_line
from ..core.forward import forward
from ..core.grads import GradDiff, compare_grads, difference_rows, dots, raw_products, summarize
from ..core.layouts import Layout, microbatches
from ..core.moe import AuxAccumulator, LayoutAux, carried_aux
from ..paths.base import AuditContext, Label, Outcome, StepPath, Unavailable
from .passes import budget_bytes, param_blocks
from .precision import PrecisionReference
from ..core.aggregation import SequenceMean, TokenMean
from ..core.objective import Objective
from ..core.reference import Reference, compute_reference
from .tolerance import BOUNDS, Tolerance, deviations


class UserCodeExit(LossauditError):
    """Code under audit called sys.exit: never swallowed, the run ends (exit 3, as any
    SystemExit from called code)."""


@dataclass
class Measured:
    """One case, compared with its target, before its verdict."""

    label: Label
    layout: Layout
    counts: list[int]  # target tokens per microbatch, rank-major
    loss: float = math.nan
    target_loss: float = math.nan  # what the loss must equal
    grads: GradDiff | None = None
    weights: list[float] | None = None  # per microbatch, x the token-mean weight
    note: str = ""
    extra: dict = field(default_factory=dict)
    aux: float | None = None  # MoE: the router aux loss the step carried, if the path knows it
    aux_target: LayoutAux | None = None  # set when judged against CE + coef x mean aux
    error: str | None = None
    fault: str | None = None  # the first non-finite tensor the harness saw in this layout
    loss_compared: bool = True  # False: no loss reported (NaN), the gradient alone is judged
    # a step whose gradient is far from its target, compared with the objectives it does not
    # declare (causes.objective_cause names the one it computes)
    alternatives: list["Alternative"] = field(default_factory=list)
    cause: str | None = None  # the path's own cause (Outcome.cause)

    @property
    def loss_rel_err(self) -> float:
        t = self.target_loss
        return abs(self.loss - t) / abs(t) if t else abs(self.loss)

    def deviation(self) -> dict[str, float]:
        t = self.aux_target
        ratio = self.aux / t.mean if t is not None and self.aux is not None and t.mean else None
        out = deviations(self.loss_rel_err, self.grads, self.weights, ratio)
        if self.label.gradient_only or not self.loss_compared:
            del out["loss"]
        return out


@dataclass
class Alternative:
    """A case measured against an objective it was not declared to compute."""

    objective: Objective
    loss: float  # that objective's float64 reference loss
    grads: GradDiff  # the case's gradient against that objective's reference gradient

    def deviation(self, loss: float) -> dict[str, float]:
        return deviations(abs(loss - self.loss) / abs(self.loss) if self.loss else abs(loss), self.grads, None)


@dataclass
class LayoutFacts:
    """What the harness's correct reduction learnt about a layout, for targets and causes."""

    shares: list[float] | None = None  # each microbatch's share of the reference gradient's projection
    aux: LayoutAux | None = None


class Judge:
    def __init__(self, ctx: AuditContext):
        self.ctx = ctx
        self.reference = ctx.reference
        self.facts: dict[Layout, LayoutFacts] = {}
        self.norms: dict = {}  # the reference tensors' squared norms, computed once a run
        self.norm2: float | None = None  # the reference's squared norm, summed (harness.run_layout's norm2)
        self.seen: dict[int, list[Measured]] = {}  # id(label) -> its cases, to find a step's own k=1
        self._precision: PrecisionReference | None | bool = False  # False: not taken yet
        self._others: list[tuple[Objective, Reference, dict]] | None = None  # other_objectives()
        # other_objectives' references kept for the run: without a budget (--max-memory, a CUDA
        # device); the harness decides again where the default memory target has room for one
        self.keep_others = budget_bytes(getattr(ctx.config, "max_memory", None), ctx.device) is None
        self.other_blocks = 1  # not kept: blocks of parameters each is taken in (harness.run_paths sets it)

    # --- targets -----------------------------------------------------------------------
    def learn(self, layout: Layout, shares: list[float] | None, aux: LayoutAux | None) -> None:
        self.facts[layout] = LayoutFacts(shares, aux)

    def layout_aux(self, layout: Layout) -> LayoutAux | None:
        """The layout's aux target: from the harness's shared forward, else from a forward of
        each microbatch here (a layout only a step path runs, such as the Trainer's k=1 arm)."""
        if self.reference.aux is None:
            return None
        facts = self.facts.setdefault(layout, LayoutFacts())
        if facts.aux is None or facts.aux.grads is None:  # never learnt, or its gradient released
            self.release_aux(keep=layout)
            acc = AuxAccumulator(self.reference.aux, self.ctx.params, len(layout.groups))
            with acc.hooks() as hooks:
                for mb in microbatches(self.ctx.batch, layout):
                    outputs, _ = forward(self.ctx.model, mb, self.ctx.device)
                    acc.add(outputs, mb.attention_mask, hooks)
            facts.aux = acc.result()
        return facts.aux

    def release_aux(self, keep: Layout | None = None) -> None:
        """Free the aux target gradient (a whole model's) of every layout but ``keep``: its
        numbers stay with the cases; a later case on that layout takes its forwards again."""
        for layout, facts in self.facts.items():
            if layout != keep and facts.aux is not None:
                facts.aux.grads = None

    def target(self, label: Label, layout: Layout) -> tuple[float, Mapping, LayoutAux | None]:
        aux = self.layout_aux(layout) if label.trains_aux else None
        if aux is None:
            return self.reference.loss, self.reference.grads, None
        return self.reference.loss + aux.contribution, aux.target_grads(self.reference.grads), aux

    # --- measuring ---------------------------------------------------------------------
    def measure(self, outcome: Outcome, *, fault: str | None = None, raw: dict | None = None) -> Measured:
        """Compare an outcome with its target, tensor by tensor. ``raw``: a cache for outcomes
        that share their gradient tensors (grads.compare_grads), alive no longer than they are."""
        label, layout = outcome.label, outcome.layout
        loss_target, grads_target, aux = self.target(label, layout)
        if outcome.target is not None:  # the step's own (a GRPO window's declared gradient)
            loss_target, grads_target, aux = math.nan, outcome.target, None
        grads = outcome.compared if outcome.compared is not None and grads_target is self.reference.grads else \
            compare_grads(grads_target, outcome.gradient, factor=outcome.gradient_factor,
                          norms=self.norms if grads_target is self.reference.grads else None, raw=raw)
        if outcome.scale is not None and aux is None:  # projected on the reference itself, not on an aux target
            grads = dataclasses.replace(grads, scale=outcome.scale)
        m = Measured(
            label, layout, self.ctx.batch.group_targets(layout.groups), loss=outcome.loss, target_loss=loss_target,
            grads=grads, note=outcome.note, extra=outcome.extra, aux=outcome.aux if aux else None, aux_target=aux,
            weights=None if aux or not self.ctx.objective.token_mean else (outcome.weights or self.resolved(outcome)),
            fault=fault, loss_compared=outcome.loss_compared, cause=outcome.cause,
            alternatives=[] if outcome.target is not None else self._alternatives(outcome, grads))
        self.seen.setdefault(id(label), []).append(m)
        return m

    def resolved(self, outcome: Outcome) -> list[float] | None:
        """A step path's weight per microbatch (x the token-mean weight): each backward's
        projection on the reference over the correct share of its microbatch, which the
        harness's correct reduction measured on the same layout."""
        facts = self.facts.get(outcome.layout)
        if outcome.projections is None or facts is None or facts.shares is None:
            return None
        if self.norm2 is None:
            r = [self.reference.grads[n] for n, _ in self.ctx.params]
            self.norm2 = dots(r, r)
        norm2 = self.norm2
        if len(facts.shares) != len(outcome.projections) or not norm2 or not all(facts.shares):
            return None
        return [p / (s * norm2) for p, s in zip(outcome.projections, facts.shares)]

    def _alternatives(self, outcome: Outcome, grads: GradDiff) -> list[Alternative]:
        """A step's gradient (logit paths carry microbatch weights instead) that is beyond the
        dtype's cap (a finding whatever the noise: only then is another reference computed and
        held), against each objective the run does not declare; the gradient stream must be
        readable twice (a list or a dict's items, not an iterator)."""
        cap = BOUNDS["grad"].get(self.dtype, BOUNDS["grad"]["float32"])[1]
        if outcome.weights is not None or isinstance(outcome.gradient, Iterator) or not grads.rel_err > cap:
            return []
        if self.other_blocks > 1 and not self.keep_others and not getattr(self.ctx.reference, "aux", None):
            return [Alternative(objective, *self._in_blocks(objective, outcome)) for objective in self.undeclared()]
        return [Alternative(objective, reference.loss, compare_grads(reference.grads, outcome.gradient,
                                                                     factor=outcome.gradient_factor, norms=norms))
                for objective, reference, norms in self.other_objectives()]

    def _in_blocks(self, objective: Objective, outcome: Outcome) -> tuple[float, GradDiff]:
        """``objective``'s reference loss and the step's gradient against its reference, taken
        in ``other_blocks`` blocks of parameters (passes.Footprint.other_blocks): each block's
        reference gradient compared and freed before the next, as harness.run_layout compares
        its sums, so that only a block of it stands beside the declared reference and the
        step's gradient. One forward and backward a block."""
        ctx, gradient, factor = self.ctx, dict(outcome.gradient), outcome.gradient_factor
        names, rows, far, loss = [], [], [0.0, 0.0], math.nan
        for block in param_blocks(ctx.params, self.other_blocks):
            params = [ctx.params[i] for i in block]
            reference = compute_reference(ctx.model, ctx.batch, params, ctx.device, objective=objective)
            items = [(n, gradient.get(n)) for n, _ in params]
            rows.append(difference_rows(reference.grads, items, factor))
            g2, g_r = raw_products(reference.grads, items, factor)
            far = [far[0] + g2, far[1] + g_r]
            names += [n for n, _ in params]
            loss, reference = reference.loss, None  # freed before the next block's
        return loss, summarize(names, torch.cat(rows), lambda: tuple(far))

    def undeclared(self) -> list[Objective]:
        """The token aggregations the run does not declare (none for a pair objective)."""
        declared = self.ctx.objective
        if declared.pairwise or self.ctx.reference is None:
            return []
        return [o for o in (dataclasses.replace(declared, aggregation=a) for a in (TokenMean(), SequenceMean()))
                if o.aggregation != declared.aggregation]

    def other_objectives(self) -> Iterator[tuple[Objective, Reference, dict]]:
        """The token aggregations the run does not declare, each with its float64 reference,
        computed when a step first misses its target: kept for the run's later findings, or,
        under a memory budget (--max-memory, a CUDA device, the default target where it has no
        room for one: harness.run_paths), computed for each finding and freed
        after it (a reference is a whole model's gradient, which no budget planned for)."""
        if self._others is not None:
            yield from self._others
            return
        ctx, keep = self.ctx, self.keep_others
        others = []
        for other in self.undeclared():
            reference = compute_reference(ctx.model, ctx.batch, ctx.params, ctx.device, objective=other)
            if keep:
                others.append((other, reference, {}))
            yield other, reference, {}
            reference = None  # before the next one is computed
        if keep:
            self._others = others

    def failed(self, label: Label, layout: Layout, reason: str) -> Measured:
        """The error case: the one way one is built."""
        return Measured(label, layout, self.ctx.batch.group_targets(layout.groups), error=reason)

    # --- verdicts ----------------------------------------------------------------------
    def tolerance(self, measured: list[Measured]) -> Tolerance:
        calibration = [m.deviation() for m in measured if m.label.calibrates and m.grads is not None]
        return Tolerance.measure(self.dtype, calibration)

    @property
    def dtype(self) -> str:
        if self.ctx.config is not None:
            return self.ctx.config.dtype
        return str(next((p.dtype for _, p in self.ctx.params), "torch.float32")).removeprefix("torch.")

    def verdict(self, m: Measured, tol: Tolerance) -> tuple[str, str]:
        """(verdict, detail) for one case."""
        tokens = f"target tokens per microbatch {m.counts}"
        if m.error:
            return "error", m.error
        if self.reference.nonfinite:
            return "error", f"the reference is not finite (NaN/Inf first in {self.reference.nonfinite}): nothing can be compared"
        g = m.grads
        if (m.loss_compared and not m.label.gradient_only and not math.isfinite(m.loss)) or (g is not None and g.nonfinite_param):
            return causes.nonfinite(m, self.reference, self.ctx.batch, tokens)
        info = causes.aux_info(m, self.reference) if m.aux_target is not None else ""
        deviation = m.deviation()
        missed = tol.exceeded(deviation)
        if not missed:
            return "match", "; ".join(x for x in (m.note, info) if x)
        only_loss = ""
        if missed == ["loss"]:  # the step trains right; what it reports is wrong
            only_loss = "the gradient matches but the reported loss does not: the loss curve is wrong, not the training"
        cause = m.cause if m.cause is not None else self.cause(m, tol)
        return "diverge", "; ".join(x for x in (only_loss, m.note, cause, tokens, tol.describe(deviation), info) if x)

    # --- precision (precision.py) ------------------------------------------------------
    def precision_reference(self) -> PrecisionReference | None:
        """The reference in the model's own precision, taken once, when a finding asks."""
        if self._precision is False:
            try:
                self._precision = precision.precision_reference(self.ctx)
            except Exception as exc:  # a model whose own forward fails here: name no precision
                if must_propagate(exc):
                    raise
                self._precision = None
        return self._precision

    def single(self, m: Measured) -> Measured | None:
        """The same case at k = 1 on one process (right padding first): the step's own k = 1."""
        ones = [x for x in self.seen.get(id(m.label), ()) if x.layout.microbatches == 1 and x.layout.world_size == 1
                and x.grads is not None and x.error is None]
        return next((x for x in ones if x.layout.padding == m.layout.padding), ones[0] if ones else None)

    def precision_of(self, m: Measured, tol: Tolerance) -> str:
        """The precision finding of a case (its k = 1 deviates as the model's own precision
        makes cross entropy deviate), or ""."""
        if m.label.calibrates or m.label.expected or m.aux_target is not None or self.dtype not in ("bfloat16", "float16"):
            return ""
        if m.cause is not None:  # the path named what its step computed against a target of its own (GRPO)
            return ""
        one = self.single(m)
        if one is None or not tol.exceeded(one.deviation()):
            return ""
        p = self.precision_reference()
        return p.describe() if p is not None and precision.fits(one, p, tol) else ""

    @staticmethod
    def bent_at_one(m: Measured, one: Measured | None, tol: Tolerance) -> str:
        """For a case at k > 1 whose own k = 1 already points elsewhere than the reference: that
        it is another objective, not a normalisation over microbatches (every count bug is
        right at k = 1)."""
        if one is None or one is m or m.label.expected or m.label.calibrates or m.aux_target is not None:
            return ""
        g = one.grads
        if not (g is not None and math.isfinite(g.cosine) and 1.0 - g.cosine > tol.tolerances["direction"]):
            return ""
        return (f"at k=1 this step already differs from the token mean in direction (1 - cosine {1.0 - g.cosine:.2g}): "
                "another objective, not a count over microbatches alone")

    def cause(self, m: Measured, tol: Tolerance) -> str:
        """A finding's cause. Precision when the step's k = 1 is what its precision gives; at
        k > 1 the normalisation is then judged against that k = 1 (precision included)."""
        said = self.precision_of(m, tol)
        one = self.single(m)
        if not said or one is m:
            found = said or self.explain(m, tol, one)
            named = causes.objective_cause(m, tol, self.ctx.objective) if m.aux_target is None else ""
            return "; ".join(x for x in ("" if named else self.bent_at_one(m, one, tol), found) if x)
        rel = precision.relative(m, one)
        if not tol.exceeded({k: v for k, v in rel.deviation().items() if k in ("scale", "direction", "weights")}):
            return f"{said}; its normalisation matches its own k=1"
        coarse = precision.loss_resolution(tol, self.dtype)
        found = self.explain(rel, coarse, one)
        return f"{said}; against its own k=1 (precision included): {found}"

    def explain(self, m: Measured, tol: Tolerance, one: Measured | None) -> str:
        return causes.explain(m, self.reference, self.ctx.batch, tol, self.facts.get(m.layout),
                              objective=self.ctx.objective, at_one=one)


class Guard:
    """Runs code under audit. Its exception becomes the case's error (the run goes on); out of
    memory and lossaudit's own errors end the run (exit 3 / their status); SystemExit from the
    code under audit ends it with one line (exit 2); KeyboardInterrupt is never caught."""

    def __init__(self, judge: Judge):
        self.judge = judge

    def call(self, what: str, fn, *args):
        """(result, None), or (None, one-line reason) when ``fn`` raised."""
        try:
            return fn(*args), None
        except Unavailable as exc:
            return None, str(exc)
        except RankFailure as exc:  # a data-parallel rank raised, died or hung: these cases only
            return None, f"{what} failed: {exc}"
        except SystemExit as exc:
            raise UserCodeExit(f"{what} called sys.exit({exc.code!r}): the audit stops, no report is written") from None
        except Exception as exc:
            if must_propagate(exc):
                raise
            return None, f"{what} raised {one_line(exc)}"

    def step(self, path: StepPath, ctx: AuditContext, layout: Layout) -> list[Measured]:
        """One layout of a step path: its outcomes measured, or its error cases."""
        outcomes, reason = self.call(f"the {path.name} path on {layout.name}", path.run_resolved, ctx, layout)
        if reason is not None:
            return [self.judge.failed(label, layout, reason) for label in path.labels(layout)]
        return [self.judge.measure(o) for o in outcomes]


def report_fields(m: Measured, judge: Judge, tol: Tolerance) -> dict:
    """The report row of one case (contract columns first, see report.CASE_COLUMNS)."""
    verdict, detail = judge.verdict(m, tol)
    g, nan, ref = m.grads, math.nan, judge.reference
    return {
        "path": m.label.path, "reduction": m.label.reduction, "microbatches": m.layout.microbatches,
        "padding": m.layout.padding, "grouping": m.layout.grouping, "world_size": m.layout.world_size,
        "tokens": list(m.counts), "loss": m.loss, "reference_loss": causes.reference_objective(m, ref),
        "loss_abs_err": abs(m.loss - m.target_loss), "loss_rel_err": m.loss_rel_err,
        "grad_rel_err": g.rel_err if g else nan, "grad_cosine": g.cosine if g else nan,
        "grad_max_abs": g.max_abs if g else nan, "grad_scale": g.scale if g else nan,
        "worst_param": g.worst_param if g else None, "worst_param_rel_err": g.worst_rel_err if g else nan,
        "verdict": verdict, "expected": bool(m.label.expected), "detail": detail,
        "precision": (judge.precision_of(m, tol) or None) if verdict == "diverge" else None,
        "microbatch_weights": list(m.weights) if m.weights else None,
        "microbatch_losses": ref.microbatch_losses(judge.ctx.batch, m.layout),
        "first_nonfinite": m.fault or (g.nonfinite_param if g else None), **causes.aux_fields(m, ref), **m.extra,
    }


__all__ = ["Guard", "Judge", "Measured", "UserCodeExit", "report_fields", "carried_aux"]
