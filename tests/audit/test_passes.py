"""Passes (lossaudit.audit.passes): logit paths whose gradient sums would not fit the memory together
run in more passes over each layout, with the same cases, numbers and verdicts as one pass and a
lower peak."""

import math

import pandas as pd
import pytest

from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import audit
from lossaudit.audit.memory import GIB, LiveTensorBytes
from lossaudit.models.loading import load_model
from lossaudit.audit.passes import plan, sum_groups, sums_per_pass
from lossaudit.paths.model import ModelPath
from lossaudit.paths.reduction import ReductionPath
from lossaudit.core.reductions import REDUCTIONS

WIDE = dict(hidden_size=256, intermediate_size=512, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2)


def reduction(name):
    return ReductionPath.of(REDUCTIONS.get(name))


def test_constant_weights_share_the_first_group_and_others_have_their_own():
    mom, num_items, seq, total, model = (reduction("mean_of_means"), reduction("num_items"),
                                         reduction("sequence_mean"), reduction("sum"), ModelPath())
    groups = sum_groups([mom, num_items, seq, total, model])
    assert groups == [[num_items, total], [mom], [seq], [model]]
    assert [p.own_backward for p in (mom, num_items, seq, total, model)] == [False, False, True, False, True]


def test_plan_keeps_path_order_and_puts_the_correct_reduction_first():
    mom, num_items, seq, total, model = (reduction("mean_of_means"), reduction("num_items"),
                                         reduction("sequence_mean"), reduction("sum"), ModelPath())
    paths = [mom, num_items, seq, total, model]
    assert plan(paths, None) == [paths]
    assert plan(paths, 4) == [paths]
    assert plan(paths, 2) == [[mom, num_items, total], [seq, model]]
    assert plan(paths, 1) == [[num_items, total], [mom], [seq], [model]]
    assert plan(paths, 0) == plan(paths, 1)  # never fewer than one sum a pass


def test_sums_per_pass_is_what_the_budget_leaves_above_the_reference():
    assert sums_per_pass(None, 10, 1, 0) is None
    assert sums_per_pass(75 * GIB, int(39.4 * GIB), 15 * GIB, 0) == 2
    assert sums_per_pass(75 * GIB, int(39.4 * GIB), 15 * GIB, 15 * GIB) == 1
    assert sums_per_pass(40 * GIB, int(39.4 * GIB), 15 * GIB, 0) == 1  # too little: still one


def run(max_memory):
    loaded = load_model("llama", seed=0, config_overrides=WIDE)
    config = CheckConfig(model="llama", paths=("reduction", "model"), microbatches=(1, 4), paddings=("right",),
                         groupings=("contiguous",), batch_size=8, max_length=16, max_memory=max_memory)
    with LiveTensorBytes() as meter:
        meter.count_existing(loaded.model)
        report = audit(config, loaded=loaded)
    return report, meter.peak, sum(p.numel() * p.element_size() for p in loaded.model.parameters())


@pytest.fixture(scope="module")
def one_and_many():
    return run(None), run(1e-6)  # a budget below anything: one sum a pass


def test_passes_give_the_same_cases(one_and_many):
    (one, _, _), (many, _, _) = one_and_many
    assert len(one.cases) == len(many.cases) == 2 * 5
    a, b = one.cases.drop(columns=["detail"]), many.cases.drop(columns=["detail"])
    for column in a.columns:
        for x, y in zip(a[column], b[column]):
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (column, x, y)
    pd.testing.assert_series_equal(one.cases["verdict"], many.cases["verdict"])


def test_passes_hold_fewer_sums_at_once(one_and_many):
    """One pass holds 4 sums (num_items and sum, mean_of_means, sequence_mean, model) and the kept
    correct gradient; one sum a pass holds at most its sum and the kept gradient: the peak falls
    by two to three parameter-sized tensors (where it falls inside a backward, parts of them)."""
    (_, peak_one, pb), (_, peak_many, _) = one_and_many
    assert 2 * pb <= peak_one - peak_many <= 3.5 * pb, (peak_one - peak_many) / pb


def test_a_budget_that_cannot_hold_the_smallest_pass_says_so():
    """One sum a pass is the least a pass holds, and a step path cannot be split: where even that
    does not fit --max-memory, the run says it in one line (what it needs, above what budget)."""
    import dataclasses

    from lossaudit.audit.harness import prepare
    from lossaudit.audit.passes import Footprint, passes_for, unheld

    loaded = load_model("llama", seed=0, config_overrides=WIDE)
    config = CheckConfig(model="llama", paths=("reduction",), reductions=("num_items",), microbatches=(1, 4),
                         paddings=("right",), groupings=("contiguous",), batch_size=8, max_length=16, max_memory=1e-6)
    ctx = prepare(config, loaded)
    paths = [reduction("num_items")]
    runs = passes_for(ctx, paths)
    assert runs == [paths]
    f = Footprint.of(ctx)
    pb = sum(p.numel() * p.element_size() for _, p in ctx.params)
    assert f.pass_bytes(ctx, paths) >= f.base + pb and f.step_bytes() >= f.base + 2 * pb
    said = unheld(ctx, runs, step_paths=False)
    assert said is not None and "cannot hold" in said and "--max-memory" in said
    roomy = dataclasses.replace(ctx, config=dataclasses.replace(config, max_memory=1000.0))
    assert unheld(roomy, runs, step_paths=True) is None
    assert unheld(dataclasses.replace(ctx, config=dataclasses.replace(config, max_memory=None)), runs, True) is None  # CPU: no default budget
