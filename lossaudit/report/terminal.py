"""What a person sees in the terminal: progress, a compact table, the worst finding first.

The summary is built once as styled segments; ``summary`` joins their text (the plain form,
used whenever stdout is not a terminal, with ``--no-color`` or with ``NO_COLOR`` set), and
``print_summary`` hands the same segments to rich for colour. rich is imported lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .objective_line import objective_line

if TYPE_CHECKING:  # the CLI imports this module to parse arguments: keep pandas out of it
    from .report import Report

Segment = tuple[str, str | None]  # (text, rich style)
Line = list[Segment]
PROGRESS_STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")  # the harness's "[i/n] layout" messages


def add_color_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-color", dest="color", action="store_false",
                        help="plain text even on a terminal (NO_COLOR in the environment does the same)")


def use_color(stream=None, requested: bool = True) -> bool:
    """Colour only on a terminal, unless --no-color, NO_COLOR (no-color.org) or TERM=dumb."""
    stream = stream or sys.stdout  # looked up per call: callers and tests swap sys.stdout
    if not requested or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_printer(stream=None):
    """Progress on one rewritten line when ``stream`` (default: the current stderr, looked up
    at call time) is a terminal; silent otherwise."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None
    shown = [0]  # length of the line on screen

    def say(message: str) -> None:
        stream.write(_rewrite(message, shown[0]))
        shown[0] = len(message)
        stream.flush()

    return say


def _rewrite(message: str, shown: int) -> str:
    """``message`` over the current line: ESC[K clears the rest, except on a dumb terminal,
    which prints escape codes as they are; there spaces blank what the old line had more."""
    if os.environ.get("TERM") == "dumb":
        return "\r" + message + " " * max(shown - len(message), 0) + ("\r" + message if shown > len(message) else "")
    return "\r\033[K" + message


@contextlib.contextmanager
def progress(*, color: bool, stream=None) -> Iterator:
    """A progress callback for ``harness.audit``: a rich bar over the layouts when colour is
    on, the plain rewritten line on a terminal otherwise, nothing when not a terminal.
    The bar or line is cleared on exit, so the summary starts on a clean line."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield None
        return
    if not color:
        say = progress_printer(stream)
        try:
            yield say
        finally:
            say("")
            stream.write("\r")
            stream.flush()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(file=stream, highlight=False), transient=True)
    task = bar.add_task("starting", total=None)

    def say(message: str) -> None:
        step = PROGRESS_STEP.match(message)
        if step:  # layout i of n has started: i - 1 are done
            done, total, message = int(step[1]) - 1, int(step[2]), step[3]
            bar.update(task, completed=done, total=total, description=message)
        else:
            bar.update(task, description=message)

    with bar:
        yield say


def _err(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.1e}"


def _err_style(value, rtol: float, expected: bool) -> str:
    if value is None or not isinstance(value, float) or math.isnan(value) or value > rtol:
        return "yellow" if expected else "bold red"
    return "green"


def summary_lines(report: Report, written: list[Path]) -> list[Line]:
    model, tol = report.model, report.tolerance
    lines: list[Line] = [
        [("lossaudit: ", "bold"), (f"{model['name']} ", "bold cyan"),
         (f"({model['task']}, {model['parameters']:,} parameters), {len(report.cases)} cases, "
          f"tolerance {tol['rtol']:.1e} (noise floor {tol['noise_floor']:.1e})", None)],
        *([[("objective: ", "bold"), (objective_line(model), None)]] if model.get("aggregation") else []),
        [],
        [("worst gradient relative error per path and k  (* = expected to differ, not a finding)", "bold")],
    ]
    from .report import summary_frame  # lazy: the CLI parses arguments with this module, keep pandas out

    table = summary_frame(report)
    expected = report.cases.assign(label=_labels(report.cases)).groupby("label")["expected"].all()
    width = max(len(label) for label in table.index) + 2
    lines.append([(" " * width + "".join(f"{c:>10}" for c in table.columns), "dim")])
    for label, row in table.iterrows():
        known = bool(expected.get(label, False))
        mark = "*" if known else " "
        lines.append([(f"{label + mark:<{width}}", "dim" if known else None)]
                     + [(f"{_err(v):>10}", _err_style(v, tol["rtol"], known)) for v in row])
    lines.append([])
    lines += _findings_lines(report)
    if written:
        lines.append([(f"report: {shown(written[0].parent)}/ ({', '.join(p.name for p in written)})", "dim")])
    return lines


def shown(folder: Path) -> str:
    """A report folder as the user would type it: relative to the working directory when below it
    (``--out`` is made absolute before the run, so that a step's ``os.chdir`` cannot move it)."""
    try:
        return str(Path(folder).relative_to(Path.cwd()))
    except ValueError:
        return str(folder)


def _findings_lines(report: Report) -> list[Line]:
    """The findings, one line per path and k: the worst layout of that k, with how many of its
    layouts diverge. Every k of every path keeps its line (k=1's evidence included), so nothing
    that tells the story is cut; the report holds every case."""
    findings = report.worst_first(report.findings)
    if not len(findings):
        return [[("no findings: every audited path matches the float64 reference", "bold green")]]
    lines: list[Line] = [[(f"{len(findings)} FINDING(S), worst first, one line per path and k:", "bold red")]]
    cases = report.cases.assign(_label=_labels(report.cases))
    layouts = cases.groupby(["_label", "microbatches"]).size()
    findings = findings.assign(_label=_labels(findings))
    for label in dict.fromkeys(findings["_label"]):  # paths in the order of their worst finding
        mine = findings[findings["_label"] == label]
        for k in sorted(set(mine["microbatches"])):
            at_k = mine[mine["microbatches"] == k]
            row = next(at_k.itertuples())  # worst first already
            count = f"{len(at_k)} of {layouts.get((label, k), len(at_k))} layouts"
            lines.append([("  ", None), (f"{row.verdict.upper():8}", "bold red" if row.verdict == "diverge" else "bold yellow"),
                          (f" {label} k={row.microbatches} ({count}; worst {row.grouping} pad-{row.padding}): "
                           f"loss err {_err(row.loss_rel_err)}, grad err {_err(row.grad_rel_err)}"
                           f" (worst {row.worst_param}) - {row.detail}", None)])
    return lines


def _labels(frame):
    return frame["path"] + frame["reduction"].map(lambda r: f":{r}" if isinstance(r, str) else "")


def summary(report: Report, written: list[Path]) -> str:
    """The plain-text summary."""
    return "\n".join("".join(text for text, _ in line) for line in summary_lines(report, written))


def print_summary(report: Report, written: list[Path], *, color: bool, stream=None) -> None:
    stream = stream or sys.stdout
    """The summary in colour through rich, or exactly ``summary`` as plain text."""
    if not color:
        print(summary(report, written), file=stream)
        return
    from rich.console import Console
    from rich.text import Text

    # Text, not markup: a model name or detail holding "[...]" is printed as it is
    console = Console(file=stream, force_terminal=True, color_system="standard", highlight=False,
                      soft_wrap=True, emoji=False)
    for line in summary_lines(report, written):
        console.print(Text.assemble(*[(text, style or "") for text, style in line]))
