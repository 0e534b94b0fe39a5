"""The audit: build the model and batch, take the reference, run every path on every
layout, judge each case. Returns a Report; writes nothing (the CLI does)."""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd
import torch

from .aux import AuxAccumulator, aux_fields
from .batch import Batch, BatchSpec, make_batch
from .config import CheckConfig, parse_value
from .environment import environment
from .errors import EnvironmentProblem, UsageError
from .faults import has_nonfinite, must_propagate, one_line, out_of_memory_is_environmental
from .forward import forward
from .grads import trainable
from .layouts import Layout, microbatches, plan_layouts
from .models import LoadedModel, load_model
from .paths import PATHS, AuditContext, LogitPath, Measurement, StepPath
from .reference import compute_reference
from .report import CASE_COLUMNS, Report
from .tokens import target_mask
from .reductions import StepTokens
from .verdicts import Tolerance, judge, loss_rel_err, reference_loss, target_loss

Progress = Callable[[str], None]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def prepare(config: CheckConfig, loaded: LoadedModel | None = None) -> AuditContext:
    """Build (or take ``loaded``: a model the caller built) the model, the batch and the reference."""
    if loaded is None:
        overrides = {k: parse_value(v) for k, v in config.config_args}
        loaded = load_model(config.model, task=config.task, seed=config.seed, config_overrides=overrides,
                            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code,
                            allow_download=config.allow_download, num_layers=config.num_layers)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("--device cuda: no CUDA device is available")
    model = loaded.model.to(device=device, dtype=_dtype(config.dtype))
    model.train()  # dropout is 0 in tiny configs; train mode as a real step runs
    batch = batch_for(loaded, config.batch_spec)
    params = trainable(model)
    objective = config.objective
    reference = compute_reference(model, batch, params, device, label_smoothing=objective.label_smoothing)
    return AuditContext(model, batch, reference, params, device, config, loaded, objective=objective)


def batch_for(loaded: LoadedModel, spec: BatchSpec) -> Batch:
    """The audit's batch for ``loaded``: its vocabulary, special ids, task and labels."""
    return make_batch(spec, vocab_size=loaded.vocab_size, pad_id=loaded.pad_id, task=loaded.task,
                      num_labels=loaded.num_labels, decoder_start_id=loaded.decoder_start_id, eos_id=loaded.eos_id)


def selected_paths(config: CheckConfig, task: str) -> list[str]:
    """The paths asked for, or by default every one that applies to the task and the config."""
    if config.paths is None:
        return [name for name in PATHS if task in PATHS.get(name).tasks and not PATHS.get(name).missing()
                and PATHS.get(name).unavailable(config) is None]
    for name in config.paths:
        spec = PATHS.get(name)
        if task not in spec.tasks:
            raise UsageError(f"path {name!r} does not apply to task {task}")
        if spec.missing():
            raise EnvironmentProblem(f"path {name!r} needs {', '.join(spec.missing())}: pip install {' '.join(spec.missing())}")
        reason = spec.unavailable(config)
        if reason:
            raise UsageError(f"--path {name}: {reason}")
    return list(config.paths)


def run_layout(ctx: AuditContext, layout: Layout, logit_paths: list[LogitPath]) -> list[Measurement]:
    """One forward per microbatch, shared by every logit path.

    A path that raises becomes an error case and the others go on; a forward that raises
    fails the paths that needed it. The first non-finite logits are named on every case.
    """
    mbs = microbatches(ctx.batch, layout)
    step = StepTokens(tuple(target_mask(mb.labels, ctx.batch.task) for mb in mbs))
    failed: dict[int, str] = {}  # id(path) -> one-line reason
    for path in logit_paths:
        _attempt(failed, path, "start", path.start, ctx, layout, step)
    aux = AuxAccumulator(ctx, len(layout.groups)) if ctx.reference.aux else None  # all ranks' microbatches
    fault = None
    for index, mb in enumerate(mbs):
        live = [p for p in logit_paths if id(p) not in failed]
        if not live:
            break
        where = f"microbatch {index + 1} of {len(mbs)}"
        shared = _shared_forward(ctx, mb, step, live, failed, where)
        if shared is None:
            continue
        outputs, losses, rejected = shared
        if fault is None and has_nonfinite(outputs.logits):
            fault = f"NaN/Inf in the logits of {where}"
        if aux:
            aux.add(outputs, mb)
        for path in live:
            if id(path) not in failed:
                _attempt(failed, path, where, path.microbatch, index, mb, outputs, losses, rejected)
    if aux and any(id(p) not in failed for p in logit_paths):
        ctx.aux_target = (layout, aux.result())  # read by paths' finish through aux.layout_aux
    measurements = []
    for path in logit_paths:
        done = None if id(path) in failed else _attempt(failed, path, "finish", path.finish)
        if done is None:
            measurements.append(failed_case(ctx, layout, path.name, failed[id(path)]))
            continue
        for m in done:
            m.fault = m.fault or fault
        measurements += done
    return measurements


def _shared_forward(ctx, mb, step, live, failed, where):
    """(outputs, token losses, num_items rejected) or None when every live path failed.

    With labels the model runs its own loss code; if that raises, only the paths that asked
    for it fail and the forward is tried again without labels for the rest."""
    wants = [p for p in live if p.wants_labels]
    for with_labels in ([True, False] if wants else [False]):
        if all(id(p) in failed for p in live):
            return None
        try:
            outputs, rejected = forward(ctx.model, mb, ctx.device, with_labels=with_labels,
                                        num_items_in_batch=step.total if with_labels else None)
            return outputs, ctx.objective.token_losses(outputs.logits, mb.labels.to(ctx.device), ctx.batch.task), rejected
        except Exception as exc:
            if must_propagate(exc):
                raise
            blamed = wants if with_labels else [p for p in live if id(p) not in failed]
            for path in blamed:
                failed[id(path)] = f"forward of {where}{' with labels' if with_labels else ''}: {one_line(exc)}"
    return None


def _attempt(failed: dict[int, str], path, where: str, fn, *args):
    """Call one path's hook; an exception fails that path on this layout only."""
    try:
        return fn(*args)
    except Exception as exc:
        if must_propagate(exc):
            raise
        failed[id(path)] = f"{path.name} path raised in {where}: {one_line(exc)}"
        return None


def failed_case(ctx: AuditContext, layout: Layout, path: str, reason: str) -> Measurement:
    return Measurement.failed(path, layout, ctx.batch, reason)


def run_step_path(ctx: AuditContext, layouts: list[Layout], path: StepPath, say: Progress) -> list[Measurement]:
    """All layouts of one step path. ``StepPath.run_layouts`` isolates each layout; this
    catches what escapes an override of it (a failed start-up), failing every layout."""
    try:
        return path.run_layouts(ctx, layouts, say)
    except Exception as exc:
        if must_propagate(exc):
            raise
        return [failed_case(ctx, layout, path.name, f"{path.name} path raised: {one_line(exc)}") for layout in layouts]


def audit(config: CheckConfig, progress: Progress | None = None, *, loaded: LoadedModel | None = None) -> Report:
    """Build the model (or take ``loaded``) and batch, then run every case. Out of memory ends
    the run with one message naming the knobs (exit 3)."""
    with out_of_memory_is_environmental(config):
        (progress or (lambda _msg: None))(f"building {config.model}")
        return run_cases(prepare(config, loaded), progress)


def run_cases(ctx: AuditContext, progress: Progress | None = None) -> Report:
    say = progress or (lambda _msg: None)
    config = ctx.config
    task = ctx.batch.task
    names = selected_paths(config, task)
    built = [PATHS.get(n).build(config) for n in names]
    logit_paths = [p for p in built if isinstance(p, LogitPath)]
    step_paths = [p for p in built if not isinstance(p, LogitPath)]
    layouts = plan_layouts(ctx.batch, config.ks, paddings=config.paddings, groupings=config.groupings,
                           world_size=config.world_size)
    measurements: list[Measurement] = []
    if logit_paths:
        for i, layout in enumerate(layouts):
            say(f"[{i + 1}/{len(layouts)}] {layout.name}")
            measurements += run_layout(ctx, layout, logit_paths)
    for path in step_paths:
        measurements += run_step_path(ctx, layouts, path, say)
    tolerance = Tolerance.measure(config.dtype, measurements, ctx.reference)
    rows = [_case(m, ctx, tolerance) for m in measurements]
    cases = pd.DataFrame(rows) if rows else pd.DataFrame(columns=CASE_COLUMNS)
    cases = cases[CASE_COLUMNS + [c for c in cases.columns if c not in CASE_COLUMNS]]
    return Report(
        environment=environment(device=config.device, dtype=config.dtype, seed=config.seed),
        model={"name": config.model, "task": task, "parameters": sum(p.numel() for p in ctx.model.parameters()),
               "source": ctx.loaded.source if ctx.loaded else "object", "class": type(ctx.model).__name__},
        cases=cases,
        tolerance=tolerance.to_dict(),
        batch={"sequences": len(ctx.batch), "lengths": ctx.batch.lengths, "targets": ctx.batch.targets,
               "target_tokens": ctx.reference.count, "reference_loss": ctx.reference.loss,
               **({"reference_aux_loss": ctx.reference.aux.value, "aux_coef": ctx.reference.aux.spec.coef}
                  if ctx.reference.aux else {}),
               "objective": ctx.objective.describe()},
        tensor_errors=worst_tensor_errors(cases, measurements),
    )


def worst_tensor_errors(cases: pd.DataFrame, measurements: list[Measurement]) -> list[dict]:
    """Per-tensor errors for the worst finding and for the expected case that bends the
    gradient's direction most (lowest cosine); only these are kept, as plain floats."""
    has_grads = cases["grad_rel_err"].map(lambda e: isinstance(e, float) and math.isfinite(e))
    diverging = cases[has_grads & (cases["verdict"] == "diverge")]
    findings = diverging[~diverging["expected"]].sort_values("grad_rel_err", ascending=False)
    expected = diverging[diverging["expected"]].sort_values(["grad_cosine", "grad_rel_err"], ascending=[True, False])
    kept = []
    for frame in (findings, expected):
        if len(frame):
            row, grads = frame.iloc[0], measurements[frame.index[0]].grads
            kept.append({**{k: row[k] for k in TENSOR_CASE_KEYS}, "tensors": [list(t) for t in grads.per_tensor]})
    return kept


TENSOR_CASE_KEYS = ("path", "reduction", "microbatches", "grouping", "padding", "world_size",
                    "verdict", "expected", "grad_rel_err", "grad_cosine")


def _case(m: Measurement, ctx: AuditContext, tol: Tolerance) -> dict:
    verdict, detail = judge(m, tol, ctx.reference, ctx.batch)
    g = m.grads
    nan = float("nan")
    return {
        "path": m.path, "reduction": m.reduction, "microbatches": m.layout.microbatches,
        "padding": m.layout.padding, "grouping": m.layout.grouping, "world_size": m.layout.world_size,
        "tokens": list(m.counts), "loss": m.loss, "reference_loss": reference_loss(m, ctx.reference),
        "loss_abs_err": abs(m.loss - target_loss(m, ctx.reference)), "loss_rel_err": loss_rel_err(m, ctx.reference),
        "grad_rel_err": g.rel_err if g else nan, "grad_cosine": g.cosine if g else nan,
        "grad_max_abs": g.max_abs if g else nan, "grad_scale": g.scale if g else nan,
        "worst_param": g.worst_param if g else None, "worst_param_rel_err": g.worst_rel_err if g else nan,
        "verdict": verdict, "expected": bool(m.expected), "detail": detail,
        "microbatch_losses": ctx.reference.microbatch_losses(ctx.batch, m.layout),
        "first_nonfinite": m.fault or (g.nonfinite_param if g else None), **aux_fields(m, ctx.reference), **m.extra,
    }
