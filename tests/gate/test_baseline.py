"""The regression gate on synthetic reports: exactly which cases regress, and why."""

import json
import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossaudit.gate.baseline import CASE_KEY, compare
from lossaudit.gate.text import render_comparison
from lossaudit.core.errors import UsageError
from lossaudit.gate.thresholds import Gate, Growth, Limit
from lossaudit.report.report import Report

ENV = {"python": "3.11.7", "torch": "2.13.0", "transformers": "4.45.2", "accelerate": "1.0.0",
       "device": "cpu", "dtype": "float32", "seed": 0}


def case(k=2, verdict="match", grad=1e-7, loss=1e-8, path="model", reduction=None, padding="right",
         grouping="contiguous", world_size=1, expected=False):
    return {"path": path, "reduction": reduction, "microbatches": k, "padding": padding, "grouping": grouping,
            "world_size": world_size, "loss_rel_err": loss, "grad_rel_err": grad, "verdict": verdict,
            "expected": expected, "detail": ""}


def report(*cases, **env):
    return Report({**ENV, **env}, {"name": "llama", "task": "causal-lm", "parameters": 10},
                  pd.DataFrame(list(cases)), {"rtol": 1e-5, "floor": 1e-5})


def regressed(comparison):
    """The regressing cases as (path, k, padding) plus their status."""
    return {(r["path"], r["microbatches"], r["padding"]): r["status"]
            for r in comparison.regressions.to_dict(orient="records")}


BASE = [case(2), case(4), case(2, padding="left"), case(4, verdict="diverge", grad=0.2, loss=0.01),
        case(2, path="reduction", reduction="mean_of_means", verdict="diverge", grad=0.4, expected=True)]


def test_identical_reports_have_no_regression():
    comparison = compare(report(*BASE), report(*BASE))
    assert comparison.exit_status == 0 and not len(comparison.regressions) and not len(comparison.one_sided)
    assert set(comparison.cases["side"]) == {"both"} and len(comparison.cases) == len(BASE)


def test_a_case_that_matched_and_now_diverges_is_the_only_regression():
    new = list(BASE)
    new[1] = case(4, verdict="diverge", grad=0.3, loss=0.02)
    comparison = compare(report(*BASE), report(*new))
    assert regressed(comparison) == {("model", 4, "right"): "REGRESSION: matched, now diverges"}
    assert comparison.exit_status == 1
    assert comparison.cases.iloc[0]["microbatches"] == 4  # regressions are listed first


def test_a_case_that_now_fails_to_run_regresses_whether_it_matched_or_diverged():
    new = list(BASE)
    new[0] = case(2, verdict="error", grad=math.nan, loss=math.nan)
    new[3] = case(4, verdict="error", grad=math.nan, loss=math.nan)
    assert regressed(compare(report(*BASE), report(*new))) == {
        ("model", 2, "right"): "REGRESSION: matched, now fails to run (error)",
        ("model", 4, "right"): "REGRESSION: diverged, now fails to run (error)",
    }


def test_a_fixed_case_and_an_expected_reduction_that_moves_are_not_regressions():
    new = list(BASE)
    new[3] = case(4)  # the finding is fixed
    new[4] = case(2, path="reduction", reduction="mean_of_means", verdict="diverge", grad=40.0, expected=True)
    comparison = compare(report(*BASE), report(*new))
    assert comparison.exit_status == 0 and not len(comparison.regressions)
    kinds = {(r["path"], r["microbatches"], r["status"]): r["kind"] for r in comparison.cases.to_dict(orient="records")}
    assert kinds[("model", 4, "fixed: diverge -> match")] == "improvement"
    assert kinds[("reduction", 2, "expected to differ")] == "moved"  # 0.4 -> 40: listed, never a regression
    assert comparison.cases.iloc[0]["status"] == "fixed: diverge -> match"  # improvements before the unchanged


@pytest.mark.parametrize("old, new, gate, regresses", [
    (0.2, 2.1, Gate(), True),                                  # 10.5x > default 10x
    (0.2, 1.9, Gate(), False),                                 # 9.5x
    (0.2, 0.7, Gate.parse(max_grad_growth="3x"), True),        # 3.5x > 3x
    (0.2, 4.0, Gate.parse(max_grad_growth="off"), False),      # growth check off
    (1e-9, 9e-5, Gate(), False),                               # 9e-5 over the 1e-5 floor: 9x, no growth
    (1e-9, 2e-4, Gate(), True),                                # 20x over the floor
])
def test_gradient_growth_past_the_factor_regresses(old, new, gate, regresses):
    comparison = compare(report(case(4, verdict="diverge", grad=old)), report(case(4, verdict="diverge", grad=new)), gate)
    assert bool(len(comparison.regressions)) == regresses
    if regresses:
        assert comparison.regressions.iloc[0]["status"].startswith("REGRESSION: grad err grew")


@pytest.mark.parametrize("old, new, regresses", [
    (5e-5, 2e-4, True),   # crossed 1e-4
    (2e-4, 3e-4, False),  # was already past it: growth checks judge that
    (1e-6, 9e-5, False),  # grew, but stays below the limit (growth is off here)
])
def test_loss_error_growing_past_a_limit_regresses(old, new, regresses):
    gate = Gate.parse(max_loss_rel_err="1e-4", max_loss_growth="off")
    comparison = compare(report(case(loss=old, verdict="diverge")), report(case(loss=new, verdict="diverge")), gate)
    assert bool(len(comparison.regressions)) == regresses
    if regresses:
        assert "passed --max-loss-rel-err 0.0001" in comparison.regressions.iloc[0]["status"]


def test_cases_in_only_one_report_are_listed_and_fail_only_under_strict():
    old = report(*BASE, case(8))
    new = report(*BASE, case(2, world_size=2))  # another rank count is another case
    comparison = compare(old, new)
    one_sided = {(r["microbatches"], r["world_size"]): r["status"] for r in comparison.one_sided.to_dict(orient="records")}
    assert one_sided == {(8, 1): "only in OLD", (2, 2): "only in NEW"}
    assert comparison.exit_status == 0 and not len(comparison.regressions)
    strict = compare(old, new, Gate.parse(strict=True))
    assert strict.exit_status == 1 and not len(strict.regressions)
    assert set(strict.one_sided["status"]) == {"only in OLD (fails: --strict)", "only in NEW (fails: --strict)"}
    assert "FAILED under --strict: 2 case(s) in only one report" in render_comparison(strict)


def test_a_key_repeated_within_a_report_is_compared_in_order_not_merged_away():
    comparison = compare(report(case(2), case(2)), report(case(2), case(2, verdict="diverge", grad=0.1)))
    assert len(comparison.cases) == 2 and len(comparison.regressions) == 1


def test_the_environment_diff_comes_first_and_names_what_changed():
    comparison = compare(report(*BASE), report(*BASE, transformers="4.46.0"))
    changed = comparison.environment.set_index("field")["changed"]
    assert changed["transformers"] and not changed.drop("transformers").any()
    text = render_comparison(comparison)
    assert "  environment changes: transformers 4.45.2 -> 4.46.0" in text.splitlines()[:5]
    assert "verdict old" not in text  # nothing moved: no table
    full = render_comparison(comparison, full=True)
    assert full.index("transformers 4.45.2 -> 4.46.0") < full.index("verdict old")
    line = next(x for x in full.splitlines() if "transformers" in x and "->" not in x)
    assert line.split() == ["*", "transformers", "4.45.2", "4.46.0"]


def test_a_training_stacks_release_is_diffed_and_an_older_report_says_nothing_of_it():
    """peft, deepspeed, ...: recorded by environment(); a report from before they were recorded
    has no key, which is no change; a report that records one as not installed (None) is."""
    from lossaudit.report.environment import environment

    here = environment(device="cpu", dtype="float32", seed=0)
    assert {"peft", "lightning", "deepspeed", "axolotl", "ms-swift"} <= set(here)
    rows = lambda c: c.environment.set_index("field")  # noqa: E731
    upgraded = rows(compare(report(*BASE, peft="0.20.0"), report(*BASE, peft="0.21.2")))
    assert upgraded.loc["peft", "changed"] and upgraded.loc["peft", "new"] == "0.21.2"
    older = rows(compare(report(*BASE), report(*BASE, peft="0.21.2")))
    assert older.loc["peft", "old"] == "not recorded" and not older["changed"].any()
    installed = rows(compare(report(*BASE, deepspeed=None), report(*BASE, deepspeed="0.19.8")))
    assert installed.loc["deepspeed", "changed"] and "axolotl" not in installed.index
    assert "environment changes: deepspeed None -> 0.19.8" in render_comparison(
        compare(report(*BASE, deepspeed=None), report(*BASE, deepspeed="0.19.8")))


def test_a_report_read_back_from_json_compares_like_the_one_in_memory(tmp_path):
    new = list(BASE)
    new[0] = case(2, verdict="diverge", grad=0.1)
    (tmp_path / "old.json").write_text(json.dumps(report(*BASE).to_dict()))
    from_disk = compare(tmp_path / "old.json", report(*new))
    assert regressed(from_disk) == regressed(compare(report(*BASE), report(*new)))
    assert len(regressed(from_disk)) == 1


def test_bad_threshold_values_are_usage_errors_all_at_once():
    with pytest.raises(UsageError) as info:
        Gate.parse(max_grad_growth="0.5x", max_loss_rel_err="-1", max_speed="2")
    assert len(info.value.problems) == 3
    assert Gate.parse(max_grad_growth="5", max_loss_rel_err=1e-4).checks == (
        Growth("grad", 5.0), Growth("loss", 10.0), Limit("loss", 1e-4))


verdicts = st.sampled_from(["match", "diverge", "error"])
errors = st.floats(min_value=0, max_value=10, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from(["left", "right"]), verdicts, errors, errors),
                min_size=1, max_size=8, unique_by=lambda row: row[:2]), st.randoms())
def test_a_report_never_regresses_against_itself_in_any_order(rows, rnd):
    cases = [case(k, verdict=v, grad=g, loss=l, padding=p) for k, p, v, g, l in rows]
    shuffled = list(cases)
    rnd.shuffle(shuffled)
    comparison = compare(report(*cases), report(*shuffled))
    assert comparison.exit_status == 0 and not len(comparison.one_sided)
    assert len(comparison.cases) == len(cases)
    assert list(comparison.cases.columns[:len(CASE_KEY)]) == CASE_KEY
