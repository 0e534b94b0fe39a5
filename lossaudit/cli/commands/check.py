"""``lossaudit check MODEL``: audit one model and write its report."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from ...core.errors import UsageError
from ...gate.thresholds import OPTIONS as GATE_OPTIONS
from ...gate.thresholds import Gate, add_gate_arguments
from ...report.outdir import claim
from ...audit.options import add_arguments as add_config_arguments
from ...audit.options import parse_names, values_from
from ...report.terminal import add_color_argument

HELP = "audit one model"


def _names(text: str) -> tuple[str, ...]:  # sweep's --path and --types read lists the same way
    return parse_names(text)


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a report directory")
    return Path(text)


class PathsHelp(argparse.HelpFormatter):
    """``check --help``: --path lists the path registry's names, read when help is printed
    (the registry imports torch; parsing a command line must not)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        if action.dest != "paths":
            return text
        from ...paths import PATHS  # lazy: the registry imports torch, only --help needs it here

        return f"{text}; one of: {', '.join(PATHS.names())}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = PathsHelp
    add_config_arguments(p)  # the audit's settings: the option table of lossaudit.audit.options
    p.add_argument("--out", type=_out_dir, metavar="DIR", help="report directory (default reports/MODEL-TASK/)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--baseline", type=Path, metavar="FILE",
                   help="a report.json to compare with after the audit: exit 1 on a regression too")
    p.add_argument("--replace-baseline", action="store_true",
                   help="allow --out to write the new report over the --baseline file")
    add_gate_arguments(p)
    add_color_argument(p)


def config_from_args(args: argparse.Namespace):
    from ...audit.config import CheckConfig

    return CheckConfig(**values_from(vars(args)))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).name or name).strip("-") or "model"




def check_out(out: Path | None, overwrite: bool, name: str = "report.json", *, whole: bool = False) -> None:
    """Fail before any work if the report (``name``) cannot be written or would replace one.
    ``whole``: the directory is replaced as one unit, so it may hold nothing but a report."""
    if out is None:
        return
    try:
        _check_out(out, overwrite, name, whole)
    except PermissionError as exc:
        raise UsageError(f"--out {out}: permission denied ({exc.filename or out})") from None


def _check_out(out: Path, overwrite: bool, name: str, whole: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if (out / name).exists() and not overwrite:
        raise UsageError(f"--out {out}: already holds a report; pass --overwrite to replace it")
    if whole and out.is_dir():
        if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise UsageError(f"--out {out}: is the working directory or holds it; choose a report directory")
    existing = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a directory")
    reason = _cannot_create_in(existing)
    if reason:
        raise UsageError(f"--out {out}: cannot create files in {existing}: {reason}")


def _cannot_create_in(directory: Path) -> str | None:
    """Try it: permission bits say nothing to root, nor about read-only file systems."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".lossaudit-probe-"):
            return None
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def check_baseline(args: argparse.Namespace, config):
    """Load the baseline before any work (a missing or broken one is a usage error), refuse an
    --out that would write onto it unless --replace-baseline, refuse gate options without it, and
    refuse a baseline of another model, objective, seed or batch size unless
    --allow-different-batch (what only the audit can tell, compare checks after it)."""
    if args.baseline is None:
        changed = [f"--{o.name}" for o in GATE_OPTIONS
                   if getattr(args, o.dest) != (False if o.flag else o.kwargs()["default"])]
        if changed or args.replace_baseline:
            raise UsageError(f"{', '.join(changed or ['--replace-baseline'])}: only with --baseline FILE")
        return None
    from ...gate.comparable import planned_differences, refusal
    from ...report.report import Report

    baseline = Report.load(args.baseline)
    if args.out is not None and _same_file(args.out / "report.json", args.baseline) and not args.replace_baseline:
        raise UsageError(f"--out {args.out} would write over the baseline {args.baseline}; "
                         "choose another --out, or pass --replace-baseline to replace it")
    found = planned_differences(baseline, model=config.model, task=config.task, objective=config.objective.describe(),
                                seed=config.seed, sequences=config.batch_size)
    if found and not args.allow_different_batch:
        raise UsageError(f"--baseline {args.baseline}: {refusal(found)}")
    return baseline


def default_outs(model: str, task: str) -> Iterator[Path]:
    """reports/MODEL-TASK/, then -2, -3, ... beside it."""
    base = Path("reports") / f"{_slug(model)}-{task}"
    yield base
    for n in itertools.count(2):
        yield base.with_name(f"{base.name}-{n}")


def default_out(model: str, task: str) -> Path:
    """The first of ``default_outs`` that holds no report: an earlier report is never replaced."""
    return next(out for out in default_outs(model, task) if not (out / "report.json").exists())


def _held_report(overwrite: bool):
    def taken(out: Path) -> str | None:
        if (out / "report.json").exists() and not overwrite:
            return f"--out {out}: already holds a report; pass --overwrite to replace it"
        return None

    return taken


@contextlib.contextmanager
def claimed_out(args: argparse.Namespace, config, overwrite: bool) -> Iterator[Path]:
    """The report directory, locked for this run from before the audit until its report is in
    place. The default one moves on to the next free name while another run holds it."""
    from ...models.loading import resolve_task

    if args.out is not None:
        check_out(args.out, overwrite, whole=True)
        with claim(iter([absolute(args.out)]), skip_busy=False, taken=_held_report(overwrite)) as out:
            yield out
        return
    task = resolve_task(config.model, task=config.task, allow_pickle=config.allow_pickle,
                        trust_remote_code=config.trust_remote_code, allow_download=config.allow_download)
    first = default_out(config.model, task)
    check_out(first, False, whole=True)
    with claim(map(absolute, default_outs(config.model, task)), skip_busy=True, taken=_held_report(False)) as out:
        yield out


def absolute(out: Path) -> Path:
    """``out`` from the working directory the run started in: code under audit may change it
    (``os.chdir`` in a step), the report and its lock stay where the user asked."""
    return Path(os.path.abspath(out))


def run(args: argparse.Namespace) -> int:
    from ...audit.distributed import closing_barrier, is_leader, joined_world_size
    from ...audit.harness import audit
    from ...report.render import write_report
    from ...report.terminal import print_summary, progress, use_color

    args.world_size = joined_world_size(args.world_size, args.device)  # under torchrun: the launcher's ranks
    config = config_from_args(args)
    refuse_unknown_paths(config)
    baseline = check_baseline(args, config)
    replacing = baseline is not None and args.replace_baseline
    if not is_leader():  # under a launcher, rank 0 writes and prints the report
        status = audit(config).exit_status
        closing_barrier()  # after the leader has written: an early exit 1 would make torchrun end it
        return status
    try:
        with claimed_out(args, config, args.overwrite or replacing) as out:
            with progress(color=use_color(sys.stderr, args.color), stream=sys.stderr) as say:
                report = audit(config, say)
            written = write_report(report, out)
        print_summary(report, written, color=use_color(sys.stdout, args.color))
        if baseline is None:
            return report.exit_status
        return gate_status(report, baseline, args, out)
    finally:
        closing_barrier()


def refuse_unknown_paths(config) -> None:
    """A --path no path has, or one its spec says cannot run with these settings, refused before
    the model is built (the audit's planning decides it again, with the model's task)."""
    from ...paths import PATHS

    problems = [PATHS.unknown(name) for name in config.paths or () if name not in PATHS]
    for name in config.paths or ():
        reason = PATHS.get(name).unavailable(config) if name in PATHS else None
        if reason:
            problems.append(f"--path {name}: {reason}")
    if problems:
        raise UsageError(*problems)


def gate_status(report, baseline, args: argparse.Namespace, out: Path) -> int:
    """The combined rule of check --baseline: exit 1 on a regression against the baseline, and
    exit 1 on a finding of this audit whether or not it is new (check's own rule)."""
    from ...gate.baseline import GatedReport, compare
    from ...gate.text import render_comparison

    comparison = compare(baseline, report, Gate.from_args(args), old_name=str(args.baseline),
                         new_name=str(out / "report.json"))
    print()
    print(render_comparison(comparison))
    status = GatedReport(report, comparison).exit_status
    print(f"exit {status}: {len(comparison.regressions)} regression(s) against the baseline, "
          f"{len(report.findings)} finding(s) in this audit")
    return status
