"""The audit: plan the paths, build the model and batch, take the reference, run every path on
every layout and hand what each measured to the judge. Returns a Report; writes nothing.

Every layout is also run through lossaudit's own correct reduction (``num_items``), whatever
paths were asked for: its error is the run's noise floor, and each microbatch's share of the
reference gradient, which it measures, lets the judge test a named cause against a step's
gradient (judge.py, causes.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch

from ..core.batch import Batch, BatchSpec, make_batch
from .config import CheckConfig, parse_value
from ..report.environment import environment
from ..core.errors import EnvironmentProblem, UsageError
from .faults import out_of_memory_is_environmental
from ..core.finite import has_nonfinite
from ..core.forward import forward
from ..core.accumulate import SIXTEEN_BIT, GradientSum, Hooks
from ..core.grads import difference_rows, dots, raw_products, summarize, trainable
from .judge import Guard, Judge, Measured, report_fields
from ..core.layouts import Layout, microbatches, plan_layouts
from ..models.loading import LoadedModel, load_model
from ..core.moe import AuxAccumulator
from ..core.objective import Objective
from ..core.pairs import MIN_PAIR_LENGTH, make_pair_batch, pair_layouts
from ..paths import PATHS, AuditContext, Contribution, LogitPath, MicrobatchView, Outcome, StepPath
from .memory import ResidentMeter, release_free_heap, resident_bytes
from .passes import Footprint, param_blocks, plan_for, unheld
from ..paths.grpo import grpo_batch
from ..paths.pairs import PairMeanPath
from ..paths.reduction import ReductionPath
from ..core.reductions import REDUCTIONS, StepTokens
from ..core.reference import compute_reference
from ..core.wrapped import virtual_tokens
from ..stacks.peft import wrap_loaded
from ..stacks.trl import declared_aggregation, resolve_trainer_class
from .tolerance import Tolerance
from ..report.report import CASE_COLUMNS, Report
from ..core.tokens import prepend_ignored, target_mask

Progress = Callable[[str], None]


def selected_paths(config: CheckConfig, task: str, objective: Objective | None = None) -> list[str]:
    """The paths asked for, or by default every one that applies to the task and the config
    (under a declared objective other than the token mean, those whose code can declare it).
    Decided before any model is built."""
    objective = objective or config.objective
    if config.paths is None:
        return [name for name in PATHS if task in PATHS.get(name).tasks and not PATHS.get(name).missing()
                and PATHS.get(name).unavailable(config) is None
                and (objective.token_mean or PATHS.get(name).declares(config, objective))]
    for name in config.paths:
        spec = PATHS.get(name)
        if task not in spec.tasks:
            raise UsageError(f"path {name!r} does not apply to task {task}")
        if objective.pairwise and not spec.declares(config, objective):
            raise UsageError(f"--path {name}: computes token cross entropy, not the pair objective "
                             f"{objective.aggregation.spec}")
        if spec.missing():
            raise EnvironmentProblem(f"path {name!r} needs {', '.join(spec.missing())}: pip install {' '.join(spec.missing())}")
        reason = spec.unavailable(config)
        if reason:
            raise UsageError(f"--path {name}: {reason}")
    return list(config.paths)


def prepare(config: CheckConfig, loaded: LoadedModel | None = None) -> AuditContext:
    """Build (or take ``loaded``: a model the caller built) the model, the batch and the reference."""
    if loaded is None:
        overrides = {k: parse_value(v) for k, v in config.config_args}
        loaded = load_model(config.model, task=config.task, seed=config.seed, config_overrides=overrides,
                            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code,
                            allow_download=config.allow_download, num_layers=config.num_layers)
    loaded = wrap_loaded(loaded, adapter=config.adapter, method=config.peft,  # --adapter / --peft
                         args={k: parse_value(v) for k, v in config.peft_args}, seed=config.seed,
                         allow_download=config.allow_download, allow_pickle=config.allow_pickle)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("--device cuda: no CUDA device is available")
    meter = cpu_meter(loaded.model) if device.type == "cpu" else None
    model = loaded.model.to(device=device, dtype=getattr(torch, config.dtype))
    model.train()  # dropout is 0 in tiny configs; train mode as a real step runs
    objective = declared_objective(config)
    batch = grpo_batch(config, loaded) or batch_for(loaded, config.batch_spec, pairs=objective.pairwise)
    params = trainable(model)
    reference = compute_reference(model, batch, params, device, objective=objective)
    return AuditContext(model, batch, reference, params, device, config, loaded, objective=objective, memory=meter)


def cpu_meter(model: torch.nn.Module) -> ResidentMeter:
    """What the audit holds on the CPU from here: the process's resident memory beyond what it
    held before, the model's weights counted as the audit's (as a device counts them) when the
    caller built it already."""
    held = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu")
    release_free_heap()  # what the audit allocates into memory freed before it shows
    return ResidentMeter(start=max(resident_bytes() - held, 0))


def declared_objective(config: CheckConfig) -> Objective:
    """What the run's paths mean to compute: --objective, or what --trainer-class declares (DPO's
    pair mean; stacks/trl.DECLARED); given both, they must agree."""
    if not config.trainer_class:
        return config.objective
    declared = declared_aggregation(resolve_trainer_class(config.trainer_class), config.trainer_values)
    if declared is None:
        return config.objective
    if config.aggregation is not None and config.aggregation != declared:
        raise UsageError(f"--objective {config.aggregation.spec}: --trainer-class {config.trainer_class} "
                         f"declares {declared.spec} ({declared.describe()})")
    return dataclasses.replace(config.objective, aggregation=declared)


def batch_for(loaded: LoadedModel, spec: BatchSpec, *, pairs: bool = False) -> Batch:
    """The audit's batch for ``loaded``: its vocabulary, special ids, task and labels; with
    ``pairs``, ``spec.batch_size`` preference pairs (core/pairs.py)."""
    if pairs:
        if loaded.task != "causal-lm" or spec.max_length < MIN_PAIR_LENGTH:
            raise UsageError(f"a pair objective needs a causal LM and --max-length >= {MIN_PAIR_LENGTH}")
        return make_pair_batch(spec, vocab_size=loaded.vocab_size, pad_id=loaded.pad_id,
                               eos_id=loaded.pad_id if loaded.eos_id is None else loaded.eos_id)
    return make_batch(spec, vocab_size=loaded.vocab_size, pad_id=loaded.pad_id, task=loaded.task,
                      num_labels=loaded.num_labels, decoder_start_id=loaded.decoder_start_id, eos_id=loaded.eos_id)


@dataclass
class _Step:
    """A logit path's running sums over one layout's microbatches. Its gradient is ``factor``
    x ``sum``: proportional reductions share one sum (num_items and sum: factor N). Where the
    parameters run in blocks (``blocks``), each block's sum is compared and freed before the
    next, its comparison rows kept in ``rows``."""

    sum: GradientSum
    factor: float = 1.0
    loss: float = 0.0
    aux: float | None = None
    # per microbatch: [n x scale, gradient . correct gradient, correct . correct, own]: a weight,
    # its dot products summed over the blocks of parameters (own: a loss of its own)
    parts: dict[int, list] = field(default_factory=dict)
    projection: float = 0.0  # the step's gradient . the reference, summed from each microbatch's exact product
    rows: list = field(default_factory=list)  # per block: (names, difference rows, (G.G, G.r)) once compared

    @property
    def weights(self) -> list[float]:
        return [(coef * along / kept2 if kept2 else math.nan) if own else coef
                for coef, along, kept2, own in self.parts.values()]

    def compare_block(self, reference, norms: dict, cache: dict) -> None:
        """Compare this block's sum with the reference and keep only the rows (blocks mode)."""
        key = (id(self.sum), self.factor)
        if key not in cache:
            items = [(n, t) for n, t in self.sum.items()]
            f = self.factor * (self.sum.unit or 1.0)
            cache[key] = ([n for n, _ in items], difference_rows(reference, items, f, norms),
                          raw_products(reference, items, f))
        self.rows.append(cache[key])

    def outcome(self, path: LogitPath, layout: Layout, note: str, reference_norm2: float) -> Outcome:
        # a 16-bit sum rounds each addition; its scale is then read from the products instead
        scale = self.projection / reference_norm2 if self.sum.narrow and reference_norm2 else None
        compared = None
        if self.rows:  # compared block by block: the sums are gone
            names = [n for names, _, _ in self.rows for n in names]
            far = (sum(r[2][0] for r in self.rows), sum(r[2][1] for r in self.rows))
            compared = summarize(names, torch.cat([rows for _, rows, _ in self.rows]), lambda: far)
        return Outcome(path.label, layout, self.loss, [] if self.rows else list(self.sum.items()), note=note,
                       aux=self.aux, weights=[w for w in self.weights if math.isfinite(w)] or None,
                       gradient_factor=self.factor * (self.sum.unit or 1.0), scale=scale, compared=compared)


def _sums(paths: list[LogitPath], params) -> dict[int, _Step]:
    """One _Step per path; paths whose uniform weights are proportional share one GradientSum,
    filled with the first one's weights (its factor 1, the others' the ratio of theirs)."""
    steps: dict[int, _Step] = {}
    groups: list[tuple[list[float], GradientSum]] = []
    for path in paths:
        weights = path.uniform_weights()
        for first, shared in groups if weights is not None else ():
            factor = _ratio(weights, first)
            if factor is not None:
                steps[id(path)] = _Step(shared, factor)
                break
        else:
            steps[id(path)] = _Step(GradientSum(params))
            if weights is not None:
                groups.append((weights, steps[id(path)].sum))
    return steps


def _ratio(weights: list[float], first: list[float]) -> float | None:
    """c with weights == c x first (relative 1e-12), when both are finite and first has no zero."""
    if len(weights) != len(first) or not all(math.isfinite(w) and math.isfinite(f) and f for w, f in zip(weights, first)):
        return None
    c = weights[0] / first[0]
    return c if all(abs(w - c * f) <= 1e-12 * abs(w) for w, f in zip(weights, first)) else None


def run_layout(ctx: AuditContext, layout: Layout, paths: list[LogitPath], guard: Guard,
               seen: Callable[[Outcome], None] = lambda outcome: None, blocks: int = 1) -> list[Measured]:
    """One forward per microbatch, shared by every logit path; one backward per distinct scalar,
    its gradients taken by hooks into the paths' sums as they come (accumulate.py).

    ``blocks`` > 1 (to fit a memory budget; not with an MoE aux target): the layout's
    microbatches run once per block of parameters, the gradient taken for that block only,
    each block's sums compared and freed before the next; the dot products that weigh a
    microbatch are summed over the blocks.

    ``paths`` must hold one that calibrates (the correct reduction). A path that raises becomes
    its error case and the others go on; a forward that raises fails the paths that needed it.
    The first non-finite logits are named on every case. ``seen`` gets each outcome first."""
    judge = guard.judge
    mbs = microbatches(ctx.batch, layout)
    prefix = virtual_tokens(ctx.model)  # PEFT prompt tuning scores its virtual positions too
    step = StepTokens(tuple(target_mask(prepend_ignored(mb.labels, prefix), ctx.batch.task) for mb in mbs))
    failed: dict[int, str] = {}  # id(path) -> one-line reason
    reference_all = [ctx.reference.grads[n] for n, _ in ctx.params]
    norm2 = dots(reference_all, reference_all)
    blocks_of = param_blocks(ctx.params, 1 if ctx.reference.aux else blocks)
    projections: dict[int, float] = {}  # per microbatch: the token sum's gradient . the reference
    aux = AuxAccumulator(ctx.reference.aux, ctx.params, len(layout.groups)) if ctx.reference.aux else None
    fault, steps = None, {}
    for number, block in enumerate(blocks_of):
        params = [ctx.params[i] for i in block]
        for path in paths:
            if id(path) not in failed:
                _, reason = guard.call(f"the {path.label.path} path", path.start, ctx, layout, step)
                if reason is not None:
                    failed[id(path)] = reason
        live_paths = [p for p in paths if id(p) not in failed]  # a path whose start failed has none
        if number == 0:
            steps = _sums(live_paths, params)
        else:  # the same steps, a fresh sum per distinct sum for this block
            fresh: dict[int, GradientSum] = {}
            for s in steps.values():
                s.sum = fresh.setdefault(id(s.sum), GradientSum(params))
        with Hooks(params, [reference_all[i] for i in block]) as hooks:
            for index, mb in enumerate(mbs):
                live = [p for p in paths if id(p) not in failed]
                if not live:
                    break
                where = f"microbatch {index + 1} of {len(mbs)}"
                view = _shared_forward(ctx, index, mb, step, live, failed, guard, where)
                if view is None:
                    continue
                if fault is None and has_nonfinite(view.outputs.logits):
                    fault = f"NaN/Inf in the logits of {where}"
                if aux:
                    aux.add(view.outputs, mb.attention_mask, hooks)
                share = _contribute(view, [p for p in live if id(p) not in failed], steps, hooks, failed, guard, where,
                                    first=number == 0)
                view = None  # the microbatch's outputs go before the next forward (its graph went in its last backward)
                projections[index] = projections.get(index, 0.0) + share
        if len(blocks_of) > 1:  # compare this block's sums, then free them
            cache: dict = {}
            for path in paths:
                if id(path) not in failed and id(path) in steps:
                    steps[id(path)].compare_block(ctx.reference.grads, judge.norms, cache)
            for s in steps.values():
                s.sum.tensors = [None] * len(s.sum.tensors)
            cache = None
    shares = [projections[i] / (step.total * norm2) if norm2 and step.total else math.nan for i in sorted(projections)]
    judge.learn(layout, shares if len(shares) == len(mbs) else None, aux.result() if aux else None)
    measured, shared = [], {}  # shared: products of the sums' tensors, read once for every path on a sum
    for path in paths:
        if id(path) not in failed:
            note, reason = guard.call(f"the {path.label.path} path", path.note)
            if reason is None:
                outcome = steps[id(path)].outcome(path, layout, note, norm2)
                seen(outcome)
                measured.append(judge.measure(outcome, fault=fault, raw=shared))
                continue
            failed[id(path)] = reason
        measured.append(judge.failed(path.label, layout, failed[id(path)]))
    return measured


def _contribute(view: MicrobatchView, live: list[LogitPath], steps: dict[int, _Step], hooks: Hooks, failed, guard,
                where, first: bool = True) -> float:
    """Each live path's contribution on one microbatch: its gradient (into its sum), loss and
    weight. The token sum's backward feeds every path that backs it (once per shared sum);
    a path with a loss of its own gets its own backward. Returns the token sum's gradient .
    the reference (over ``hooks``' parameters). ``first``: the first block of parameters (the
    losses are taken once)."""
    n = view.step.total
    given: dict[int, Contribution] = {}
    for path in live:
        c, reason = guard.call(f"the {path.label.path} path in {where}", path.microbatch, view)
        if reason is None and not (isinstance(c, Contribution) and isinstance(c.loss, torch.Tensor) and c.loss.dim() == 0):
            reason = f"the {path.label.path} path in {where} gave {type(getattr(c, 'loss', c)).__name__}, not a scalar tensor"
        if reason is not None:
            failed[id(path)] = reason
        else:
            given[id(path)] = c
    shared = [p for p in live if id(p) in given and given[id(p)].loss is view.token_sum]
    own = [p for p in live if id(p) in given and given[id(p)].loss is not view.token_sum]
    # in 16 bits, backwarded as token_sum / N, the correct share itself: its logit gradient then
    # rounds as the reference's does (the token sum's own, p - 1 per target, rounds ~0.2 % low in
    # bf16). Wider dtypes keep the token sum's backward and their numbers: its float32 rounding in
    # float64 runs (RMSNorm, rotary) is the noise that lets transformers' float32 loss code pass
    unit = 1.0 / n if n and hooks.params and hooks.params[0].dtype in SIXTEEN_BIT else 1.0
    sinks = {id(steps[id(p)].sum): (steps[id(p)].sum, given[id(p)].scale / (unit * steps[id(p)].factor)) for p in shared}
    token_sum = float(view.token_sum.detach())
    loss = view.token_sum * unit if unit != 1.0 else view.token_sum
    correct = hooks.backward(loss, list(sinks.values()), keep=bool(own), last=not own)
    projection = correct.results()[0] / unit  # the token sum's gradient . the reference
    for path in shared:
        c, s = given[id(path)], steps[id(path)]
        s.projection += c.scale * projection
        if first:
            s.loss += token_sum * c.scale
            s.parts[view.index] = [n * c.scale if view.step.counts[view.index] else math.nan, 0.0, 0.0, False]
            _carry(s, c)
    norm2 = dots(correct.kept, correct.kept) / unit if own else 0.0  # (its gradient . the correct share) x N
    for path in own:
        c, s = given[id(path)], steps[id(path)]
        b, reason = guard.call(f"the backward of {path.label.path} in {where}", hooks.backward, c.loss,
                               [(s.sum, c.scale)], False, correct.kept, path is own[-1])
        if reason is not None:
            failed[id(path)] = reason
            continue
        along_reference, along_correct = b.results()
        s.projection += c.scale * along_reference
        terms = s.parts.setdefault(view.index, [n * c.scale, 0.0, 0.0, True])
        terms[1] += along_correct
        terms[2] += norm2
        if first:
            s.loss += float(c.loss.detach()) * c.scale
            _carry(s, c)
    return projection


def _carry(s: _Step, c: Contribution) -> None:
    if c.aux is not None:
        s.aux = (s.aux or 0.0) + c.aux


def _shared_forward(ctx, index, mb, step, live, failed, guard, where) -> MicrobatchView | None:
    """The microbatch's forward, or None when every live path failed.

    With labels the model runs its own loss code; if that raises, only the paths that asked
    for it fail and the forward is tried again without labels for the rest."""
    wants = [p for p in live if p.wants_labels]
    for with_labels in ([True, False] if wants else [False]):
        if all(id(p) in failed for p in live):
            return None
        what = f"the forward of {where}{' with labels' if with_labels else ''}"
        result, reason = guard.call(what, _forward, ctx, mb, step, with_labels)
        if reason is None:
            outputs, losses, rejected = result
            return MicrobatchView(index, mb, outputs, losses, losses.sum(), step, rejected)
        for path in (wants if with_labels else [p for p in live if id(p) not in failed]):
            failed[id(path)] = reason
    return None


def _forward(ctx, mb, step, with_labels):
    outputs, rejected = forward(ctx.model, mb, ctx.device, with_labels=with_labels,
                                num_items_in_batch=step.total if with_labels else None)
    labels = prepend_ignored(mb.labels, virtual_tokens(ctx.model)).to(ctx.device)
    return outputs, ctx.objective.token_losses(outputs.logits, labels, ctx.batch.task), rejected


def calibration(objective: Objective = Objective()) -> LogitPath:
    """lossaudit's own correct reduction of the declared objective, run on every layout (its cases
    are reported only when the reduction path was asked for)."""
    if objective.token_mean:
        return ReductionPath.of(REDUCTIONS.get("num_items"))
    if objective.pairwise:
        return PairMeanPath(objective)
    return ReductionPath(objective.reduction(), calibrates=True)


def audit(config: CheckConfig, progress: Progress | None = None, *, loaded: LoadedModel | None = None) -> Report:
    """Plan the paths, build the model (or take ``loaded``) and batch, then run every case.
    Out of memory ends the run with one message naming the knobs (exit 3)."""
    with out_of_memory_is_environmental(config):
        (progress or (lambda _msg: None))(f"building {config.model}")
        return run_cases(prepare(config, loaded), progress)


@dataclass
class Judged:
    """Every case of a run, measured, with the judge and the tolerance the run's noise gave."""

    measured: list[Measured]
    judge: Judge
    tolerance: Tolerance

    def verdicts(self) -> list[tuple[Measured, str, str]]:
        return [(m, *self.judge.verdict(m, self.tolerance)) for m in self.measured]


def run_paths(ctx: AuditContext, layouts: list[Layout], paths: list, say: Progress = lambda _msg: None) -> Judged:
    """Run ``paths`` (logit and step paths) on every layout, beside the correct reduction."""
    logit_paths = [p for p in paths if isinstance(p, LogitPath)]
    step_paths = [p for p in paths if isinstance(p, StepPath)]
    hidden = [] if any(p.label.calibrates for p in logit_paths) else [calibration(ctx.objective)]
    guard = Guard(Judge(ctx))
    # more than one pass, or blocks of parameters, where the sums would not fit the memory
    footprint = Footprint.of(ctx, bool(step_paths))  # measured once: the plan, the refusal, the judge's references
    runs, blocks = plan_for(ctx, logit_paths + hidden, bool(step_paths), footprint)
    order = {id(p.label): i for i, p in enumerate(logit_paths + hidden)}
    if len(runs) > 1:
        say(f"the logit paths' gradient sums run in {len(runs)} passes over each layout, to fit the memory")
    if (over := unheld(ctx, runs, bool(step_paths), blocks, footprint)) is not None:
        raise UsageError(over)
    if blocks and blocks > 1:
        say(f"the parameters run in {blocks} blocks to fit {footprint.describe()}: each layout's microbatches run "
            f"{blocks} times, one block's gradient sums held at a time")
    if footprint is not None and footprint.default:  # keep another objective's reference where the target has room
        guard.judge.keep_others = footprint.other_bytes(ctx) <= footprint.budget
    if footprint is not None and not guard.judge.keep_others:  # else take it in blocks where a whole one does not fit
        guard.judge.other_blocks = footprint.other_blocks(ctx)
    measured: list[Measured] = []
    for i, layout in enumerate(layouts):
        say(f"[{i + 1}/{len(layouts)}] {layout.name}")
        cases = [m for paths_of_pass in runs for m in run_layout(ctx, layout, paths_of_pass, guard, blocks=blocks or 1)]
        measured += sorted(cases, key=lambda m: order[id(m.label)])
        guard.judge.release_aux()  # the layout's aux target gradient: its cases are measured
    for path in step_paths:
        measured += path.run_layouts(ctx, layouts, guard, say)
        guard.judge.release_aux()
    tolerance = guard.judge.tolerance(measured)
    shown = [m for m in measured if not any(m.label is h.label for h in hidden)]
    return Judged(shown, guard.judge, tolerance)


def run_cases(ctx: AuditContext, progress: Progress | None = None) -> Report:
    config = ctx.config
    paths = [p for name in selected_paths(config, ctx.batch.task, ctx.objective) for p in PATHS.get(name).build(config)]
    layouts = pair_layouts(ctx.batch, config.ks, config.paddings) if ctx.objective.pairwise else \
        plan_layouts(ctx.batch, config.ks, paddings=config.paddings, groupings=config.groupings,
                     world_size=config.world_size)
    judged = run_paths(ctx, layouts, paths, progress or (lambda _msg: None))
    rows = [report_fields(m, judged.judge, judged.tolerance) for m in judged.measured]
    cases = pd.DataFrame(rows) if rows else pd.DataFrame(columns=CASE_COLUMNS)
    cases = cases[CASE_COLUMNS + [c for c in cases.columns if c not in CASE_COLUMNS]]
    return Report(
        environment=environment(device=config.device, dtype=config.dtype, seed=config.seed),
        model={"name": config.model, "task": ctx.batch.task, "parameters": sum(p.numel() for p in ctx.model.parameters()),
               "source": ctx.loaded.source if ctx.loaded else "object", "class": type(ctx.model).__name__,
               **objective_fields(ctx.objective, cases)},
        cases=cases,
        tolerance=judged.tolerance.to_dict(),
        batch={"sequences": len(ctx.batch), "lengths": ctx.batch.lengths, "targets": ctx.batch.targets,
               "target_tokens": ctx.reference.count, "reference_loss": ctx.reference.loss,
               **({"reference_aux_loss": ctx.reference.aux.value, "aux_coef": ctx.reference.aux.spec.coef}
                  if ctx.reference.aux else {}),
               "objective": ctx.objective.describe()},
        tensor_errors=worst_tensor_errors(cases, judged.measured),
    )


def objective_fields(objective: Objective, cases: pd.DataFrame) -> dict:
    """The report's objective: the run's declared one, or, where the cases each name the objective
    their trainer computes (GRPO's loss types: a policy-gradient term, not cross entropy), theirs."""
    names = ("objective", "aggregation", "aggregation_doc")
    if cases.empty or not set(names) <= set(cases.columns) or cases["objective"].isna().any():
        return objective.fields()
    own = {name: sorted(set(cases[name])) for name in names}
    return {name: values[0] if len(values) == 1 else "; ".join(values) for name, values in own.items()}


def worst_tensor_errors(cases: pd.DataFrame, measured: list[Measured]) -> list[dict]:
    """Per-tensor errors for the worst finding and for the expected case that bends the
    gradient's direction most (lowest cosine); only these are kept, as plain floats."""
    has_grads = cases["grad_rel_err"].map(lambda e: isinstance(e, float) and math.isfinite(e))
    diverging = cases[has_grads & (cases["verdict"] == "diverge")]
    findings = diverging[~diverging["expected"]].sort_values("grad_rel_err", ascending=False)
    expected = diverging[diverging["expected"]].sort_values(["grad_cosine", "grad_rel_err"], ascending=[True, False])
    kept = []
    for frame in (findings, expected):
        if len(frame):
            row, grads = frame.iloc[0], measured[frame.index[0]].grads
            kept.append({**{k: row[k] for k in TENSOR_CASE_KEYS}, "tensors": [list(t) for t in grads.per_tensor]})
    return kept


TENSOR_CASE_KEYS = ("path", "reduction", "microbatches", "grouping", "padding", "world_size",
                    "verdict", "expected", "grad_rel_err", "grad_cosine")
