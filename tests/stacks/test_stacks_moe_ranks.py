"""The MoE router aux loss on N data-parallel ranks (issue 24, transformers#48690): judged against
coef x the mean of every rank's microbatches' aux, and a whole-factor error named for what carries it
(summed over microbatches, multiplied by the world size, or both)."""

import math

import pytest

import lossaudit
from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import prepare
from lossaudit.core.layouts import Layout, group

from judged import judged
from planted import AuxLoop
from test_distributed import no_children_left


@pytest.fixture(scope="module")
def mixtral():
    return prepare(CheckConfig(model="mixtral", microbatches=(4,)))


def on_two_ranks(ctx, aux_weight):
    """A 2-rank layout (4 microbatches of one sequence on each rank) judged in this process: the
    planted loop backwards coef x aux_weight(8) x each of the 8 microbatches' aux."""
    layout = Layout(4, "imbalanced", "right", group(ctx.batch, 8, "imbalanced"), 2)
    ((m, verdict, detail),) = judged(ctx, layout, [AuxLoop(aux_weight)])
    return m, verdict, detail


@pytest.mark.parametrize("weight,factor,named", [
    (lambda k: 2 / k, 2, "aux loss multiplied by the world size 2 (transformers#48690): 2x its mean"),
    (lambda k: 4 / k, 4, "aux loss summed over each rank's 4 microbatches: 4x their mean"),
    (lambda k: 1.0, 8, "aux loss summed over each rank's 4 microbatches and multiplied by the world size 2 "
                       "(transformers#48690): 8x their mean"),
])
def test_an_aux_loss_off_by_the_world_size_is_found_with_the_factor_named(mixtral, weight, factor, named):
    m, verdict, detail = on_two_ranks(mixtral, weight)
    assert verdict == "diverge" and m.layout.world_size == 2 and len(m.layout.groups) == 8
    assert math.isclose(m.aux, factor * m.aux_target.mean, rel_tol=1e-5)
    assert named in detail and "the cross-entropy part matches the reference" in detail
    assert m.grads.rel_err > 1e-5  # coef 0.02: the aux term is a small part of the gradient


def test_the_mean_over_every_ranks_microbatches_is_clean(mixtral):
    m, verdict, detail = on_two_ranks(mixtral, lambda k: 1 / k)
    assert verdict == "match", detail
    assert m.grads.rel_err < 1e-5


def test_k_equal_to_the_world_size_says_both_stories():
    from lossaudit.audit.causes import _aux_factors

    texts = [t for f, t in _aux_factors(4, 2) if f == 2]
    assert len(texts) == 2 and "world size 2" in texts[0] and "each rank's 2 microbatches" in texts[1]
    assert _aux_factors(3, 1) == [(3, "aux loss summed over 3 microbatches: 3x their mean")]


@pytest.mark.heavy  # 2 Trainer steps on 2 spawned ranks, about 60 s here
def test_the_trainers_default_on_a_moe_model_on_two_ranks_is_judged_as_measured():
    """The Trainer multiplies each rank's loss by the world size to undo DDP's average of a loss
    already divided by the step's token count (average_tokens_across_devices); the router aux term is
    in that loss, so it is carried world-size times (transformers#48690), and k times at k > 1."""
    from test_trainer_ranks import averages_tokens_by_default

    report = lossaudit.check("mixtral", path=["trainer"], world_size=2, batch_size=4, max_length=12, microbatches=[2],
                             paddings=["right"], groupings=["contiguous"])
    cases = report.cases.set_index("microbatches")
    assert list(cases.index) == [1, 2] and (cases["world_size"] == 2).all()
    for k, case in cases.iterrows():
        factor = case["aux_loss"] / case["layout_aux_loss"]
        assert "the cross-entropy part matches the reference" in case["detail"] or case["verdict"] == "match"
        if not averages_tokens_by_default():
            continue
        # transformers 5.25.0: 2x at k=1 (the world size), 4x at k=2 (each rank's 2 microbatches, x 2)
        assert factor == pytest.approx(2 * k, rel=1e-3) and case["verdict"] == "diverge"
        assert "multiplied by the world size 2 (transformers#48690)" in case["detail"]
    assert no_children_left() == []
