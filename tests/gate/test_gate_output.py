"""The gate's output: a summary first, then only the cases that changed; every case on request
and in the files written."""

import pytest
from test_baseline import BASE, case, report

from lossaudit.gate.baseline import compare
from lossaudit.gate.text import ONE_SIDED_ROWS, render_comparison
from lossaudit.gate.thresholds import MOVED, Gate
from lossaudit.sweep.compare import compare_sweeps, render
from lossaudit.sweep.run import SCHEMA

MANY = [case(k, padding=p, grouping=g) for k in (1, 2, 4, 8) for p in ("left", "right")
        for g in ("contiguous", "length_sorted", "imbalanced")]  # 24 cases, all matching


def table_rows(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    return lines[start + 1:]


def test_nothing_moved_prints_the_summary_and_no_table():
    text = render_comparison(compare(report(*MANY), report(*MANY, transformers="4.46.0")))
    lines = text.splitlines()
    assert lines[1] == "no regressions (24 case(s) in both, 0 only in OLD, 0 only in NEW)"
    assert "unchanged 24" in lines[2] and lines[3] == "  environment changes: transformers 4.45.2 -> 4.46.0"
    assert "no case changed" in text and "verdict old" not in text and len(lines) <= 6


def test_only_the_cases_that_moved_beyond_the_threshold_are_listed():
    new = list(MANY)
    new[3] = case(1, padding="right", grouping="contiguous", grad=9e-5)  # 9x over the 1e-5 floor: moved, no regression
    new[5] = case(1, padding="right", grouping="imbalanced", grad=1.9e-5)  # 1.9x: within MOVED, not listed
    new[7] = case(2, padding="left", grouping="length_sorted", verdict="diverge", grad=0.2)  # regression
    comparison = compare(report(*MANY), report(*new))
    assert list(comparison.cases["kind"]).count("same") == 22
    text = render_comparison(comparison)
    rows = table_rows(text)
    assert len(rows) == 2
    assert rows[0].startswith("model k=2 length_sorted pad-left") and "REGRESSION: matched, now diverges" in rows[0]
    assert rows[1].startswith("model k=1 contiguous pad-right") and rows[1].endswith("moved") and "x900" in rows[1]
    assert text.index("1 REGRESSION(S)") < text.index("cases that changed (2 of 24")
    assert f"errors moved more than {MOVED:g}x 1" in text
    every = render_comparison(comparison, full=True)
    assert len(table_rows(every)) == 24 and "environment (* = changed)" in every
    assert render_comparison(compare(report(*MANY), report(*new), Gate.parse(all_cases=True))) == every


def test_improvements_and_one_sided_cases_are_counted_and_listed():
    old = report(*BASE, case(8))
    new = list(BASE)
    new[3] = case(4)  # fixed
    comparison = compare(old, report(*new, case(2, world_size=2)))
    text = render_comparison(comparison)
    assert "regressions 0, improvements 1" in text
    assert "  only in OLD: 1 case(s) (model 1)" in text and "  only in NEW: 1 case(s) (model 1)" in text
    labels = [r.split("  ")[0] for r in table_rows(text)]
    assert labels[0] == "model k=4 contiguous pad-right"  # the improvement first, then the one-sided cases
    assert set(labels[1:]) == {"model k=8 contiguous pad-right", "model k=2 contiguous pad-right ranks=2"}


def test_many_cases_in_one_report_only_are_counted_per_path_not_listed():
    """A NEW audit restricted to --path model against a full OLD: the summary says which paths."""
    trainer = [case(k, path="trainer", padding=p) for k in (1, 2, 4, 8) for p in ("left", "right")] * 2
    comparison = compare(report(*MANY, *trainer), report(*MANY))
    assert len(comparison.one_sided) == 16 > ONE_SIDED_ROWS
    text = render_comparison(comparison)
    assert "  only in OLD: 16 case(s) (trainer 16)" in text and "no case changed" in text


def sweep(types, settings=None):
    rows = [{"model_type": t, "task": "causal-lm", "path": "model", "status": "pass", "reason": ""} for t in types]
    return {"schema": SCHEMA, "environment": {"transformers": "5.25.0"},
            "settings": {"tasks": ["causal-lm"], "paths": ["model"], **(settings or {})}, "rows": rows}


FULL = [f"type{i}" for i in range(200)]


@pytest.mark.parametrize("settings, phrase", [
    ({"types": ["type1", "type2", "type3", "type4"]}, "NEW was restricted with --types type1,type2,type3,type4"),
    ({}, "NEW holds only 4 of the other sweep's 200 types (restricted with --types?)"),  # a sweep too old to say
])
def test_a_restricted_sweep_against_a_full_one_says_so_instead_of_196_removed_types(settings, phrase):
    c = compare_sweeps(sweep(FULL), sweep(FULL[1:5], settings))
    assert c.removed == {} and len(c.uncovered["NEW"][1]) == 196 and c.exit_status == 0
    text = render(c)
    lines = text.splitlines()
    assert lines[1] == "0 regression(s) (pass -> finding), 0 status change(s), 0 new, 0 removed, 4 unchanged, 196 not swept in NEW"
    assert lines[2].startswith(f"  {phrase}: 196 type(s) of OLD were not swept in NEW")
    assert "type100" not in text  # not listed one by one


def test_types_that_a_full_sweep_lost_are_still_removed_types():
    c = compare_sweeps(sweep(FULL), sweep(FULL[:190]))
    assert len(c.removed) == 10 and not c.uncovered
    assert "removed types (10):" in render(c) and "  type195 (causal-lm): pass" in render(c)
