"""``lossaudit upgrade MODEL --to transformers==X``: audit MODEL here and in an isolated, cached
environment that differs only by the pins, then the gate's comparison; exit as check --baseline.

Exit status: 0 no regression and no finding in the candidate; 1 a regression or a finding;
2 bad usage; 3 an environment that cannot be built (an unresolvable pin, no network and no
cached wheel, a failed install): one line, and the current environment is never touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ...releases.check_runs import Side, run_check, split_argv, validate
from ..app import Parser
from ...releases.candidate import ALLOW
from ...releases.environments import Spec, current_distributions, default_cache, ensure, parse_pin, source_directory
from ...core.errors import UsageError
from ...gate.thresholds import Gate, add_gate_arguments
from .check import check_out

HELP = "audit MODEL here and with other releases in an isolated, cached environment, then compare"
FILES = ("comparison.txt", "comparison.csv", "upgrade.json")


def pin(text: str) -> tuple[str, str]:
    try:
        return parse_pin(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_own_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", dest="to", type=pin, action="append", metavar="PKG==VER",
                   help="a release to preview, e.g. transformers==5.25.0 (repeatable)")
    p.add_argument("--from", dest="from_", type=pin, action="append", metavar="PKG==VER",
                   help="audit the baseline in an isolated environment with these releases too, not here (repeatable)")
    add_common_arguments(p, "upgrade-MODEL-PINS")
    add_gate_arguments(p)


def directory(text: str) -> Path:
    """A directory option's value; an empty one would mean the working directory: refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a directory")
    return Path(text)


def add_common_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    """The options ``upgrade`` and ``history`` share."""
    p.add_argument("--env-cache", type=directory, metavar="DIR",
                   help="where the isolated environments are kept (default $XDG_CACHE_HOME/lossaudit/envs)")
    p.add_argument("--out", type=directory, metavar="DIR",
                   help=f"directory of both reports and the result (default reports/{out_default}/)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument(ALLOW, dest="allow_flavour_change", action="store_true",
                   help="build a pinned torch in another flavour (e.g. the package index's CUDA build in place of "
                        "a CPU one) when its own flavour cannot be had; without it the preview stops before "
                        "installing and says what the other build would add")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="as for check")
    add_own_arguments(p)
    p.add_argument("check_args", nargs=argparse.REMAINDER, metavar="CHECK-OPTIONS",
                   help="check's options (--path, --microbatches, ...), passed to both audits as given")


def own_options(adder) -> dict[str, bool]:
    """A command's own option strings -> whether each takes a value (to tell them from check's)."""
    probe = argparse.ArgumentParser(add_help=False)
    adder(probe)
    return {s: a.nargs != 0 for a in probe._actions for s in a.option_strings}


def parse_own(args: argparse.Namespace, adder) -> list[str]:
    """Options of the command typed after MODEL, merged into ``args``; returns check's options."""
    mine, forwarded = split_argv(args.check_args or [], own_options(adder))
    parser = Parser(prog=f"lossaudit {args.command}")
    adder(parser)
    parser.parse_args(mine, namespace=args)  # an append extends what came before MODEL
    return forwarded


def _pins(pairs, option: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for name, version in pairs or ():
        if name in pins and pins[name] != version:
            raise UsageError(f"{option}: {name} pinned twice ({pins[name]} and {version})")
        pins[name] = version
    return pins


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def run(args: argparse.Namespace) -> int:
    forwarded = parse_own(args, add_own_arguments)
    to, from_ = _pins(args.to, "--to"), _pins(args.from_, "--from")
    if not to:
        raise UsageError("--to: name at least one release to preview, e.g. --to transformers==5.25.0")
    validate(args.model, forwarded)
    pins = "-".join(f"{n}-{v}" for n, v in to.items())
    out = args.out or Path("reports") / slug(f"upgrade-{Path(args.model).name}-{pins}")
    check_out(out, args.overwrite, FILES[0])
    cache, base, source = args.env_cache or default_cache(), current_distributions(), source_directory()
    say = _say
    allow = args.allow_flavour_change
    old_env = ensure(Spec.make(from_, base, source, flavour_change=allow), cache, say) if from_ else None
    new_env = ensure(Spec.make({**from_, **to}, base, source, flavour_change=allow), cache, say)
    old = Side(_label(from_) if from_ else "the current environment", out / "old", old_env)
    new = Side(_label({**from_, **to}), out / "new", new_env)
    for side in (old, new):
        _note_env(side)
    for side in (old, new):
        run_check(side, args.model, forwarded, say)
    return finish(old, new, Gate.from_args(args), out, to)


def _say(line: str) -> None:
    print(f"lossaudit upgrade: {line}", file=sys.stderr, flush=True)


def _label(pins: dict[str, str]) -> str:
    return " ".join(f"{n}=={v}" for n, v in pins.items())


def _note_env(side: Side) -> None:
    if side.env is None:
        return
    how = f"built in {side.env.manifest.get('seconds', 0):.0f} s" if side.env.created else "cached"
    _say(f"environment for {side.label}: {side.env.path} ({how})")
    changes = side.env.manifest.get("changes")
    if changes is None:  # an environment built before changes were recorded
        changes = [f"{n} -> {v} (lifted: a pin requires it)" for n, v in side.env.manifest.get("lifted_versions", {}).items()]
    if changes and not side.env.created:  # a build names them as it starts
        _say(f"note: {side.label} also changes {len(changes)} other distribution(s): {'; '.join(changes)}")


def finish(old: Side, new: Side, gate: Gate, out: Path, to: dict[str, str]) -> int:
    """The gate's comparison printed and written beside both reports; check --baseline's exit."""
    from ...gate.baseline import GatedReport, compare
    from ...gate.text import comparison_csv, render_comparison
    from ...report.render import write_files
    from ...report.report import Report

    old_report, new_report = Report.load(old.out / "report.json"), Report.load(new.out / "report.json")
    comparison = compare(old_report, new_report, gate, old_name=f"{old.label} ({old.out / 'report.json'})",
                         new_name=f"{new.label} ({new.out / 'report.json'})")
    status = GatedReport(new_report, comparison).exit_status
    exit_line = (f"exit {status}: {len(comparison.regressions)} regression(s) from {old.label} to {new.label}, "
                 f"{len(new_report.findings)} finding(s) with {new.label}")
    summary = {"schema": "lossaudit.upgrade/1", "to": to, "exit_status": status,
               "old": _side_dict(old, old_report), "new": _side_dict(new, new_report),
               "regressions": len(comparison.regressions), "not_like_for_like": comparison.differences}
    write_files(out, {
        "comparison.txt": lambda c: render_comparison(c, full=True) + "\n\n" + exit_line + "\n",
        "comparison.csv": lambda c: comparison_csv(c),
        "upgrade.json": lambda _: json.dumps(summary, indent=2) + "\n",
    }, comparison, "comparison")
    print(render_comparison(comparison, everything=f"{out}/comparison.txt"))
    print(exit_line)
    print(f"reports: {old.out}/ and {new.out}/; comparison: {out}/comparison.txt")
    return status


def _side_dict(side: Side, report) -> dict:
    env = side.env
    return {"label": side.label, "report": str(side.out / "report.json"), "findings": len(report.findings),
            "environment": None if env is None else str(env.path),
            "lifted": None if env is None else env.manifest.get("lifted_versions", {}),
            "changes": None if env is None else env.manifest.get("changes", []),
            "flavours": None if env is None else env.manifest.get("flavours", {})}
