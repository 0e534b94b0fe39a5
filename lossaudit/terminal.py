"""What a person sees in the terminal: progress, a compact table, the worst finding first."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .render import summary_frame
from .report import Report

MAX_FINDINGS_SHOWN = 10


def progress_printer(stream=sys.stderr):
    """Progress on one rewritten line when ``stream`` is a terminal; silent otherwise."""
    if not stream.isatty():
        return None

    def say(message: str) -> None:
        stream.write("\r\033[K" + message)
        stream.flush()

    return say


def _err(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.1e}"


def summary(report: Report, written: list[Path]) -> str:
    model, tol = report.model, report.tolerance
    lines = [
        f"lossaudit: {model['name']} ({model['task']}, {model['parameters']:,} parameters), "
        f"{len(report.cases)} cases, tolerance {tol['rtol']:.1e} (noise floor {tol['noise_floor']:.1e})",
        "",
        "worst gradient relative error per path and k  (* = expected to differ, not a finding)",
    ]
    table = summary_frame(report)
    expected = report.cases.assign(label=report.cases["path"] + report.cases["reduction"].map(
        lambda r: f":{r}" if isinstance(r, str) else "")).groupby("label")["expected"].all()
    width = max(len(label) for label in table.index) + 2
    lines.append(" " * width + "".join(f"{c:>10}" for c in table.columns))
    for label, row in table.iterrows():
        mark = "*" if expected.get(label, False) else " "
        lines.append(f"{label + mark:<{width}}" + "".join(f"{_err(v):>10}" for v in row))
    findings = report.worst_first(report.findings)
    lines.append("")
    if len(findings):
        lines.append(f"{len(findings)} FINDING(S), worst first:")
        for row in findings.head(MAX_FINDINGS_SHOWN).itertuples():
            what = row.path + (f":{row.reduction}" if isinstance(row.reduction, str) else "")
            lines.append(f"  {row.verdict.upper():8} {what} k={row.microbatches} {row.grouping} pad-{row.padding}: "
                         f"loss err {_err(row.loss_rel_err)}, grad err {_err(row.grad_rel_err)}"
                         f" (worst {row.worst_param}) - {row.detail}")
        if len(findings) > MAX_FINDINGS_SHOWN:
            lines.append(f"  ... and {len(findings) - MAX_FINDINGS_SHOWN} more in the report")
    else:
        lines.append("no findings: every audited path matches the float64 reference")
    if written:
        lines.append(f"report: {written[0].parent}/ ({', '.join(p.name for p in written)})")
    return "\n".join(lines)
