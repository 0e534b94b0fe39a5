"""Under a memory budget nothing the plan did not count is held for the rest of the run: the
reference of an objective the run does not declare (a whole model's gradient, computed when a
step misses its target) is computed for each finding and freed after it, with the same
numbers as when it is kept."""

import dataclasses

import pytest

from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import prepare
from lossaudit.audit import judge as judge_module
from lossaudit.audit.judge import Judge
from lossaudit.audit.passes import param_blocks
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


@pytest.mark.parametrize("blocks", [2, 5])
def test_another_objectives_reference_in_blocks_gives_the_same_alternative(ctx, blocks):
    """Where a whole other reference does not fit beside the declared one and the step's
    gradient (passes.Footprint.other_blocks), it is taken block by block, each block compared
    and freed: the same alternative, to float64 rounding, and the same named objective."""
    layout = Layout(2, "contiguous", "right", group(ctx.batch, 2, "contiguous"))
    whole = Judge(ctx).measure(sequence_mean_step(ctx, layout))
    judge = Judge(dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, max_memory=100.0)))
    judge.other_blocks = blocks
    calls = []
    real = judge_module.compute_reference
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(judge_module, "compute_reference", lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw))
        blocked = judge.measure(sequence_mean_step(ctx, layout))
    assert len(calls) == len(param_blocks(ctx.params, blocks)) > 1 and sum(calls) == len(ctx.params)
    (a,), (b,) = whole.alternatives, blocked.alternatives
    assert a.objective == b.objective and a.loss == b.loss
    for field in ("rel_err", "cosine", "max_abs", "scale", "worst_rel_err"):
        x, y = getattr(a.grads, field), getattr(b.grads, field)
        assert abs(x - y) <= 1e-9 * max(abs(x), abs(y)), (field, x, y)
    assert a.grads.worst_param == b.grads.worst_param and b.grads.rel_err < 1e-6
