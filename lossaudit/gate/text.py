"""A comparison as text, summary first: what it found (regressions, improvements, cases in only
one report, environment changes), then only the cases that changed. The full tables (every
environment field, every case) are printed with ``--all-cases`` and always written to the
files of ``upgrade``; ``comparison.csv`` holds every case.

This module reads a ``Comparison`` (``baseline.py``) and imports nothing heavy.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from .comparable import case_label, note
from .thresholds import MOVED

if TYPE_CHECKING:
    import pandas as pd

    from .baseline import Comparison

ONE_SIDED_ROWS = 10  # more cases than this in only one report are counted per path, not listed


def _err(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1e}"


def _ratio(value: float) -> str:
    if math.isnan(value):
        return ""
    return "from 0" if math.isinf(value) else f"x{value:.3g}"


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def render_environment(comparison: Comparison) -> list[str]:
    rows = [["", "", "OLD", "NEW"]]
    for r in comparison.environment.itertuples(index=False):
        rows.append(["*" if r.changed else " ", str(r.field), str(r.old), str(r.new)])
    return ["environment (* = changed)"] + _aligned(rows)


def environment_changes(comparison: Comparison) -> str:
    changed = comparison.environment[comparison.environment["changed"]]
    return "; ".join(f"{r.field} {r.old} -> {r.new}" for r in changed.itertuples()) or "no change"


def render_cases(comparison: Comparison, cases: pd.DataFrame | None = None) -> list[str]:
    cases = comparison.cases if cases is None else cases
    rows = [["case", "verdict old", "new", "grad err old", "new", "change", "loss err old", "new", "change", "status"]]
    for r in cases.to_dict(orient="records"):
        rows.append([case_label(r), str(r["verdict_old"] if r["side"] != "new only" else "-"),
                     str(r["verdict_new"] if r["side"] != "old only" else "-"),
                     _err(r["grad_rel_err_old"]), _err(r["grad_rel_err_new"]), _ratio(r["grad_change"]),
                     _err(r["loss_rel_err_old"]), _err(r["loss_rel_err_new"]), _ratio(r["loss_change"]),
                     r["status"] or r["kind"]])
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


def summary_lines(comparison: Comparison) -> list[str]:
    """The verdict, then one line per kind of change, then the environment's changes."""
    kinds = Counter(comparison.cases["kind"])
    lines = [verdict_line(comparison),
             f"  regressions {kinds['regression']}, improvements {kinds['improvement']}, "
             f"other verdict changes {kinds['changed']}, errors moved more than {MOVED:g}x {kinds['moved']}, "
             f"unchanged {kinds['same']}"]
    for side, name in (("old only", "OLD"), ("new only", "NEW")):
        only = comparison.cases[comparison.cases["side"] == side]
        if len(only):
            per_path = Counter(only["path"])
            lines.append(f"  only in {name}: {len(only)} case(s) ("
                         + ", ".join(f"{path} {n}" for path, n in per_path.items()) + ")")
    lines.append(f"  environment changes: {environment_changes(comparison)}")
    return lines


def listed(comparison: Comparison) -> pd.DataFrame:
    """The cases printed without --all-cases: every one that changed, those in one report only
    while they are few (else the summary counts them per path)."""
    cases = comparison.cases
    shown = cases["kind"] != "same"
    if len(comparison.one_sided) > ONE_SIDED_ROWS:
        shown &= cases["kind"] != "one-sided"
    return cases[shown]


def render_comparison(comparison: Comparison, *, full: bool | None = None, everything: str = "--all-cases") -> str:
    """Summary first, then the changed cases (every case and the whole environment when
    ``full``, by default the gate's --all-cases). ``everything`` says where the rest is."""
    full = comparison.gate.all_cases if full is None else full
    lines = [f"lossaudit compare: OLD {comparison.old_name}, NEW {comparison.new_name}"]
    if comparison.differences:
        lines.append(note(comparison.differences))
    lines += summary_lines(comparison) + [""]
    if full:
        return "\n".join(lines + render_environment(comparison) + [""] + render_cases(comparison))
    shown = listed(comparison)
    rest = f"every case: {everything}"
    if not len(shown):
        lines.append(f"no case changed: every error within {MOVED:g}x of OLD's (below the floor "
                     f"{comparison.floor:.0e} counting as the floor), every verdict the same ({rest})")
        return "\n".join(lines)
    lines.append(f"cases that changed ({len(shown)} of {len(comparison.cases)}; an error moved more than "
                 f"{MOVED:g}x, a verdict changed, or in one report only; {rest}):")
    return "\n".join(lines + render_cases(comparison, shown))


def failures_text(comparison: Comparison) -> str:
    """What failed the comparison, for an assertion message: the changed environment, then
    the regressing (and, under --strict, one-sided) cases."""
    failing = comparison.cases["regression"] | (comparison.gate.strict & (comparison.cases["side"] != "both"))
    lines = [note(comparison.differences)] if comparison.differences else []
    lines += [f"{verdict_line(comparison)} against the baseline {comparison.old_name}",
              f"environment: {environment_changes(comparison)}"]
    return "\n".join(lines + render_cases(comparison, comparison.cases[failing]))


def comparison_csv(comparison: Comparison) -> str:
    """Every case; an allowed comparison that is not like for like says so on every row."""
    cases = comparison.cases
    if comparison.differences:
        cases = cases.assign(not_like_for_like=note(comparison.differences))
    return cases.to_csv(index=False)
