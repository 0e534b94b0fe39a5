"""--objective (issue 22): a step is judged against the aggregation it declares; a step that
computes another objective is named as that objective (never as an accumulation bug), and only
where its loss and gradient fit it; a bug in reaching the declared objective is still found."""

import json

import pytest

import lossaudit
import stack_modules

from test_cli import assert_usage_error, run

SMALL = dict(path=["step"], paddings=["right"], groupings=["imbalanced"])


def audit(step, *, ks=(1, 2, 4), **options):
    return lossaudit.check("llama", step=step, microbatches=list(ks), **SMALL, **options)


def details(report) -> list[str]:
    return list(report.cases["detail"])


def test_a_step_declaring_the_sequence_mean_is_clean():
    report = audit(stack_modules.sequence_mean_step, objective="sequence-mean")
    assert list(report.cases["verdict"]) == ["match"] * 3, details(report)
    assert report.model["aggregation"] == "sequence-mean"
    assert report.model["aggregation_doc"] == "a mean of per-sequence token means"
    assert report.exit_status == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_same_step_undeclared_is_named_a_sequence_mean_at_every_k(dtype):
    report = audit(stack_modules.sequence_mean_step, dtype=dtype)
    assert list(report.cases["verdict"]) == ["diverge"] * 3  # the token mean is declared: a finding
    for detail in details(report):
        assert "loss and gradient equal a mean of per-sequence token means (sequence-mean)" in detail, detail
        assert "not an accumulation bug" in detail and "--objective sequence-mean" in detail
        assert "divided by k" not in detail and "num_items" not in detail


def test_a_sum_over_a_constant_is_named_with_its_constant_and_clean_when_declared():
    undeclared = audit(stack_modules.sum_over_step, ks=(1, 4))
    for detail in details(undeclared):
        assert f"a sum over a constant {stack_modules.SUM_OVER}" in detail, detail
        assert f"--objective sum-over:{stack_modules.SUM_OVER}" in detail
    declared = audit(stack_modules.sum_over_step, ks=(1, 4), objective=f"sum-over:{stack_modules.SUM_OVER}")
    assert list(declared.cases["verdict"]) == ["match"] * 2, details(declared)
    other = audit(stack_modules.sum_over_step, ks=(1,), objective="sum-over:100")  # the wrong constant
    assert other.cases["verdict"][0] == "diverge"
    assert f"a sum over a constant {stack_modules.SUM_OVER}" in other.cases["detail"][0]


def test_a_token_mean_step_under_a_declared_sequence_mean_is_named_the_token_mean():
    report = audit(stack_modules.token_mean_step, ks=(1, 4), objective="sequence-mean")
    for detail in details(report):
        assert "loss and gradient equal the token mean over the optimizer window (token-mean)" in detail, detail


def test_an_accumulation_bug_is_still_named_as_one():
    report = audit(stack_modules.mean_of_means_step, ks=(1, 4))
    assert list(report.cases["verdict"]) == ["match", "diverge"]
    detail = report.cases["detail"][1]
    assert "each microbatch's token mean divided by k" in detail and "different objective" not in detail, detail


def test_a_bug_in_reaching_the_declared_sequence_mean_is_found_and_not_named_one():
    """Averaging microbatch means of sequence means is right only where every microbatch holds as
    many sequences: 6 sequences in 4 microbatches (2, 2, 1, 1) is not."""
    report = audit(stack_modules.microbatch_sequence_mean_step, ks=(1, 4), batch_size=6, objective="sequence-mean")
    assert list(report.cases["verdict"]) == ["match", "diverge"], details(report)
    assert "equal a mean of per-sequence token means" not in report.cases["detail"][1]
    assert report.exit_status == 1


def test_bad_objectives_are_one_line_and_exit_2():
    assert_usage_error(run("check", "llama", "--path", "step", "--step", "stack_modules:sequence_mean_step",
                           "--objective", "sequence-mean:3"), "--objective", "sequence-mean:3")
    assert_usage_error(run("check", "llama", "--objective", "sum-over:0"), "--objective", "sum-over:0")
    assert_usage_error(run("check", "llama", "--objective", "pair-mean"), "--objective pair-mean", "--step")
    with pytest.raises(lossaudit.UsageError, match="unknown objective"):
        lossaudit.check("llama", objective="median")


def test_the_cli_declares_it_and_the_report_shows_it(tmp_path):
    result = run("check", "llama", "--path", "step", "--step", "stack_modules:sequence_mean_step",
                 "--objective", "sequence-mean", "--microbatches", "2", "--paddings", "right",
                 "--groupings", "contiguous", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["model"]["aggregation"] == "sequence-mean" and report["model"]["objective"] == "token cross entropy"
    assert "objective: a mean of per-sequence token means (sequence-mean)" in result.stdout
    assert "a mean of per-sequence token means (sequence-mean) of token cross entropy in float64" in \
        (tmp_path / "r" / "report.md").read_text()


def test_one_sequence_per_microbatch_a_mean_of_means_stays_an_accumulation_bug():
    """At k = B a mean of microbatch means equals the sequence mean: the path that matches at k=1
    is named the accumulation bug (the same numbers said), the sequence-mean step the objective."""
    bug = audit(stack_modules.mean_of_means_step, ks=(1, 8))
    assert list(bug.cases["verdict"]) == ["match", "diverge"]
    detail = bug.cases["detail"][1]
    assert detail.startswith("loss and gradient equal each microbatch's token mean divided by k"), detail
    assert "on this layout the same numbers as a mean of per-sequence token means" in detail
    objective = audit(stack_modules.sequence_mean_step, ks=(1, 8))
    for detail in objective.cases["detail"]:
        assert detail.startswith("loss and gradient equal a mean of per-sequence token means"), detail


def test_a_sum_over_a_count_near_the_steps_own_is_called_a_miscount_first():
    report = audit(stack_modules.miscount_step, ks=(1,))
    n = int(report.batch["target_tokens"])
    detail = report.cases["detail"][0]
    assert f"the token sum over {n + 2}, not over the step's {n} target tokens: a miscount" in detail, detail
    assert "different objective" not in detail
