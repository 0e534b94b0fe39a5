"""--path lightning: a real lightning.Trainer(accumulate_grad_batches=k) step, its gradient read
at on_before_optimizer_step (forward and backward run inside optimizer.step's closure)."""

import pytest
import torch

from stacks_common import needs

needs("lightning")

from lossaudit.core.layouts import microbatches  # noqa: E402
from lossaudit.stacks.lightning import RECIPES, run_recipe, run_user_module  # noqa: E402

import stack_modules  # noqa: E402
from stacks_common import CPU, issue_batch, layout_of, mean_of_means_gradient, reference, rel_err, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    loaded = tiny_llama()
    batch = issue_batch(loaded)
    layout = layout_of(batch)
    assert len(set(batch.group_targets(layout.groups))) == 4  # uneven token counts
    return loaded.model, batch, layout, reference(loaded.model, batch)


def test_naive_is_the_mean_of_microbatch_means(setup):
    """Lightning#20350 (open): the gradient is exactly the mean of means, far from the token mean."""
    model, batch, layout, ref = setup
    step = run_recipe(model, microbatches(batch, layout), RECIPES.get("naive"), task=batch.task, device=CPU)
    assert rel_err(dict(mean_of_means_gradient(model, batch, layout)), step.gradient) < 1e-5
    assert rel_err(ref.grads, step.gradient) > 0.1
    assert step.extra["optimizer_steps"] == 1 and RECIPES.get("naive").expected


def test_token_count_recipe_matches_and_the_weights_come_back(setup):
    model, batch, layout, ref = setup
    before = [p.detach().clone() for p in model.parameters()]
    step = run_recipe(model, microbatches(batch, layout), RECIPES.get("token_count"), task=batch.task, device=CPU)
    assert rel_err(ref.grads, step.gradient) < 1e-5
    assert step.loss == pytest.approx(ref.loss, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.training


def test_the_users_module_with_its_own_optimizer(setup):
    model, batch, layout, ref = setup
    step = run_user_module(model, microbatches(batch, layout), stack_modules.token_count_module, device=CPU)
    assert rel_err(ref.grads, step.gradient) < 1e-5


def test_a_planted_bug_in_the_users_module_is_found(setup):
    """Normalised by the step's tokens, then divided by k again by Lightning: 1/k of the gradient."""
    model, batch, layout, ref = setup
    step = run_user_module(model, microbatches(batch, layout), stack_modules.forgets_k_module, device=CPU)
    assert rel_err(ref.grads, step.gradient) == pytest.approx(1 - 1 / 4, abs=1e-5)
