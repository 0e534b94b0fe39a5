"""DeepSpeed ZeRO on 2 spawned gloo ranks (issue 24), through the Trainer and through accelerate's
DeepSpeedPlugin: the gradient is read with deepspeed's safe_get_full_grad at the accumulation
boundary, before the optimizer step, and judged against the float64 reference.

Tiny llama, --batch-size 4 --max-length 12, imbalanced grouping, right padding (the ranks hold
6 and 22 target tokens at k=1); the toy (float32) for accelerate's planted recipe, where the
factor 1/(k x world size) must come out exact at k = 1, 2, 4."""

import json

import pytest

import lossaudit
from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import prepare, run_paths
from lossaudit.core.errors import EnvironmentProblem, UsageError
from lossaudit.core.layouts import plan_layouts
from lossaudit.stacks.deepspeed import ZERO_STAGES, stage_of, zero_config

from test_distributed import no_children_left

try:
    import deepspeed  # noqa: F401

    INSTALLED = True
except Exception:  # not installed, or it cannot import here
    INSTALLED = False

needs_deepspeed = pytest.mark.skipif(not INSTALLED, reason="deepspeed is not installed: pip install 'lossaudit[deepspeed]'")
SMALL = dict(world_size=2, batch_size=4, max_length=12, groupings=["imbalanced"], paddings=["right"])


# ---- what lossaudit writes, and what it refuses (no ranks) -------------------------------------

def test_the_written_config_leaves_the_audits_settings_to_the_trainer_or_gives_them():
    for name, stage in ZERO_STAGES.items():
        config = zero_config(stage)
        assert config["zero_optimization"] == {"stage": stage} and stage_of(config) == stage
        assert {config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                        "gradient_clipping")} == {"auto"}
        assert config["zero_allow_untested_optimizer"] is True  # ZeRO steps the audit's SGD only when allowed
    given = zero_config(3, k=4, micro_batch=2)  # accelerate fills in no "auto" without a dataloader
    assert (given["gradient_accumulation_steps"], given["train_micro_batch_size_per_gpu"], given["gradient_clipping"]) \
        == (4, 2, 0.0)


def write(tmp_path, config) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("options,line", [
    (dict(path=["trainer"], data_parallel="zero2"), "--data-parallel zero2: DeepSpeed runs on ranks here; give "
                                                    "--world-size 2 or more"),
    (dict(path=["step"], step="rank_steps:gathered_count_step", data_parallel="zero3", world_size=2),
     "--data-parallel zero3: runs on --path trainer or --path accelerate, not --path step"),
    (dict(data_parallel="zero1", world_size=2), "--data-parallel zero1: runs on --path trainer or --path accelerate; "
                                                "select it"),
    (dict(path=["trainer"], data_parallel="zero1", world_size=2, dtype="float64"),
     "DeepSpeed trains float32, bfloat16 or float16 parameters, not --dtype float64"),
    (dict(path=["trainer"], world_size=2, trainer_args=[("deepspeed", "/nonexistent/ds.json")]),
     "--trainer-arg deepspeed=/nonexistent/ds.json: no such file"),
    (dict(path=["accelerate"], world_size=2, trainer_args=[("deepspeed", "{}")]),
     "--trainer-arg deepspeed: runs on --path trainer, not --path accelerate"),
])
def test_what_deepspeed_cannot_run_is_refused_in_one_line(options, line):
    with pytest.raises(UsageError) as raised:
        lossaudit.check("llama", **options)
    assert any(line in problem for problem in raised.value.problems), raised.value.problems


def test_a_config_of_its_own_and_the_written_one_together_are_refused(tmp_path):
    own = write(tmp_path, zero_config(2))
    with pytest.raises(UsageError) as raised:
        lossaudit.check("llama", path=["trainer"], world_size=2, data_parallel="zero2",
                        trainer_args=[("deepspeed", own)])
    assert any("give one" in p for p in raised.value.problems), raised.value.problems


def test_fp16_loss_scaling_is_refused(tmp_path):
    own = write(tmp_path, {**zero_config(2), "fp16": {"enabled": True}})
    with pytest.raises(UsageError) as raised:
        lossaudit.check("llama", path=["trainer"], world_size=2, trainer_args=[("deepspeed", own)])
    assert any("fp16 (dynamic loss scaling) is not audited" in p for p in raised.value.problems)


def test_deepspeed_missing_is_an_environment_problem_naming_the_extra(monkeypatch):
    import lossaudit.stacks as stacks

    monkeypatch.setattr(stacks, "missing", lambda package: package == "deepspeed")
    with pytest.raises(EnvironmentProblem, match=r"--data-parallel zero2 needs deepspeed: "
                                                 r"pip install 'lossaudit\[deepspeed\]'"):
        CheckConfig(model="llama", paths=("trainer",), world_size=2, data_parallel="zero2")


def test_the_cli_refuses_with_exit_2_and_one_line():
    from test_cli import run

    result = run("check", "llama", "--path", "trainer", "--data-parallel", "zero3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--data-parallel zero3: DeepSpeed runs on ranks here; give --world-size 2 or more" in result.stderr


def test_accelerates_manual_loop_is_an_error_case_only_where_it_accumulates_under_zero():
    """Measured on every stage: DeepSpeed refuses model.no_sync() with a step inside (the loop's
    backward outside accumulate() steps every microbatch); at k=1 no no_sync is entered."""
    from lossaudit.core.batch import BatchSpec, make_batch
    from lossaudit.paths.accelerate import MANUAL_UNDER_ZERO, RECIPES, AcceleratePath

    batch = make_batch(BatchSpec(batch_size=4), vocab_size=100, pad_id=0)
    k1, k2 = plan_layouts(batch, (1, 2), paddings=("right",), groupings=("contiguous",), world_size=2)
    manual, accumulated = RECIPES.get("token_count"), RECIPES.get("token_count_accumulate")
    assert AcceleratePath(manual, data_parallel="zero2")._zero_refuses(k2) and not AcceleratePath(manual, data_parallel="zero2")._zero_refuses(k1)
    assert not AcceleratePath(manual)._zero_refuses(k2) and not AcceleratePath(accumulated, data_parallel="zero3")._zero_refuses(k2)
    assert "no_sync" in MANUAL_UNDER_ZERO and "accelerator.accumulate()" in MANUAL_UNDER_ZERO


# ---- the Trainer under ZeRO 1-3 on 2 ranks ------------------------------------------------------

def trainer_cases(data_parallel, loss_fn=None, ks=(1, 2), **more):
    """The Trainer path's cases (the run's own compute_loss_func alone when ``loss_fn`` is given:
    one spawn of 2 ranks)."""
    from lossaudit.paths.trainer import TrainerPath

    config = CheckConfig(model="llama", paths=("trainer",), data_parallel=data_parallel, loss_fn=loss_fn,
                         microbatches=ks, **{**SMALL, **more})
    ctx = prepare(config)
    path = TrainerPath.build(config)[-1]
    layouts = plan_layouts(ctx.batch, config.ks, paddings=config.paddings, groupings=config.groupings,
                           world_size=config.world_size)
    cases = run_paths(ctx, layouts, [path]).verdicts()
    assert not no_children_left()
    return cases


@pytest.mark.heavy
@needs_deepspeed
@pytest.mark.parametrize("data_parallel", ["zero1", "zero2", "zero3"])
def test_the_trainers_default_is_clean_under_every_zero_stage(data_parallel):
    cases = trainer_cases(data_parallel)
    assert [m.layout.microbatches for m, _, _ in cases] == [1, 2]
    for m, verdict, detail in cases:
        assert verdict == "match", detail
        assert m.grads.rel_err < 1e-5 and abs(m.grads.scale - 1) < 1e-5
        assert m.loss_rel_err < 1e-5  # the logged loss
        assert m.extra["deepspeed_zero_stage"] == ZERO_STAGES[data_parallel]
        assert len(set(m.extra["rank_tokens"])) == 2  # the ranks really were uneven


@pytest.mark.heavy
@needs_deepspeed
def test_a_compute_loss_dividing_by_gas_again_is_found_as_1_over_k():
    """The Trainer divides no compute_loss_func's loss and turns DeepSpeed's own GAS division off
    (scale_wrt_gas=False): the function's own division by k is the only one, 1/k (k=4, 2 ranks)."""
    cases = trainer_cases("zero3", "planted:loss_divided_by_gas_again", ks=(4,), batch_size=8)
    (full, _, _), (m, verdict, detail) = cases  # the full-batch arm (k=1) first: 1/1 is right
    assert full.grads.rel_err < 1e-5
    assert verdict == "diverge" and m.layout.microbatches == 4
    assert m.grads.scale == pytest.approx(0.25, rel=1e-4) and m.loss / m.target_loss == pytest.approx(0.25, rel=1e-5)
    assert "loss and gradient equal 1/4 of the token mean: divided by k on top of the token count" in detail


@pytest.mark.heavy
@needs_deepspeed
def test_a_compute_loss_ignoring_num_items_is_found_under_a_config_of_the_users(tmp_path):
    """--trainer-arg deepspeed=FILE (stage 2): each microbatch's mean, never divided by k, x the
    world size (average_tokens_across_devices) and averaged over the ranks."""
    own = write(tmp_path, zero_config(2))
    cases = trainer_cases("ddp", "planted:loss_ignoring_num_items", ks=(2,), trainer_args=(("deepspeed", own),))
    for m, verdict, detail in cases:
        assert verdict == "diverge" and m.extra["deepspeed_zero_stage"] == 2 and m.grads.rel_err > 1
    # the full-batch arm (k=1, contiguous) is not named, as under DDP (the same scale, 2.016, measured)
    m, _, detail = cases[1]
    assert m.layout.microbatches == 2
    assert "each microbatch's token mean, summed over k microbatches: num_items_in_batch ignored" in detail


# ---- accelerate's DeepSpeedPlugin on 2 ranks ----------------------------------------------------

@pytest.mark.heavy
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_accelerate_under_zero_the_documented_recipe_is_clean_and_a_one_process_loss_is_1_over_k_world(stage):
    """DeepSpeed's engine divides by k itself (accelerate's backward leaves scale_wrt_gas on) and
    averages the ranks: the docs' loss x k x world size is right; token sum / gathered count, right on
    one process, is 1/(k x 2), exact. (ZeRO-3 on the toy, whose parameters sit on the root module,
    does not run: its forward sees the partitioned stub; llama's rows are in the docs.)"""
    import planted
    from judged import judged
    from toy import ToyLM, toy_batch, toy_context

    from lossaudit.paths.accelerate import RECIPES, AcceleratePath, Recipe

    batch = toy_batch([9, 3, 7, 2, 5, 6, 4, 8], [1, 1, 4, 1, 2, 1, 3, 1])
    ctx = toy_context(batch, ToyLM().float())  # DeepSpeed refuses float64 parameters
    layouts = plan_layouts(batch, (1, 2, 4), paddings=("right",), groupings=("imbalanced",), world_size=2)
    recipes = [RECIPES.get("token_count_accumulate"), Recipe("one_process", planted.one_process_count, "accumulate")]
    cases = judged(ctx, layouts, [AcceleratePath(r, timeout_s=300, data_parallel=f"zero{stage}") for r in recipes])
    assert not no_children_left()
    for m, verdict, detail in cases:
        k = m.layout.microbatches
        assert m.extra["deepspeed_zero_stage"] == stage and m.extra["optimizer_steps"] == 1
        if m.label.reduction == "token_count_accumulate":
            assert verdict == "match" and m.grads.rel_err < 1e-5, detail
            continue
        assert verdict == "diverge" and m.grads.scale == pytest.approx(1 / (2 * k), rel=1e-5)
        assert f"loss and gradient equal 1/{2 * k} of the token mean" in detail
        if k > 1:
            assert "the accumulation steps divide it again" in detail and "averages over 2 ranks" in detail
