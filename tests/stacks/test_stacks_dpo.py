"""DPO (issue 22): TRL's DPOTrainer and DPO-style steps, judged against a float64 pair mean of the
sigmoid loss with a frozen reference model (the initial weights), over k microbatches of pairs."""

import pytest

import lossaudit
import stack_modules

from stacks_common import needs
from test_cli import assert_usage_error, run

RIGHT = dict(paddings=["right"])


def dpo(trainer_class="trl:DPOTrainer", ks=(1, 2, 4), **options):
    return lossaudit.check("llama", path=["trainer"], trainer_class=trainer_class, microbatches=list(ks),
                           **RIGHT, **options)


def verdicts(report) -> list[str]:
    return list(report.cases["verdict"])


# --- a DPO-style --step ------------------------------------------------------------------------

def step(fn, ks=(1, 2, 4), **options):
    return lossaudit.check("llama", path=["step"], step=fn, objective="pair-mean", microbatches=list(ks),
                           **RIGHT, **options)


def test_a_dpo_step_is_clean_against_the_pair_mean():
    report = step(stack_modules.dpo_step, ks=(1, 2, 4, 8))
    assert verdicts(report) == ["match"] * 4, list(report.cases["detail"])
    assert report.model["aggregation"] == "pair-mean"
    assert report.batch["sequences"] == 16  # 8 pairs: chosen and rejected rows


def test_a_dpo_step_on_uneven_microbatches_is_clean():
    """5 pairs in 2 microbatches (3 and 2): the window's pair count, not a mean of means."""
    assert verdicts(step(stack_modules.dpo_step, ks=(2,), batch_size=5)) == ["match"]


def test_microbatch_pair_means_summed_over_k_are_found_and_named():
    report = step(stack_modules.dpo_summed_means_step)
    assert verdicts(report) == ["match", "diverge", "diverge"]
    for k, detail in zip((2, 4), report.cases["detail"][1:]):
        assert f"each microbatch's pair mean summed over {k} microbatches, not divided by k" in detail, detail


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pair_losses_over_the_rows_are_found_and_named_at_every_k(dtype):
    report = step(stack_modules.dpo_rows_step, ks=(1, 4), dtype=dtype)
    assert verdicts(report) == ["diverge", "diverge"]
    for detail in report.cases["detail"]:
        assert "chosen and rejected counted apart: 1/2 of the pair mean" in detail, detail


def test_pair_objectives_refuse_token_paths_and_bad_trainer_args():
    assert_usage_error(run("check", "llama", "--objective", "pair-mean", "--step", "stack_modules:dpo_step",
                           "--path", "step", "--path", "model"), "--path model", "pair-mean")
    assert_usage_error(run("check", "llama", "--objective", "pair-mean:-1", "--step", "stack_modules:dpo_step"),
                       "--objective")


# --- TRL's DPOTrainer ---------------------------------------------------------------------------

@pytest.mark.heavy
def test_dpo_trainer_is_clean_at_k_1_2_4():
    needs("trl")
    report = dpo()
    assert verdicts(report) == ["match"] * 3, list(report.cases["detail"])
    assert list(report.cases["reduction"]) == ["DPOTrainer"] * 3
    assert report.model["aggregation_doc"] == "a pair mean of the DPO sigmoid loss (beta 0.1)"


@pytest.mark.heavy
@pytest.mark.parametrize("args", [{"beta": "0.5", "padding_free": "true"}, {"precompute_ref_log_probs": "true"}])
def test_dpo_trainer_is_clean_with_its_options(args):
    """beta reaches the reference; padding_free (trl 1.16 falls back to padding) and precomputed
    reference log-probabilities change nothing the step computes."""
    needs("trl")
    report = dpo(ks=(2,), trainer_args=args)
    assert verdicts(report) == ["match", "match"], list(report.cases["detail"])
    if "beta" in args:
        assert report.model["aggregation"] == "pair-mean:0.5"


@pytest.mark.heavy
def test_a_dpo_trainer_that_skips_the_accumulation_scaling_is_found():
    needs("trl")
    report = dpo("stack_modules:SummedDPOTrainer", ks=(1, 2, 4))
    assert verdicts(report) == ["match", "diverge", "diverge"]
    assert "summed over 4 microbatches, not divided by k: 4x the pair mean" in report.cases["detail"][2]
    assert report.exit_status == 1


def test_dpo_trainer_refuses_losses_it_does_not_compute_and_a_clashing_objective():
    needs("trl")
    assert_usage_error(run("check", "llama", "--path", "trainer", "--trainer-class", "trl:DPOTrainer",
                           "--trainer-arg", "loss_type=ipo"), "loss_type=ipo", "sigmoid")
    assert_usage_error(run("check", "llama", "--path", "trainer", "--trainer-class", "trl:DPOTrainer",
                           "--objective", "token-mean"), "--objective token-mean", "pair-mean")
