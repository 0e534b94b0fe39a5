"""The sweep: every model type of the installed transformers, per task, built tiny and
audited on a small set of layouts, one row per (model type, task, path).

``audit_model`` runs inside a worker process (``lossaudit.sweep.workers``) and never raises: a
model that cannot be built or run comes back as skip rows naming why. The worker pool
turns a crash, a hang or a blown memory cap into skip rows too.
"""

from __future__ import annotations

import math
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field

from ..audit.options import TASKS
from .workers import CRASH, MEMORY, TIMEOUT, WorkerPool

PASS, FINDING, SKIP = "pass", "finding", "skip"

# The layouts of a sweep: the full batch (k=1) and four microbatches grouped by target
# count (the widest spread of token counts), each padded right and left.
SWEEP_MICROBATCHES = (1, 4)
SWEEP_GROUPINGS = ("imbalanced",)
SWEEP_PADDINGS = ("right", "left")

ROW_COLUMNS = ["model_type", "task", "path", "status", "reason", "grad_rel_err", "loss_rel_err", "worst_layout",
               "cause", "note", "padding_sensitive", "reduction_grad_rel_err", "rtol", "parameters", "model_class",
               "seconds", "detail"]


# Model types the auto mapping lists that are not text models a token batch can audit.
NOT_AUDITABLE = {
    "musicgen": "not a text model: its causal-LM head scores audio codebooks (input_ids of batch x codebooks)",
    "musicgen_melody": "not a text model: its causal-LM head scores audio codebooks (input_ids of batch x codebooks)",
    "gemma4_assistant": "a speculative-decoding draft model: every layer reads the target model's key/value cache",
    "gemma4_unified_assistant": "a speculative-decoding draft model: every layer reads the target model's key/value cache",
    "reformer": "needs every sequence length to be a multiple of its attention chunk length in training",
}


# Why a model type's findings happen, read in its modeling code (transformers 5.23); shown
# beside the automatic reason. A note never changes a status.
_UNSHIFTED = ("its ForCausalLM loss is CrossEntropyLoss(logits, labels) at the same positions: no label shift "
              "(labels must come pre-shifted, unlike other causal LMs) and a per-call mean without num_items_in_batch")
_RECURRENT = "a recurrent model: its state runs through left padding, which the attention mask does not reset"
NOTES = {
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart", "mvp",
                     "trocr", "whisper", "bigbird_pegasus", "cpmant"), _UNSHIFTED),
    "xlnet": "XLNetLMHeadModel scores each label at its own position: no label shift",
    "xlm": "XLM's prediction layer scores each label at its own position: no label shift",
    "prophetnet": "its loss adds the n-gram streams' future-token losses (and label smoothing) to the next-token loss",
    **dict.fromkeys(("rwkv", "xlstm", "recurrent_gemma"), _RECURRENT),
}


@dataclass(frozen=True)
class Job:
    """One model type and task to audit on ``paths`` (picklable: it crosses to a worker)."""

    model_type: str
    task: str
    paths: tuple[str, ...]
    seed: int = 0
    dtype: str = "float32"


def mapping_names(task: str) -> dict[str, str]:
    """model_type -> class name of the installed transformers' auto mapping for ``task``."""
    from transformers.models.auto import modeling_auto as auto

    return dict({
        "causal-lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "seq2seq": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "token-classification": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "sequence-classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }[task])


def plan_jobs(tasks: tuple[str, ...], paths: tuple[str, ...], types: tuple[str, ...] | None = None,
              seed: int = 0, dtype: str = "float32") -> list[Job]:
    """A job per model type the auto mapping of each task lists (or per type of ``types``
    that it lists), each with the paths that apply to the task."""
    from ..paths import PATHS  # lazy: this module's row schema is read by compare, which needs no torch
    jobs = []
    for task in tasks:
        names = mapping_names(task)
        chosen = [t for t in (types or sorted(names)) if t in names]
        applicable = tuple(p for p in paths if task in PATHS.get(p).tasks)
        jobs += [Job(t, task, applicable, seed, dtype) for t in chosen if applicable]
    return jobs


def worker_setup() -> None:
    """Once per worker: the heavy imports, one thread (jobs use the cores), quiet libraries."""
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from ..audit import harness  # noqa: F401  lazy: every path registered, after this worker's warning filter

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()


def audit_model(job: Job) -> list[dict]:
    """Rows for one job; never raises (an error becomes skip rows that say where it happened)."""
    started = time.monotonic()
    if job.model_type in NOT_AUDITABLE:
        return skip_rows(job, NOT_AUDITABLE[job.model_type], 0.0)
    try:
        from ..models.tiny import tiny_config  # lazy: as above, torch waits for a sweep

        tiny_config(job.model_type)
    except Exception as exc:
        return skip_rows(job, skip_reason(exc, building=True), time.monotonic() - started)
    try:
        report = _audit(job)
    except Exception as exc:
        return skip_rows(job, skip_reason(exc, building=False), time.monotonic() - started)
    return rows_from_report(job, report, time.monotonic() - started)


def _audit(job: Job):
    import lossaudit  # lazy: as above
    return lossaudit.check(
        job.model_type, task=job.task, paths=[*job.paths, "reduction"], reductions=["num_items"],
        microbatches=list(SWEEP_MICROBATCHES), groupings=list(SWEEP_GROUPINGS), paddings=list(SWEEP_PADDINGS),
        seed=job.seed, dtype=job.dtype,
    )


_MISSING_PACKAGE = re.compile(r"requires the (\S+) librar|No module named '([^'.]+)")


def skip_reason(exc: BaseException, *, building: bool) -> str:
    message = " ".join(str(exc).split())
    missing = _MISSING_PACKAGE.search(message)
    if isinstance(exc, ImportError) or missing:
        name = next((g for g in missing.groups() if g), "?") if missing else "?"
        return f"needs optional package {name}"
    if "can't allocate memory" in message or isinstance(exc, MemoryError):
        return f"out of memory (the worker's cap): {type(exc).__name__}{_where(exc)}"
    where = _where(exc)
    what = f"{type(exc).__name__}: {message[:300]}{where}"
    return f"cannot be built tiny: {what}" if building else f"crashed while auditing: {what}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    library = [f for f in frames if "transformers" in f.filename]
    frame = (library or frames or [None])[-1]
    return f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""


def skip_rows(job: Job, reason: str, seconds: float) -> list[dict]:
    return [_row(job, path, SKIP, reason, seconds=round(seconds, 2)) for path in job.paths]


def _row(job: Job, path: str, status: str, reason: str, **fields) -> dict:
    row = dict.fromkeys(ROW_COLUMNS)
    row.update(model_type=job.model_type, task=job.task, path=path, status=status, reason=reason, **fields)
    return row


def rows_from_report(job: Job, report, seconds: float) -> list[dict]:
    cases = report.cases
    rtol = report.tolerance["rtol"]
    diagnostic = cases[(cases["path"] == "reduction")]
    sensitive = diagnostic[diagnostic["verdict"] != "match"]
    rows = []
    for path in job.paths:
        mine = cases[cases["path"] == path]
        if mine.empty:
            rows.append(_row(job, path, SKIP, f"the {path} path gave no cases", seconds=round(seconds, 2)))
            continue
        if (mine["verdict"] == "error").all():  # nothing measured (e.g. git's loss wants image positions)
            rows.append(_row(job, path, SKIP, f"every case failed: {mine.iloc[0]['detail']}",
                             seconds=round(seconds, 2)))
            continue
        worst = mine.sort_values("grad_rel_err", ascending=False, na_position="first").iloc[0]
        bad = mine[mine["verdict"] != "match"]
        status = FINDING if len(bad) else PASS
        cause, reason = classify(bad, sensitive) if len(bad) else ("", "")
        rows.append(_row(
            job, path, status, reason,
            grad_rel_err=_num(mine["grad_rel_err"].max()), loss_rel_err=_num(mine["loss_rel_err"].max()),
            worst_layout=_layout(worst), cause=cause or None, note=NOTES.get(job.model_type) if len(bad) else None,
            padding_sensitive=bool(len(sensitive)),
            reduction_grad_rel_err=_num(diagnostic["grad_rel_err"].max()), rtol=rtol,
            parameters=report.model["parameters"], model_class=report.model.get("class"),
            seconds=round(seconds, 2), detail=str(worst["detail"] or "")[:500],
        ))
    return rows


def classify(bad, sensitive) -> tuple[str, str]:
    """Why a path's cases diverge. A layout where lossaudit's own correct reduction of the
    model's logits diverges too shows a padding-sensitive model (no loss can match there);
    a divergence on any other layout is the path's own step (the model's loss on the model path;
    on the trainer path it may be the Trainer's count, which the case's detail names)."""
    moved = set(zip(sensitive["microbatches"], sensitive["padding"]))
    own = bad[[(k, p) not in moved for k, p in zip(bad["microbatches"], bad["padding"])]]
    causes, reasons = [], []
    if len(own):
        full = own[own["microbatches"] == 1]
        case = (full if len(full) else own.sort_values("grad_rel_err", ascending=False)).iloc[0]
        causes.append("loss-definition" if len(full) else "loss-reduction")
        reasons.append(("the step differs from the token mean even on the full batch: " if len(full)
                        else "the step is reduced wrongly across microbatches: ")
                       + f"{case['detail']} ({_layout(case)})")
    if len(sensitive):
        causes.append("padding-sensitive")
        reasons.append(_sensitivity(sensitive))
    return "+".join(causes), "; ".join(reasons)


def _sensitivity(sensitive) -> str:
    sides = f"pad-{'/'.join(sorted(set(sensitive['padding'])))}"
    errors = sensitive[sensitive["verdict"] == "error"]
    if len(errors):  # e.g. NaN gradients from a fully masked attention row of a pad position
        return (f"under {sides} even lossaudit's own correct reduction of the model's logits fails: "
                f"{errors.iloc[0]['detail']}")
    worst = _num(sensitive["grad_rel_err"].max())
    return (f"the model's logits depend on the layout ({sides}): lossaudit's own correct reduction of them "
            f"diverges too" + (f" (grad error up to {worst:.2g})" if worst is not None else "") + ", so no loss can match there")


def _layout(case) -> str:
    return f"k={case['microbatches']} {case['grouping']} pad-{case['padding']}"


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class Sweep:
    """Every row of one sweep, with its environment and settings."""

    environment: dict
    settings: dict
    rows: list[dict] = field(default_factory=list)

    @property
    def findings(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == FINDING]

    @property
    def exit_status(self) -> int:
        return 1 if self.findings else 0

    def counts(self, task: str | None = None) -> dict[str, int]:
        """Model types by outcome: a type passes only when every audited path passes."""
        by_type: dict[tuple, set] = {}
        for r in self.rows:
            if task is None or r["task"] == task:
                by_type.setdefault((r["model_type"], r["task"]), set()).add(r["status"])
        outcome = [FINDING if FINDING in s else SKIP if SKIP in s else PASS for s in by_type.values()]
        return {s: outcome.count(s) for s in (PASS, FINDING, SKIP)} | {"types": len(outcome)}

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "environment": self.environment, "settings": self.settings,
                "summary": {task: self.counts(task) for task in TASKS if any(r["task"] == task for r in self.rows)},
                "rows": self.rows}


SCHEMA = "lossaudit.sweep/1"


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (TASKS.index(r["task"]), r["model_type"], r["path"]))


def settings_dict(**values) -> dict:
    return {"microbatches": list(SWEEP_MICROBATCHES), "groupings": list(SWEEP_GROUPINGS),
            "paddings": list(SWEEP_PADDINGS), "diagnostic": "reduction:num_items", **values}


def failure_reason(outcome) -> str:
    """The skip reason of a job its worker did not finish (see ``lossaudit.sweep.workers``)."""
    return {
        TIMEOUT: f"timed out: {outcome.detail}",
        MEMORY: f"out of memory (the worker's cap): {outcome.detail}",
        CRASH: f"crashed: {outcome.detail}",
    }.get(outcome.failure, f"crashed while auditing: {outcome.detail}")


def run_sweep(jobs: list[Job], *, workers: int, limits, progress=None,
              auditor: str = "lossaudit.sweep.run:audit_model") -> list[dict]:
    """Rows of every job, each audited in an isolated worker. ``progress(job, rows)`` is
    called as each job ends."""
    rows: list[dict] = []

    def done(outcome) -> None:
        job = outcome.item
        new = outcome.value if outcome.failure is None else skip_rows(job, failure_reason(outcome), outcome.seconds)
        rows.extend(new)
        if progress:
            progress(job, new)

    pool = WorkerPool(auditor, jobs=workers, limits=limits, setup="lossaudit.sweep.run:worker_setup")
    pool.run(jobs, done)
    return sort_rows(rows)
