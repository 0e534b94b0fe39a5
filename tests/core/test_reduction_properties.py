"""Properties of the reductions over any lengths, padding side, grouping and k, on an
exact float64 toy model, through the harness's own forward/backward code."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossaudit.core.layouts import GROUPINGS, PADDINGS, group, Layout
from lossaudit.paths.reduction import ReductionPath
from lossaudit.core.reductions import REDUCTIONS

from judged import judged
from toy import toy_batch, toy_context


@st.composite
def steps(draw):
    n = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(2, 12), min_size=n, max_size=n))
    prompts = [draw(st.integers(0, length - 1)) for length in lengths]  # 0: a collator row, no masking
    k = draw(st.integers(1, n))
    return lengths, prompts, k, draw(st.sampled_from(PADDINGS)), draw(st.sampled_from(GROUPINGS))


def _measure(lengths, prompts, k, padding, grouping):
    batch = toy_batch(lengths, prompts)
    ctx = toy_context(batch)
    layout = Layout(k, grouping, padding, group(batch, k, grouping))
    paths = [ReductionPath.of(REDUCTIONS.get(n)) for n in ("num_items", "mean_of_means")]
    return ctx, {m.label.reduction: m for m, _, _ in judged(ctx, layout, paths)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_num_items_equals_the_full_batch_token_mean(step):
    ctx, cases = _measure(*step)
    m = cases["num_items"]
    assert abs(m.loss - ctx.reference.loss) <= 1e-12 * abs(ctx.reference.loss)
    assert m.grads.rel_err <= 1e-12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_mean_of_means_is_exact_iff_microbatches_hold_equal_token_counts(step):
    ctx, cases = _measure(*step)
    m = cases["mean_of_means"]
    if len(set(m.counts)) == 1:
        assert abs(m.loss - ctx.reference.loss) <= 1e-12 * abs(ctx.reference.loss)
        assert m.grads.rel_err <= 1e-12
    else:
        # unequal counts reweight tokens; a random model's gradient always shows it
        assert m.grads.rel_err > 1e-9


@settings(max_examples=40, deadline=None)
@given(steps())
def test_reference_step_loss_agrees_with_the_forward(step):
    """The no-forward prediction of a reduction's loss (used to name causes) is exact."""
    lengths, prompts, k, padding, grouping = step
    ctx, cases = _measure(*step)
    layout = Layout(k, grouping, padding, group(ctx.batch, k, grouping))
    for name in ("num_items", "mean_of_means"):
        predicted = ctx.reference.step_loss(ctx.batch, layout, REDUCTIONS.get(name))
        assert abs(predicted - cases[name].loss) <= 1e-12 * abs(cases[name].loss)
