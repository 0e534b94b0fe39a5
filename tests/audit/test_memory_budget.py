"""Under a memory budget nothing the plan did not count is held for the rest of the run: the
reference of an objective the run does not declare (a whole model's gradient, computed when a
step misses its target) is computed for each finding and freed after it, with the same
numbers as when it is kept."""

import dataclasses

import pytest

from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import prepare
from lossaudit.audit.judge import Judge
from lossaudit.core.aggregation import SequenceMean
from lossaudit.core.layouts import Layout, group
from lossaudit.core.reference import compute_reference
from lossaudit.models.loading import load_model
from lossaudit.paths import Label, Outcome


@pytest.fixture(scope="module")
def ctx():
    loaded = load_model("llama", seed=0)
    return prepare(CheckConfig(model="llama", microbatches=(2,), batch_size=4, max_length=16), loaded)


def sequence_mean_step(ctx, layout):
    """A step that computes the sequence mean (a whole-gradient stream, as a step path's)."""
    other = dataclasses.replace(ctx.objective, aggregation=SequenceMean())
    reference = compute_reference(ctx.model, ctx.batch, ctx.params, ctx.device, objective=other)
    return Outcome(Label("a-step"), layout, reference.loss, [(n, reference.grads[n]) for n, _ in ctx.params])


@pytest.mark.parametrize("max_memory", [None, 100.0])
def test_another_objectives_reference_is_held_only_without_a_budget(ctx, max_memory):
    ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, max_memory=max_memory))
    layout = Layout(2, "contiguous", "right", group(ctx.batch, 2, "contiguous"))
    judge = Judge(ctx)
    ms = [judge.measure(sequence_mean_step(ctx, layout)) for _ in range(2)]
    for m in ms:  # the step misses the token mean and is that objective's, to float rounding
        assert m.grads.rel_err > 1e-3
        (alternative,) = m.alternatives
        assert alternative.objective.aggregation == SequenceMean() and alternative.grads.rel_err < 1e-6
    assert ms[0].alternatives[0].grads.rel_err == ms[1].alternatives[0].grads.rel_err
    assert (judge._others is None) == (max_memory is not None)
