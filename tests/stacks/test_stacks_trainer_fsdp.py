"""--path trainer --data-parallel fsdp2 on 2 spawned gloo ranks (issue 24): the Trainer's own FSDP2
(accelerate's FullyShardedDataParallelPlugin(fsdp_version=2)), its full gradient gathered
(DTensor.full_tensor) before its optimizer steps.

Tiny llama, --batch-size 4 --max-length 12 --microbatches 1,2, right padding: the ranks hold 12/16
(contiguous) and 6/22 (length-sorted) of the step's 28 target tokens."""

import pytest

import lossaudit
from lossaudit.core.errors import UsageError
from lossaudit.models.compat import installed_name, trainer_takes
from lossaudit.paths.fsdp2 import CPU_NOTE

from test_distributed import no_children_left

SMALL = dict(path=["trainer"], world_size=2, data_parallel="fsdp2", batch_size=4, max_length=12, paddings=["right"])


@pytest.mark.heavy  # 8 Trainer steps on 2 spawned ranks, about 55 s here
@pytest.mark.skipif(not trainer_takes("compute_loss_func"), reason="the plant is a compute_loss_func (4.46+)")
def test_the_trainers_default_is_clean_and_a_loss_ignoring_num_items_is_found_under_fsdp2():
    report = lossaudit.check("llama", loss_fn="planted:loss_ignoring_num_items", microbatches=[1, 2], **SMALL)
    cases = report.cases
    assert len(cases) == 8 and (cases["world_size"] == 2).all() and (cases["data_parallel"] == "fsdp2").all()
    assert all(CPU_NOTE in d for d in cases["detail"])  # sharded: the Trainer raises when no FSDPModule is left
    default, planted = cases[cases["reduction"].isna()], cases[cases["reduction"].notna()]
    assert set(default["verdict"]) == {"match"}, list(default["detail"])
    assert (default["grad_rel_err"] < 1e-5).all() and (default["logged_loss_rel_err"] < 1e-5).all()
    assert all(n == [28] * (2 * k) for n, k in zip(default["trainer_num_items"], default["microbatches"]))
    assert set(planted["verdict"]) == {"diverge"}
    # each microbatch's mean, x 2 ranks (the Trainer undoes FSDP2's average): scale 2 x k, whatever the counts
    assert (planted["grad_rel_err"] > 0.5).all()
    for _, case in planted.iterrows():
        assert case["loss"] / case["reference_loss"] == pytest.approx(2 * case["microbatches"], rel=0.5)
        assert "num_items_in_batch ignored" in case["detail"]
    assert report.exit_status == 1
    assert no_children_left() == []


@pytest.mark.heavy  # 2 Trainer steps on 2 spawned ranks
@pytest.mark.skipif(installed_name("average_tokens_across_devices") is None, reason="no such argument before 4.47")
def test_per_rank_counts_are_found_and_named_under_fsdp2():
    report = lossaudit.check("llama", microbatches=[1], trainer_args=[("average_tokens_across_devices", "false")],
                             **SMALL)
    cases = report.cases
    assert len(cases) == 2 and set(cases["verdict"]) == {"diverge"}
    for _, case in cases.iterrows():
        assert case["trainer_num_items"] == case["rank_tokens"]  # each rank's own count
        assert "per-rank normalisation" in case["detail"] and case["grad_rel_err"] > 0.1
    assert no_children_left() == []


@pytest.mark.parametrize("options,line", [
    (dict(trainer_args=[("fsdp", "true")]), "--trainer-arg fsdp: set by the audit: use --data-parallel fsdp2"),
    (dict(data_parallel="fsdp2", trainer_class="trl:SFTTrainer", world_size=2),
     "--trainer-class: runs in one process; --world-size 2 cannot run it"),
])
def test_the_trainers_fsdp_is_asked_for_through_data_parallel(options, line):
    with pytest.raises(UsageError) as raised:
        lossaudit.check("llama", path=["trainer"], **options)
    assert any(line in problem for problem in raised.value.problems), raised.value.problems
