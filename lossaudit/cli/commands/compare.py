"""``lossaudit compare OLD NEW``: the regression gate between two reports.

Exit status: 0 no regression, 1 a regression (or, with --strict, a case in only one
report), 2 a missing or broken report or a bad threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...gate.thresholds import Gate, add_gate_arguments

HELP = "compare a report with a baseline report (or two sweeps): exit 1 on a regression"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", metavar="OLD", type=Path, help="the baseline report.json (e.g. on today's versions)")
    p.add_argument("new", metavar="NEW", type=Path, help="the report.json to judge (e.g. on the candidate versions)")
    add_gate_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ...gate.baseline import compare
    from ...gate.text import render_comparison
    from ...report.report import Report
    from ...sweep.compare import is_sweep
    from ...sweep.compare import run as compare_sweeps

    if is_sweep(args.old) or is_sweep(args.new):  # two sweep.json files: the change list of model types
        return compare_sweeps(args.old, args.new)
    old, new = Report.load(args.old), Report.load(args.new)  # both checked before any output
    comparison = compare(old, new, Gate.from_args(args), old_name=str(args.old), new_name=str(args.new))
    print(render_comparison(comparison))
    return comparison.exit_status
