"""Planted bugs that must be found, and their correct twins that must pass."""

import pytest

import lossaudit

# every default path at k=4 for each; the default tier finds the same plant in tests/quality
pytestmark = pytest.mark.heavy


def test_nanogpt_style_loss_over_grad_accum_steps_is_found():
    report = lossaudit.check("llama", microbatches=[4], reductions=["planted:nanogpt"])
    findings = report.findings
    assert report.exit_status == 1
    assert set(findings["reduction"]) == {"planted:nanogpt"}
    assert (findings["grad_rel_err"] > 1e-2).all()
    with __import__("pytest").raises(lossaudit.DivergenceError, match="planted:nanogpt"):
        report.assert_clean()


def test_the_correct_user_reduction_passes():
    report = lossaudit.check("llama", microbatches=[4], reductions=["planted:correct"])
    assert report.exit_status == 0
    report.assert_clean()
