"""Compare two reports: the regression gate behind ``compare OLD NEW`` and ``check --baseline``.

Any ``report.json`` is a baseline. Cases are matched by ``CASE_KEY``; a case found in only
one report is listed as such (never dropped) and fails the comparison under ``strict``.
A regression is an audited case (not a known-different harness reduction) that

- matched in OLD and does not in NEW (it diverges, or cannot run any more: ``error``), or
- diverged in OLD and now cannot run (``error``), or
- whose loss or gradient error broke one of the gate's thresholds (``gate.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..core.errors import DivergenceError
from .thresholds import Gate
from ..report.report import Report, findings_table

CASE_KEY = ["path", "reduction", "microbatches", "padding", "grouping", "world_size"]
ENVIRONMENT_KEYS = ("python", "torch", "transformers", "accelerate", "trl", "device", "dtype", "seed")
METRICS = ("verdict", "expected", "loss_rel_err", "grad_rel_err", "detail")
DEFAULT_FLOOR = 1e-5  # float32's, for a report that does not state its tolerance


@dataclass
class Comparison:
    """The outcome of one comparison; ``cases`` is a DataFrame, one row per case of either side."""

    old_name: str
    new_name: str
    environment: pd.DataFrame  # field, old, new, changed
    cases: pd.DataFrame  # CASE_KEY, side, <metric>_old, <metric>_new, grad_change, loss_change, status, regression
    gate: Gate

    @property
    def regressions(self) -> pd.DataFrame:
        return self.cases[self.cases["regression"]]

    @property
    def one_sided(self) -> pd.DataFrame:
        return self.cases[self.cases["side"] != "both"]

    @property
    def failed(self) -> bool:
        return bool(len(self.regressions)) or (self.gate.strict and bool(len(self.one_sided)))

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def load(report: Report | str | Path) -> Report:
    return report if isinstance(report, Report) else Report.load(report)


def compare(old: Report | str | Path, new: Report | str | Path, gate: Gate | None = None,
            *, old_name: str = "OLD", new_name: str = "NEW") -> Comparison:
    """Compare ``new`` with the baseline ``old`` (reports or paths to ``report.json``)."""
    old_report, new_report = load(old), load(new)
    gate = gate or Gate()
    floor = max(_floor(old_report), _floor(new_report))
    cases = _join(old_report.cases, new_report.cases)
    judged = [_judge(row, gate, floor) for row in cases.to_dict(orient="records")]
    cases["status"] = [status for status, _ in judged]
    cases["regression"] = [regression for _, regression in judged]
    cases["grad_change"] = [_change(o, n) for o, n in zip(cases["grad_rel_err_old"], cases["grad_rel_err_new"])]
    cases["loss_change"] = [_change(o, n) for o, n in zip(cases["loss_rel_err_old"], cases["loss_rel_err_new"])]
    return Comparison(old_name, new_name, environment_diff(old_report, new_report), _ordered(cases), gate)


def environment_diff(old: Report, new: Report) -> pd.DataFrame:
    """The versions, device and dtype of both runs, plus the model and tolerance they used."""
    def fields(report: Report) -> dict:
        env = report.environment
        return {**{k: env.get(k) for k in ENVIRONMENT_KEYS},
                "model": report.model.get("name"), "task": report.model.get("task"),
                "parameters": report.model.get("parameters"), "tolerance": report.tolerance.get("rtol")}

    a, b = fields(old), fields(new)
    rows = [{"field": k, "old": a[k], "new": b[k], "changed": a[k] != b[k]} for k in a]
    return pd.DataFrame(rows, columns=["field", "old", "new", "changed"])


def _floor(report: Report) -> float:
    floor = report.tolerance.get("floor") or report.tolerance.get("rtol")
    return float(floor) if floor else DEFAULT_FLOOR


def _keyed(cases: pd.DataFrame) -> pd.DataFrame:
    """Cases with a normalised key: no reduction is "", a missing world size is 1, and a key
    that repeats within one report gets an occurrence number, so nothing is merged away."""
    frame = cases.copy()
    frame["reduction"] = frame["reduction"].map(lambda r: r if isinstance(r, str) else "")
    for column in ("padding", "grouping"):
        frame[column] = frame[column].map(lambda v: "" if v is None or v != v else str(v))
    frame["world_size"] = frame["world_size"].map(lambda v: 1 if v is None or v != v else int(v))
    frame["microbatches"] = frame["microbatches"].map(lambda v: -1 if v is None or v != v else int(v))
    frame["occurrence"] = frame.groupby(CASE_KEY, sort=False).cumcount()
    return frame[CASE_KEY + ["occurrence"] + list(METRICS)]


def _join(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    both = _keyed(old).merge(_keyed(new), on=CASE_KEY + ["occurrence"], how="outer",
                             suffixes=("_old", "_new"), indicator="side", sort=False)
    both["side"] = both["side"].map({"both": "both", "left_only": "old only", "right_only": "new only"}).astype(str)
    for column in ("loss_rel_err_old", "loss_rel_err_new", "grad_rel_err_old", "grad_rel_err_new"):
        both[column] = pd.to_numeric(both[column], errors="coerce").astype(float)
    return both


def _audited(row: dict) -> bool:
    """Not a harness reduction known to differ (those never fail a run, nor a comparison)."""
    expected = row["expected_new"] if row["side"] != "old only" else row["expected_old"]
    return not (pd.notna(expected) and bool(expected))


def _judge(row: dict, gate: Gate, floor: float) -> tuple[str, bool]:
    """(status, is_regression) of one joined case."""
    if row["side"] != "both":
        in_which = "OLD" if row["side"] == "old only" else "NEW"
        return f"only in {in_which}" + (" (fails: --strict)" if gate.strict else ""), False
    old, new = row["verdict_old"], row["verdict_new"]
    if not _audited(row):
        return ("expected to differ" if old == new else f"expected to differ; {old} -> {new}"), False
    if old == "match" and new != "match":
        return f"REGRESSION: matched, now {'diverges' if new == 'diverge' else 'fails to run (error)'}", True
    if old == "diverge" and new == "error":
        return "REGRESSION: diverged, now fails to run (error)", True
    for check in gate.checks:
        why = check.violation(row[f"{_column(check)}_old"], row[f"{_column(check)}_new"], floor)
        if why:
            return f"REGRESSION: {why}", True
    if old != "match" and new == "match":
        return f"fixed: {old} -> match", False
    return ("" if old == new else f"{old} -> {new}"), False


def _column(check) -> str:
    return "grad_rel_err" if check.metric == "grad" else "loss_rel_err"


def _change(old: float, new: float) -> float:
    """NEW over OLD (1.0 when both are 0, NaN when either is missing)."""
    if not (math.isfinite(old) and math.isfinite(new)):
        return math.nan
    if old == 0:
        return 1.0 if new == 0 else math.inf
    return new / old


def _ordered(cases: pd.DataFrame) -> pd.DataFrame:
    """Regressions first, then cases in only one report, then the rest in report order."""
    rank = [0 if regression else 1 if side != "both" else 2
            for regression, side in zip(cases["regression"], cases["side"])]
    return cases.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)


# --- text: the environment diff first, then one row per case -------------------------------

def _err(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1e}"


def _ratio(value: float) -> str:
    if math.isnan(value):
        return ""
    return "from 0" if math.isinf(value) else f"x{value:.3g}"


def _case_label(row: dict) -> str:
    what = row["path"] + (f":{row['reduction']}" if row["reduction"] else "")
    ranks = f" ranks={row['world_size']}" if row["world_size"] != 1 else ""
    return f"{what} k={row['microbatches']} {row['grouping']} pad-{row['padding']}{ranks}"


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def render_environment(comparison: Comparison) -> list[str]:
    rows = [["", "", "OLD", "NEW"]]
    for r in comparison.environment.itertuples(index=False):
        rows.append(["*" if r.changed else " ", str(r.field), str(r.old), str(r.new)])
    return ["environment (* = changed)"] + _aligned(rows)


def render_cases(comparison: Comparison, cases: pd.DataFrame | None = None) -> list[str]:
    cases = comparison.cases if cases is None else cases
    rows = [["case", "verdict old", "new", "grad err old", "new", "change", "loss err old", "new", "change", "status"]]
    for r in cases.to_dict(orient="records"):
        rows.append([_case_label(r), str(r["verdict_old"] if r["side"] != "new only" else "-"),
                     str(r["verdict_new"] if r["side"] != "old only" else "-"),
                     _err(r["grad_rel_err_old"]), _err(r["grad_rel_err_new"]), _ratio(r["grad_change"]),
                     _err(r["loss_rel_err_old"]), _err(r["loss_rel_err_new"]), _ratio(r["loss_change"]),
                     r["status"]])
    return _aligned(rows)


def verdict_line(comparison: Comparison) -> str:
    cases, one_sided = comparison.cases, comparison.one_sided
    counts = (f"{int((cases['side'] == 'both').sum())} case(s) in both, "
              f"{int((cases['side'] == 'old only').sum())} only in OLD, "
              f"{int((cases['side'] == 'new only').sum())} only in NEW")
    if len(comparison.regressions):
        return f"{len(comparison.regressions)} REGRESSION(S) ({counts})"
    if comparison.failed:
        return f"FAILED under --strict: {len(one_sided)} case(s) in only one report ({counts})"
    return f"no regressions ({counts})"


def render_comparison(comparison: Comparison) -> str:
    lines = [f"lossaudit compare: OLD {comparison.old_name}, NEW {comparison.new_name}", ""]
    lines += render_environment(comparison) + [""] + render_cases(comparison) + ["", verdict_line(comparison)]
    return "\n".join(lines)


def failures_text(comparison: Comparison) -> str:
    """What failed the comparison, for an assertion message: the changed environment, then
    the regressing (and, under --strict, one-sided) cases."""
    failing = comparison.cases["regression"] | (comparison.gate.strict & (comparison.cases["side"] != "both"))
    changed = comparison.environment[comparison.environment["changed"]]
    env = ", ".join(f"{r.field} {r.old} -> {r.new}" for r in changed.itertuples()) or "no change"
    lines = [f"{verdict_line(comparison)} against the baseline {comparison.old_name}", f"environment: {env}"]
    return "\n".join(lines + render_cases(comparison, comparison.cases[failing]))


@dataclass
class GatedReport:
    """An audit's report and, when a baseline was given, its comparison with it: what the
    pytest fixture returns. ``assert_clean`` fails on a finding or a failed comparison."""

    report: Report
    comparison: Comparison | None = None

    @property
    def cases(self) -> pd.DataFrame:
        return self.report.cases

    @property
    def findings(self) -> pd.DataFrame:
        return self.report.findings

    @property
    def exit_status(self) -> int:
        """check --baseline's rule: 1 on a finding or a regression."""
        return max(self.report.exit_status, self.comparison.exit_status if self.comparison else 0)

    def assert_clean(self) -> "GatedReport":
        __tracebackhide__ = True  # pytest shows the caller's line and this message, not our frame
        problems = [findings_table(self.report)] if len(self.report.findings) else []
        if self.comparison is not None and self.comparison.failed:
            problems.append(failures_text(self.comparison))
        if problems:
            raise DivergenceError("\n\n".join(problems))
        return self
