"""The trainer path on 2 gloo ranks: one real Trainer step under DDP per layout.

Each rank builds its own Trainer (which wraps the model in DDP) on the layout's microbatches of
that rank. Measured on transformers 5.23.0, tiny llama, --batch-size 4 --max-length 12
--microbatches 1,2 (ranks hold 12/16 and 6/22 target tokens, 28 in all):
- default (average_tokens_across_devices=True): every num_items_in_batch is 28, the loss is
  multiplied by 2 to undo DDP's average; gradient error 2.5e-7, logged loss 5.543895 = reference;
- average_tokens_across_devices=False: each rank divides by its own count (12/16 and 6/22):
  gradient error 0.143 (12/16) and 0.713 (6/22), while the logged loss is within 0.04% / 0.17%.
"""

import dataclasses
import json

import pytest

import lossaudit
from lossaudit.core.batch import BatchSpec
from lossaudit.audit.harness import batch_for
from lossaudit.models.loading import load_model
from lossaudit.models.compat import installed_name, trainer_accumulates_right, trainer_counts_unshifted, trainer_takes
from lossaudit.core.layouts import Layout
from lossaudit.paths.trainer_step import StepUnavailable, per_device_batch

from test_distributed import no_children_left

SMALL = dict(world_size=2, batch_size=4, max_length=12, microbatches=[1, 2])
FIELD = installed_name("average_tokens_across_devices")  # None before transformers 4.47


def first_labels(**spec) -> int:
    """Rows of the batch whose first token is a label (collator rows): what an unshifted count adds."""
    return sum(int(s.labels[0]) != -100 for s in batch_for(load_model("llama"), BatchSpec(**spec)).samples)


def averages_tokens_by_default() -> bool:
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    return FIELD is not None and fields[FIELD].default is True


def test_default_trainer_on_two_ranks_does_what_the_installed_release_does():
    report = lossaudit.check("llama", path=["trainer"], paddings=["right"], **SMALL)
    cases = report.cases
    total = report.batch["target_tokens"]
    assert len(cases) == 4 and (cases["world_size"] == 2).all()  # k=1 and 2, contiguous and length-sorted
    assert all(len(set(t)) == 2 for t in cases["rank_tokens"])  # the ranks really were uneven
    if averages_tokens_by_default() and trainer_accumulates_right() and trainer_counts_unshifted():
        # 4.46.2 .. 5.10.0: the gathered count also counts each collator row's first label
        assert report.exit_status == 1 and (cases["verdict"] == "diverge").all()
        assert all(n > total for t in cases["trainer_num_items"] for n in t)
        assert (cases["grad_scale"] < 1).all()
    elif averages_tokens_by_default() and trainer_accumulates_right():
        # 5.23: the count is gathered over ranks and the loss multiplied by the rank count
        assert report.exit_status == 0, cases[["microbatches", "grouping", "verdict", "detail"]]
        for _, case in cases.iterrows():
            assert case["grad_rel_err"] < 1e-5 and case["logged_loss_rel_err"] < 1e-5
            assert case["trainer_num_items"] == [total] * (2 * case["microbatches"])
    else:  # no gathered count (4.47.0: average_tokens_across_devices=False by default)
        assert report.exit_status == 1 and (cases["verdict"] == "diverge").all()
        if trainer_counts_unshifted():  # 4.46.2, 4.46.3: each rank's count plus its rows' first labels
            for _, case in cases.iterrows():
                k, given = case["microbatches"], case["trainer_num_items"]
                extra = [given[0] - case["rank_tokens"][0], given[k] - case["rank_tokens"][1]]
                assert all(e >= 0 for e in extra) and sum(extra) == first_labels(batch_size=4, max_length=12)
        else:
            assert all("per-rank normalisation" in d for d in cases[cases["microbatches"] == 1]["detail"])
    assert no_children_left() == []


@pytest.mark.heavy  # 2-rank Trainer steps through the CLI
@pytest.mark.skipif(FIELD is None, reason="TrainingArguments has no average_tokens_across_devices before 4.47")
def test_tokens_not_averaged_across_devices_is_found_and_named(tmp_path):
    from test_cli import run

    result = run("check", "llama", "--path", "trainer", "--world-size", "2", "--batch-size", "4",
                 "--max-length", "12", "--microbatches", "1,2",
                 "--trainer-arg", "average_tokens_across_devices=false", "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr[-2000:]
    cases = json.loads((tmp_path / "report.json").read_text())["cases"]
    assert len(cases) == 8
    for case in cases:
        assert case["verdict"] == "diverge" and case["grad_rel_err"] > 0.1, case["detail"]
        assert case["trainer_average_tokens_across_devices"] is False
        k, local, given = case["microbatches"], case["rank_tokens"], case["trainer_num_items"]
        if trainer_counts_unshifted():
            # 4.46.2 .. 5.10.0: each rank still counts only its own rows (never gathered), each
            # row's first label included. The trainer path names per-rank normalisation only
            # for exact per-rank counts.
            assert given == [given[0]] * k + [given[k]] * k
            extra = [n - t for n, t in zip((given[0], given[k]), local)]
            assert all(0 <= e <= 2 for e in extra) and sum(extra) == first_labels(batch_size=4, max_length=12)
            continue
        if case["microbatches"] == 1:  # whatever the release passes, one microbatch per rank names it
            assert "per-rank normalisation" in case["detail"]
        if not trainer_accumulates_right():  # 4.47.0, 4.48.0 pass no num_items_in_batch at all
            continue
        assert case["detail"].startswith("tokens not averaged across devices (average_tokens_across_devices=False)")
        assert "per-rank normalisation" in case["detail"]
        assert given == [local[0]] * k + [local[1]] * k  # each rank's own count
        assert case["logged_loss_rel_err"] < 0.01  # the loss curve hides it: look at gradients


@pytest.mark.heavy  # 2-rank Trainer steps, every one failing on a rank
@pytest.mark.skipif(not trainer_takes("compute_loss_func"), reason="the failure is planted in a compute_loss_func (4.46+)")
def test_a_rank_that_fails_makes_every_step_an_error_case():
    report = lossaudit.check("llama", path=["trainer"], loss_fn="planted:loss_raising_on_rank_1", world_size=2,
                             batch_size=4, max_length=12, microbatches=[2], groupings=["contiguous"],
                             paddings=["right"])
    cases = report.cases
    failed = cases[cases["reduction"] == "planted:loss_raising_on_rank_1"]
    assert len(cases) == 4 and len(failed) == 2  # full batch and k=2, with and without the function
    assert (failed["verdict"] == "error").all() and (cases[cases["reduction"].isna()]["verdict"] != "error").all()
    assert all(d.startswith("the Trainer step on 2 ranks failed: rank 1: ValueError: planted failure in compute_loss_func")
               for d in failed["detail"]), list(failed["detail"])
    assert report.exit_status == 1
    assert no_children_left() == []


def test_unequal_microbatches_over_ranks_are_refused_with_the_sizes():
    layout = Layout(2, "contiguous", "right", ((0, 1), (2,), (3, 4), (5,)), world_size=2)
    with pytest.raises(StepUnavailable, match=r"6 sequences do not split into 2 x 2 ranks of one size \(sizes \[1, 1, 2, 2\]\)"):
        per_device_batch(layout)


def test_logging_settings_belong_to_the_audit():
    from test_cli import assert_usage_error, run

    assert_usage_error(run("check", "llama", "--trainer-arg", "logging_steps=5"),
                       "--trainer-arg logging_steps: set by the audit")
