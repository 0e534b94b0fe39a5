"""PEFT: what a wrapped model scores (prompt tuning scores the first real token from the last
virtual one), the stock Trainer's count on it, adapters loaded without pickle or download."""

import dataclasses
import json

import pytest
import torch

from stacks_common import needs

needs("peft")

from lossaudit.audit.config import CheckConfig  # noqa: E402
from lossaudit.core.errors import UsageError  # noqa: E402
from lossaudit.core.forward import model_inputs  # noqa: E402
from lossaudit.core.grads import trainable  # noqa: E402
from lossaudit.core.layouts import full_batch, microbatches  # noqa: E402
from lossaudit.paths.base import AuditContext  # noqa: E402
from lossaudit.paths.trainer_step import trainer_step  # noqa: E402
from lossaudit.core.wrapped import virtual_tokens  # noqa: E402
from lossaudit.stacks.peft import load_adapter, peft_config, wrap, wrap_loaded  # noqa: E402
from lossaudit.stacks.step import run_step_function  # noqa: E402
from lossaudit.core.tokens import count_targets, prepend_ignored, token_losses  # noqa: E402

from stacks_common import CPU, issue_batch, layout_of, rel_err, tiny_llama  # noqa: E402

V = 4  # virtual tokens


def wrapped(method: str, **args):
    loaded = tiny_llama()
    return loaded, wrap(loaded.model, peft_config(method, args, "causal-lm"))


def scored_reference(model, batch):
    """The wrapped model's own full-batch token mean over exactly what it scores, in float64."""
    mb = full_batch(batch)
    labels = prepend_ignored(mb.labels, virtual_tokens(model))
    logits = model(**model_inputs(model, mb, CPU)).logits
    losses = token_losses(logits, labels, batch.task)
    count = count_targets(labels, batch.task)
    loss = losses.sum() / count
    params = trainable(model)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return float(loss.detach()), count, {n: g for (n, _), g in zip(params, grads)}


def collator_labels(batch):
    """The batch as DataCollatorForLanguageModeling labels it: labels = input_ids, so an unmasked
    sequence's first label is its first token (lossaudit's own batch ignores it; a plain causal
    LM never scores it after the shift, a prompt-tuned one does)."""
    samples = []
    for s in batch.samples:
        labels = s.labels.clone()
        if labels[1] != -100:
            labels[0] = s.input_ids[0]
        samples.append(dataclasses.replace(s, labels=labels))
    return dataclasses.replace(batch, samples=tuple(samples))


@pytest.fixture(scope="module")
def prompt_tuned():
    loaded, model = wrapped("prompt_tuning", num_virtual_tokens=V)
    batch = collator_labels(issue_batch(loaded))
    return model, batch, scored_reference(model, batch)


def test_prompt_tuning_scores_the_first_real_token(prompt_tuned):
    model, batch, (loss, count, _) = prompt_tuned
    first_is_target = sum(int(s.labels[0] != -100) for s in batch.samples)
    assert virtual_tokens(model) == V and first_is_target > 0
    assert count == sum(batch.targets) + first_is_target  # issue batch: 102 where the plain model has 98
    mb = full_batch(batch)  # the model's own loss is the token mean over those targets
    own = model(**model_inputs(model, mb, CPU), labels=mb.labels).loss
    assert float(own.detach()) == pytest.approx(loss, rel=1e-5)


def _ctx(model, batch):
    return AuditContext(model, batch, None, trainable(model), CPU, CheckConfig(model="llama"))


@pytest.mark.parametrize("k", [1, 4])
def test_the_stock_trainer_divides_prompt_tuning_by_the_plain_count(prompt_tuned, k):
    """Measured on transformers 4.46.0, 5.10.4, 5.23.0, 5.25.0: num_items_in_batch is the
    unwrapped count, so the step is scored/plain times the token mean, at every k."""
    model, batch, (_, count, grads) = prompt_tuned
    step = trainer_step(_ctx(model, batch), layout_of(batch, k), user_args={})
    plain = sum(batch.targets)
    assert set(step.num_items) == {plain}
    assert rel_err({n: g * count / plain for n, g in grads.items()}, step.update.items()) < 1e-5
    assert rel_err(grads, step.update.items()) == pytest.approx(count / plain - 1, rel=1e-3)


def _sum_step(divide_by):
    def step(model, mbs):
        for mb in mbs:
            model(**mb, num_items_in_batch=divide_by).loss.backward()
    return step


def test_a_step_dividing_by_what_the_wrapped_model_scores_matches(prompt_tuned):
    model, batch, (_, count, grads) = prompt_tuned
    layout = layout_of(batch)
    right = run_step_function(model, microbatches(batch, layout), _sum_step(count), CPU)
    assert rel_err(grads, right.gradient) < 1e-5
    planted = run_step_function(model, microbatches(batch, layout), _sum_step(sum(batch.targets)), CPU)
    assert rel_err(grads, planted.gradient) > 1e-2  # the plain count: found


def test_lora_with_the_stock_trainer_matches_over_the_adapter_only():
    loaded, model = wrapped("lora", r=2, init_lora_weights=False)  # B != 0: every adapter tensor has a gradient
    batch = issue_batch(loaded)
    _, count, grads = scored_reference(model, batch)
    assert virtual_tokens(model) == 0 and count == sum(batch.targets)
    assert all("lora_" in n for n in grads)
    step = trainer_step(_ctx(model, batch), layout_of(batch, 4), user_args={})
    assert rel_err(grads, step.update.items()) < 1e-5


def test_an_adapter_directory_round_trips(tmp_path):
    loaded, model = wrapped("lora", r=2, init_lora_weights=False)
    model.save_pretrained(tmp_path)
    again = load_adapter(tiny_llama().model, str(tmp_path), "causal-lm")
    saved = dict(trainable(model))
    assert [n for n, _ in trainable(again)] == list(saved)
    assert all(torch.equal(p, saved[n]) for n, p in trainable(again))


def test_a_pickled_or_missing_adapter_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no adapter_config.json"):
        load_adapter(tiny_llama().model, str(tmp_path), "causal-lm")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="a pickle"):
        load_adapter(tiny_llama().model, str(tmp_path), "causal-lm")


def test_an_unknown_method_or_argument_is_a_usage_error():
    with pytest.raises(UsageError, match="did you mean 'lora'"):
        peft_config("lorra", {}, "causal-lm")
    with pytest.raises(UsageError, match="LoraConfig refused"):
        peft_config("lora", {"rr": 2}, "causal-lm")


def test_wrap_loaded_takes_one_adapter_or_none():
    loaded = tiny_llama()
    assert wrap_loaded(loaded) is loaded
    wrapped_one = wrap_loaded(loaded, method="prompt_tuning", args={"num_virtual_tokens": 3})
    assert virtual_tokens(wrapped_one.model) == 3 and wrapped_one.task == loaded.task
    with pytest.raises(UsageError, match="give one"):
        wrap_loaded(tiny_llama(), adapter="somewhere", method="lora")


def test_prompt_tuning_drops_position_ids_so_left_padding_moves_every_position():
    """peft 0.21 ignores position_ids for prompt tuning (with a warning): a left-padded
    microbatch runs at positions shifted by its padding. Measured: 1.6e-2 with the stock
    Trainer at k=4 on the default batch. Right padding is off only by the stock Trainer's count
    (the batch is collator-shaped: the wrapped model scores every row's first token, the Trainer
    counts the plain targets); left padding is off by more."""
    loaded, model = wrapped("prompt_tuning", num_virtual_tokens=V)
    batch = issue_batch(loaded)
    _, count, grads = scored_reference(model, batch)
    counted = {n: g * count / sum(batch.targets) for n, g in grads.items()}  # what the stock Trainer trains
    right = trainer_step(_ctx(model, batch), layout_of(batch, 4, padding="right"), user_args={})
    left = trainer_step(_ctx(model, batch), layout_of(batch, 4, padding="left"), user_args={})
    assert rel_err(counted, right.update.items()) < 1e-5
    assert rel_err(counted, left.update.items()) > 1e-3
