"""--trainer-class: a Trainer subclass (TRL's SFTTrainer) with its own dataset preparation and
collator: plain, completion-only and padding-free steps, a model class that sets
accepts_loss_kwargs=False, a planted bug, and the objectives that are refused."""

import pytest

from stacks_common import needs

needs("trl")

import trl  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from lossaudit.models.compat import KFOLD_RELEASES, trainer_accumulates_right, transformers_version  # noqa: E402

from lossaudit.audit.config import CheckConfig  # noqa: E402
from lossaudit.core.errors import UsageError  # noqa: E402
from lossaudit.core.grads import trainable  # noqa: E402
from lossaudit.paths.base import AuditContext  # noqa: E402
from lossaudit.paths.trainer_class import run_trainer_class  # noqa: E402
from lossaudit.stacks.frameworks import required_problem, rows_problem  # noqa: E402
from lossaudit.stacks.trl import arguments_class, resolve_trainer_class  # noqa: E402

from stacks_common import (CPU, issue_batch, layout_of, mean_of_means_gradient, reference, rel_err,  # noqa: E402
                           tiny_llama)

SFT = "trl:SFTTrainer"
# completion_mask rows, padding_free and a compute_loss of its own came with TRL 0.20-1.x; 0.13's
# SFTTrainer pads with the tokenizer, so it takes input_ids alone (a batch without masked prompts)
MODERN = pytest.mark.skipif(Version(trl.__version__) < Version("1.0"), reason=f"trl {trl.__version__} < 1.0")


def context(model_class=None, **spec):
    loaded = tiny_llama()
    if model_class is not None:
        model = model_class(loaded.model.config)
        model.load_state_dict(loaded.model.state_dict())
        model.train()
        loaded.model = model
    batch = issue_batch(loaded, **spec)
    ref = reference(loaded.model, batch)
    return AuditContext(loaded.model, batch, ref, trainable(loaded.model), CPU, CheckConfig(model="llama"), loaded)


@pytest.fixture(scope="module")
def ctx():
    return context()


@MODERN
@pytest.mark.parametrize("args", [{}, {"completion_only_loss": True}, {"padding_free": True, "max_length": None},
                                  {"packing": True, "max_length": 32}],
                         ids=["labels", "completion-only", "padding-free", "packing"])
def test_sfttrainer_matches_the_token_mean(ctx, args):
    """Measured: trl 1.16.0 with transformers 5.25.0, <= 2.4e-7. Packing makes its own rows (bfd:
    fewer than the sequences), so the step holds fewer microbatches, each told the step's count."""
    step = run_trainer_class(ctx, layout_of(ctx.batch, 4), resolve_trainer_class(SFT), user_args=args)
    assert rel_err(ctx.reference.grads, step.update.items()) < 1e-5
    assert step.logged_loss == pytest.approx(ctx.reference.loss, rel=1e-5)
    assert set(step.num_items) == {ctx.reference.count}
    assert len(step.num_items) == 4 or args.get("packing")


def test_sfttrainer_on_plain_rows_on_the_installed_release():
    """Measured: trl 1.16.0 + transformers 5.25.0 matches; trl 0.13.0 + transformers 4.47.0 is
    k times the token mean (trl#2604; the Trainer passes no num_items_in_batch and no longer
    divides by k): exactly the sum of the microbatch means."""
    plain = context(prompt_masking=False)
    layout = layout_of(plain.batch, 4)
    step = run_trainer_class(plain, layout, resolve_trainer_class(SFT), user_args={})
    if trainer_accumulates_right():
        assert rel_err(plain.reference.grads, step.update.items()) < 1e-5
        return
    scale = 4 if transformers_version() in KFOLD_RELEASES else 1  # before 4.46: the mean of means
    expected = {n: scale * g for n, g in mean_of_means_gradient(plain.model, plain.batch, layout)}
    assert rel_err(expected, step.update.items()) < 1e-5
    assert rel_err(plain.reference.grads, step.update.items()) > 0.1


class NoLossKwargsLlama(LlamaForCausalLM):
    """A Llama whose class says, as 27 image-text-to-text classes of transformers 5.23 do, that
    its forward takes no loss kwargs (Gemma4ForConditionalGeneration, Qwen2.5-VL, ...)."""

    accepts_loss_kwargs = False


@MODERN
def test_a_model_that_refuses_loss_kwargs_makes_sfttrainer_a_mean_of_means():
    ctx = context(NoLossKwargsLlama)
    layout = layout_of(ctx.batch, 4)
    step = run_trainer_class(ctx, layout, resolve_trainer_class(SFT), user_args={})
    assert step.accepts_loss_kwargs is False and step.num_items == [None] * 4
    assert rel_err(ctx.reference.grads, step.update.items()) > 0.1
    assert rel_err(dict(mean_of_means_gradient(ctx.model, ctx.batch, layout)), step.update.items()) < 1e-5


@MODERN
def test_a_planted_bug_in_a_subclass_is_found(ctx):
    cls = resolve_trainer_class("stack_modules:OwnCountSFTTrainer")
    step = run_trainer_class(ctx, layout_of(ctx.batch, 4), cls, user_args={})
    assert rel_err(ctx.reference.grads, step.update.items()) > 0.1


@pytest.mark.parametrize("name", ["RewardTrainer"] + (["GRPOTrainer"] if hasattr(trl, "GRPOTrainer") else []))
def test_other_objectives_are_refused_naming_them(name):
    with pytest.raises(UsageError, match=f"{name} trains .*not a token mean"):
        resolve_trainer_class(f"trl:{name}")


def test_dpo_declares_its_pair_mean_instead_of_being_refused():
    """issue 22: audited against the objective it declares (tests/stacks/test_stacks_dpo.py)."""
    from lossaudit.core.aggregation import PairMean
    from lossaudit.stacks.trl import declared_aggregation

    cls = resolve_trainer_class("trl:DPOTrainer")
    assert declared_aggregation(cls, {"beta": 0.3}) == PairMean(0.3)
    assert declared_aggregation(resolve_trainer_class(SFT), {}) is None


def test_not_a_trainer_is_refused_and_the_config_class_is_found():
    with pytest.raises(UsageError, match="not a subclass of transformers.Trainer"):
        resolve_trainer_class("collections:OrderedDict")
    assert arguments_class(resolve_trainer_class(SFT)).__name__ == "SFTConfig"  # its __init__'s args annotation
    assert required_problem(resolve_trainer_class(SFT)) is None


def test_a_config_value_the_class_refuses_is_a_usage_error(ctx):
    with pytest.raises(UsageError, match="SFTConfig refused"):
        run_trainer_class(ctx, layout_of(ctx.batch, 2), resolve_trainer_class(SFT), user_args={"no_such_field": 1})



def test_prompt_masked_rows_are_refused_exactly_where_the_release_cannot_pad_them(ctx):
    """trl 0.13.0's SFTTrainer (transformers' DataCollatorForLanguageModeling) errors on every case
    on prompt-masked labels ("Unable to create tensor"): refused in one line naming
    --no-prompt-masking; a release whose own collator pads labels runs them (issue 23)."""
    cls = resolve_trainer_class(SFT)
    problem = rows_problem(cls, prompt_masking=True)
    assert rows_problem(cls, prompt_masking=False) is None
    if problem is None:
        step = run_trainer_class(ctx, layout_of(ctx.batch, 2), cls, user_args={})
        assert len(step.num_items) == 2
    else:
        assert "--no-prompt-masking" in problem and "\n" not in problem
        with pytest.raises(Exception, match="Unable to create tensor|excessive nesting|labels"):
            run_trainer_class(ctx, layout_of(ctx.batch, 2), cls, user_args={})
