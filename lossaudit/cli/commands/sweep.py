"""``lossaudit sweep``: every model type of the installed transformers, built tiny and
audited, one isolated worker process per model at a time; a conformance table."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ...core.errors import UsageError
from ...report.terminal import add_color_argument, use_color
from ...audit.options import DTYPES
from ...audit.options import TASKS
from .check import _names, check_out

HELP = "audit every model type of the installed transformers (a conformance table)"
DEFAULT_PATHS = ("model", "trainer")  # those registered are swept by default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="causal-lm", choices=(*TASKS, "all"), help="task to sweep (default causal-lm)")
    p.add_argument("--path", dest="paths", type=_names,
                   help="paths to audit, e.g. model,trainer (default: model and trainer where available)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: the cores)")
    p.add_argument("--out", type=Path, help="directory (default reports/sweep-transformers-VERSION/)")
    p.add_argument("--overwrite", action="store_true", help="replace a sweep already in --out")
    p.add_argument("--types", type=_names, help="only these model types, e.g. llama,gpt2")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model before it is killed (default 120)")
    p.add_argument("--memory", type=int, default=4096, help="MiB of address space per worker (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument("--auditor", default="lossaudit.sweep.run:audit_model", help=argparse.SUPPRESS)  # tests plant crashes
    add_color_argument(p)


def _validate(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ...paths import PATHS

    tasks = TASKS if args.task == "all" else (args.task,)
    paths = args.paths or tuple(p for p in DEFAULT_PATHS if p in PATHS)
    problems = [PATHS.unknown(p) for p in paths if p not in PATHS]
    if args.jobs < 1:
        problems.append("--jobs must be at least 1")
    if args.timeout <= 0:
        problems.append("--timeout must be positive")
    if args.memory < 512:
        problems.append("--memory must be at least 512 MiB (torch alone needs about that)")
    if problems:
        raise UsageError(*problems)
    return tasks, paths


def _unknown_types(types: tuple[str, ...], tasks: tuple[str, ...]) -> None:
    from ...core.registry import did_you_mean
    from ...sweep.run import mapping_names

    known = sorted({t for task in tasks for t in mapping_names(task)})
    unknown = [t for t in types if t not in known]
    if unknown:
        raise UsageError(*(f"--types: {t!r} has no {'/'.join(tasks)} model{did_you_mean(t, known)}" for t in unknown))


def default_out() -> Path:
    from ...report.environment import _version

    return Path("reports") / f"sweep-transformers-{_version('transformers')}"


def run(args: argparse.Namespace) -> int:
    from ...report.environment import environment
    from ...sweep.run import Sweep, plan_jobs, run_sweep, settings_dict
    from ...sweep.report import headline, write_sweep
    from ...sweep.workers import Limits

    tasks, paths = _validate(args)
    out = args.out or default_out()
    check_out(out, args.overwrite, "sweep.json")
    if args.types is not None and not args.types:
        raise UsageError("--types: is empty: name at least one model type")
    if args.types:
        _unknown_types(args.types, tasks)
    jobs = plan_jobs(tasks, paths, args.types, args.seed, args.dtype)
    limits = Limits(timeout_s=args.timeout, memory_bytes=args.memory << 20)
    started = time.monotonic()
    with _progress(len(jobs), color=use_color(sys.stderr, args.color)) as tick:
        rows = run_sweep(jobs, workers=args.jobs, limits=limits, progress=tick, auditor=args.auditor)
    settings = settings_dict(tasks=list(tasks), paths=list(paths), types=list(args.types) if args.types else None,
                             jobs=args.jobs, timeout_s=args.timeout,
                             memory_mib=args.memory, wall_s=round(time.monotonic() - started, 1))
    sweep = Sweep(environment(device="cpu", dtype=args.dtype, seed=args.seed), settings, rows)
    written = write_sweep(sweep, out)
    for task in tasks:
        print(f"lossaudit sweep: {headline(sweep, task)}")
    print(f"sweep: {out}/ ({', '.join(p.name for p in written)}) in {settings['wall_s']:.0f} s")
    return sweep.exit_status


class _progress:
    """A rich bar over the models on a terminal (a plain counter with --no-color); silent when piped."""

    def __init__(self, total: int, *, color: bool, stream=sys.stderr):
        self.total, self.color, self.stream, self.done = total, color, stream, 0
        self.bar = None

    def __enter__(self):
        if not self.stream.isatty():
            return None
        if self.color:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task("sweeping", total=self.total)
            self.bar.__enter__()
        return self.tick

    def tick(self, job, rows) -> None:
        self.done += 1
        status = "/".join(sorted({r["status"] for r in rows}))
        message = f"{job.model_type} ({job.task}): {status}"
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=message)
        else:
            self.stream.write(f"\r\033[K[{self.done}/{self.total}] {message}")
            self.stream.flush()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.stream.isatty():
            self.stream.write("\r\033[K")
            self.stream.flush()
        return False
