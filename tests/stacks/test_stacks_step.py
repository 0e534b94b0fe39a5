"""--step: a user's training step function, run on a layout, its .grad read exactly."""

import math

import pytest
import torch

from lossaudit.core.layouts import microbatches
from lossaudit.stacks.step import run_step_function

import stack_modules
from stacks_common import CPU, issue_batch, layout_of, mean_of_means_gradient, reference, rel_err, tiny_llama


@pytest.fixture(scope="module")
def setup():
    loaded = tiny_llama()
    batch = issue_batch(loaded)
    return loaded.model, batch, layout_of(batch), reference(loaded.model, batch)


def test_the_correct_step_matches_the_token_mean(setup):
    model, batch, layout, ref = setup
    step = run_step_function(model, microbatches(batch, layout), stack_modules.token_mean_step, CPU)
    assert rel_err(ref.grads, step.gradient) < 1e-5
    assert step.loss == pytest.approx(ref.loss, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # cleared after the read


def test_the_planted_mean_of_means_is_found(setup):
    model, batch, layout, ref = setup
    step = run_step_function(model, microbatches(batch, layout), stack_modules.mean_of_means_step, CPU)
    assert rel_err(ref.grads, step.gradient) > 0.1
    assert rel_err(dict(mean_of_means_gradient(model, batch, layout)), step.gradient) < 1e-5


def test_stale_grads_are_zeroed_before_the_step(setup):
    model, batch, layout, ref = setup
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step = run_step_function(model, microbatches(batch, layout), stack_modules.token_mean_step, CPU)
    assert rel_err(ref.grads, step.gradient) < 1e-5


def test_a_step_that_returns_nothing_and_leaves_no_grad_says_so(setup):
    model, batch, layout, _ = setup
    step = run_step_function(model, microbatches(batch, layout), lambda m, mbs: None, CPU)
    assert math.isnan(step.loss) and all(g is None for _, g in step.gradient)
    assert step.notes == ["the step function left no gradient in .grad"]
