"""``check`` run as a subprocess with another environment's interpreter (``upgrade``, ``history``).

The user's check options are forwarded as they were typed (raw argv): ``upgrade`` and
``history`` take their own options out and hand the rest to ``python -m lossaudit check``, so
check's option table is declared once, in ``cli/commands/check.py``.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli.app import build_parser
from .environments import Env, isolated_environ
from ..core.errors import EnvironmentProblem, LossauditError, UsageError

# check options a preview sets itself (each side's report goes under the preview's --out)
RESERVED = ("--out", "--overwrite", "--baseline", "--replace-baseline")


def split_argv(argv: list[str], own: dict[str, bool]) -> tuple[list[str], list[str]]:
    """(own tokens, forwarded tokens), order kept. ``own`` maps an option to whether it takes
    a value; ``--opt=value`` and ``--opt value`` are both taken."""
    mine, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in own:
            mine.append(token)
            if own[name] and "=" not in token and i + 1 < len(argv):
                mine.append(argv[i + 1])
                i += 1
        else:
            rest.append(token)
        i += 1
    return mine, rest


def validate(model: str, forwarded: list[str]) -> None:
    """The forwarded options, parsed by check's own parser here, before any environment is
    built: a typo is a usage error now, not after minutes of installing."""
    taken = [t for t in forwarded if t.split("=", 1)[0] in RESERVED]
    if taken:
        raise UsageError(f"{taken[0].split('=', 1)[0]}: set by the preview itself (each side's report goes under --out)")
    try:
        build_parser().parse_args(["check", model, *forwarded])
    except SystemExit:  # --help printed check's help
        raise UsageError("the options after MODEL are check's: see python -m lossaudit check --help") from None


@dataclass
class Side:
    """One audit of a preview: where it runs and where its report goes."""

    label: str  # e.g. "current environment" or "transformers==4.46.0"
    out: Path
    env: Env | None = None  # None: the current environment

    @property
    def python(self) -> str:
        return sys.executable if self.env is None else str(self.env.python)


def run_check(side: Side, model: str, forwarded: list[str], say=lambda line: None) -> int:
    """``python -m lossaudit check MODEL ... --out side.out`` with the side's interpreter; its
    output goes to ``side.out`` + ``.log`` beside it (the report directory holds the report
    alone: check replaces it as a whole). Returns check's exit status (0 or 1); a usage or
    environment error of the audit itself is raised as one line."""
    side.out.parent.mkdir(parents=True, exist_ok=True)
    log = side.out.with_name(side.out.name + ".log")
    # its output goes to a file, which check colors no more than any pipe
    command = [side.python, "-m", "lossaudit", "check", model, *forwarded, "--out", str(side.out), "--overwrite"]
    environ = None if side.env is None else isolated_environ(side.env.path)
    say(f"auditing {model} in {side.label} ...")
    with open(log, "w") as out:
        try:
            status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=environ,
                                    stdin=subprocess.DEVNULL).returncode
        except OSError as exc:
            raise EnvironmentProblem(f"{side.label}: cannot run {side.python}: {exc.strerror}") from None
    if status in (0, 1) and (side.out / "report.json").is_file():
        return status
    error = LossauditError(f"the audit in {side.label} failed (exit {status}): {_last_line(log)} (log: {log})")
    error.exit_status = 2 if status == 2 else 3
    raise error


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lossaudit:")]
    return (errors or lines or ["no output"])[-1][:300]
