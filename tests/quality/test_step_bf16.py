"""Issue 25's bar: your own step (--step) in bf16 is judged per microbatch and its precision is
told apart from its normalisation, on every layout (three groupings, k = 1, 2, 4)."""

import pytest

import lossaudit

pytestmark = pytest.mark.heavy  # five audits of 9 layouts each: ~4 min on a 2-core CPU

LAYOUTS = dict(batch_size=8, max_length=16, microbatches=[1, 2, 4], groupings=["contiguous", "length_sorted", "imbalanced"],
               paddings=["right"], dtype="bfloat16", path=["step"])


def _cases(fn: str):
    report = lossaudit.check("llama", step=f"quality.bugs:{fn}", **LAYOUTS)
    return report, report.cases.set_index(["microbatches", "grouping"], drop=False)


def _show(cases) -> str:
    return cases[["microbatches", "grouping", "grad_scale", "microbatch_weights", "verdict", "detail"]].to_string()


def test_the_correct_step_is_clean_and_resolved_per_microbatch():
    report, cases = _cases("step_correct")
    assert report.exit_status == 0, _show(cases)
    assert all(w is not None and len(w) == k for w, k in zip(cases["microbatch_weights"], cases["microbatches"]))


def test_a_1pct_reweighting_is_found_on_every_layout_with_k_above_1():
    _, cases = _cases("step_reweight_1pct")
    many = cases[cases["microbatches"] > 1]
    assert len(many) == 6 and (many["verdict"] == "diverge").all(), _show(cases)
    assert (cases[cases["microbatches"] == 1]["verdict"] == "match").all(), _show(cases)


def test_a_1pct_rescale_is_found_everywhere():
    _, cases = _cases("step_rescale_1pct")
    assert (cases["verdict"] == "diverge").all(), _show(cases)
    assert cases["precision"].isna().all()  # a count, not precision
    assert cases["detail"].str.contains("uniform rescale|0.98", regex=True).all(), _show(cases)


def test_bf16_logits_are_named_precision_at_every_k():
    _, cases = _cases("step_bf16_logits")
    assert (cases["verdict"] == "diverge").all(), _show(cases)
    assert cases["precision"].str.startswith("cross entropy on bfloat16 logits").all(), _show(cases)
    many = cases[cases["microbatches"] > 1]
    assert many["detail"].str.contains("its normalisation matches its own k=1", regex=False).all(), _show(cases)


def test_bf16_logits_divided_by_k_are_precision_at_k1_and_a_mean_of_means_above():
    _, cases = _cases("step_bf16_logits_mean_of_means")
    one, many = cases[cases["microbatches"] == 1], cases[cases["microbatches"] > 1]
    assert one["precision"].notna().all() and not one["detail"].str.contains("token mean divided by k").any(), _show(one)
    assert many["detail"].str.contains("against its own k=1 (precision included): loss and gradient equal each "
                                       "microbatch's token mean divided by k", regex=False).all(), _show(many)


def test_one_backward_over_all_microbatches_says_it_is_not_resolved():
    report, cases = _cases("step_one_backward")
    many = cases[cases["microbatches"] > 1]
    assert report.exit_status == 0, _show(cases)
    assert many["detail"].str.contains("per-microbatch weights not resolved", regex=False).all()
    assert many["microbatch_weights"].isna().all()


def test_another_objective_is_not_named_a_count():
    _, cases = _cases("step_sequence_mean_by_k")  # each microbatch's sequence mean, divided by k
    assert (cases["verdict"] == "diverge").all(), _show(cases)
    # with equal sequences per microbatch this is the window's sequence mean: named as that
    # objective at every k (causes.objective_cause), never as a count over microbatches
    assert cases["detail"].str.contains("a mean of per-sequence token means", regex=False).all(), _show(cases)
    assert not cases["detail"].str.contains("microbatch's token mean", regex=False).any(), _show(cases)
