"""Compare two reports: the regression gate behind ``compare OLD NEW`` and ``check --baseline``.

Any ``report.json`` is a baseline, provided both reports audited the same thing
(``comparable.py``: model, objective, batch, layouts); otherwise the comparison is refused
unless ``--allow-different-batch``. Cases are matched by ``CASE_KEY``; a case found in only
one report is listed as such (never dropped) and fails the comparison under ``strict``.
A regression is an audited case (not a known-different harness reduction) that

- matched in OLD and does not in NEW (it diverges, or cannot run any more: ``error``), or
- diverged in OLD and now cannot run (``error``), or
- whose loss or gradient error broke one of the gate's thresholds (``thresholds.py``).

Every case also gets a ``kind``: ``regression``, ``improvement`` (its verdict got better),
``one-sided``, ``changed`` (another verdict change), ``moved`` (an error grew or shrank more
than ``MOVED`` times, the dtype floor counting for smaller errors) or ``same``; the printed
comparison lists all but ``same`` (``text.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..core.errors import DivergenceError, UsageError
from .comparable import differences, refusal
from .text import failures_text
from .thresholds import MOVED, Gate
from ..report.environment import STACKS
from ..report.report import Report, findings_table

CASE_KEY = ["path", "reduction", "microbatches", "padding", "grouping", "world_size"]
ENVIRONMENT_KEYS = ("python", "torch", "transformers", "accelerate", "trl", "device", "dtype", "seed")
UNRECORDED = "not recorded"  # a stack's release in a report made before lossaudit recorded it
METRICS = ("verdict", "expected", "loss_rel_err", "grad_rel_err", "detail", "tokens")
DEFAULT_FLOOR = 1e-5  # float32's, for a report that does not state its tolerance
RANK = {"error": 0, "diverge": 1, "match": 2}  # a verdict's rank: higher is better


@dataclass
class Comparison:
    """The outcome of one comparison; ``cases`` is a DataFrame, one row per case of either side."""

    old_name: str
    new_name: str
    environment: pd.DataFrame  # field, old, new, changed
    cases: pd.DataFrame  # CASE_KEY, side, <metric>_old, <metric>_new, grad_change, loss_change, status, regression, kind
    gate: Gate
    floor: float = DEFAULT_FLOOR
    differences: list[str] = field(default_factory=list)  # what is not like for like (allowed by the gate)

    @property
    def regressions(self) -> pd.DataFrame:
        return self.cases[self.cases["regression"]]

    @property
    def one_sided(self) -> pd.DataFrame:
        return self.cases[self.cases["side"] != "both"]

    def of_kind(self, kind: str) -> pd.DataFrame:
        return self.cases[self.cases["kind"] == kind]

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
    """Compare ``new`` with the baseline ``old`` (reports or paths to ``report.json``). Raises
    UsageError when they did not audit the same thing, unless the gate allows it."""
    old_report, new_report = load(old), load(new)
    gate = gate or Gate()
    cases = _join(old_report.cases, new_report.cases)
    found = differences(old_report, new_report, cases)
    if found and not gate.allow_different_batch:
        raise UsageError(refusal(found))
    floor = max(_floor(old_report), _floor(new_report))
    judged = [_judge(row, gate, floor) for row in cases.to_dict(orient="records")]
    cases["status"] = [status for status, _, _ in judged]
    cases["regression"] = [regression for _, regression, _ in judged]
    cases["kind"] = [kind for _, _, kind in judged]
    cases["grad_change"] = [_change(o, n) for o, n in zip(cases["grad_rel_err_old"], cases["grad_rel_err_new"])]
    cases["loss_change"] = [_change(o, n) for o, n in zip(cases["loss_rel_err_old"], cases["loss_rel_err_new"])]
    return Comparison(old_name, new_name, environment_diff(old_report, new_report), _ordered(cases), gate, floor,
                      found)


def environment_diff(old: Report, new: Report) -> pd.DataFrame:
    """The versions, device and dtype of both runs, plus the model and tolerance they used. A
    training stack's release (peft, deepspeed, ...) is shown where either report names one; a
    report from before lossaudit recorded them says nothing of it ("not recorded", no change)."""
    stacks = [k for k in STACKS if old.environment.get(k) or new.environment.get(k)]

    def fields(report: Report) -> dict:
        env = report.environment
        return {**{k: env.get(k) for k in ENVIRONMENT_KEYS}, **{k: env.get(k, UNRECORDED) for k in stacks},
                "model": report.model.get("name"), "task": report.model.get("task"),
                "parameters": report.model.get("parameters"), "tolerance": report.tolerance.get("rtol")}

    a, b = fields(old), fields(new)
    rows = [{"field": k, "old": a[k], "new": b[k], "changed": UNRECORDED not in (a[k], b[k]) and a[k] != b[k]}
            for k in a]
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
    if "tokens" not in frame:
        frame["tokens"] = None
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


def _judge(row: dict, gate: Gate, floor: float) -> tuple[str, bool, str]:
    """(status, is_regression, kind) of one joined case."""
    if row["side"] != "both":
        in_which = "OLD" if row["side"] == "old only" else "NEW"
        return f"only in {in_which}" + (" (fails: --strict)" if gate.strict else ""), False, "one-sided"
    old, new = row["verdict_old"], row["verdict_new"]
    moved = "moved" if _moved(row, floor) else "same"
    if not _audited(row):
        if old == new:
            return "expected to differ", False, moved
        return f"expected to differ; {old} -> {new}", False, "changed"
    if old == "match" and new != "match":
        return f"REGRESSION: matched, now {'diverges' if new == 'diverge' else 'fails to run (error)'}", True, "regression"
    if old == "diverge" and new == "error":
        return "REGRESSION: diverged, now fails to run (error)", True, "regression"
    for check in gate.checks:
        why = check.violation(row[f"{_column(check)}_old"], row[f"{_column(check)}_new"], floor)
        if why:
            return f"REGRESSION: {why}", True, "regression"
    if RANK.get(new, -1) > RANK.get(old, -1):
        return (f"fixed: {old} -> match" if new == "match" else f"improved: {old} -> {new}"), False, "improvement"
    if old != new:
        return f"{old} -> {new}", False, "changed"
    return "", False, moved


def _moved(row: dict, floor: float) -> bool:
    """An error grew or shrank more than MOVED times (below the floor counts as the floor)."""
    for column in ("grad_rel_err", "loss_rel_err"):
        old, new = row[f"{column}_old"], row[f"{column}_new"]
        if math.isfinite(old) and math.isfinite(new):
            ratio = max(new, floor) / max(old, floor)
            if ratio > MOVED or ratio < 1 / MOVED:
                return True
        elif math.isfinite(old) != math.isfinite(new):
            return True
    return False


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
    """Regressions first, then improvements, cases in only one report, other changes, and the
    rest, each in report order."""
    rank = {"regression": 0, "improvement": 1, "one-sided": 2, "changed": 3, "moved": 4, "same": 5}
    order = cases["kind"].map(rank)
    return cases.assign(_rank=order).sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)


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
