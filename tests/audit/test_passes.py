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
import torch

from lossaudit.audit import passes
from lossaudit.audit.passes import Footprint, block_bytes, blocks_for, param_blocks, passes_for, plan, sum_groups, sums_per_pass, unheld
from lossaudit.core.errors import UsageError
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


def fake_budget(parameter_tensors):
    """Footprint.of with the reference's peak and the transients at 0 and a budget of
    ``parameter_tensors`` parameter-sized tensors above the model path's logits: what the
    planner decides from, without the process's own noise (the CPU measures what it holds)."""
    def of(cls, ctx, step_paths=False):
        pb = sum(p.numel() * p.element_size() for _, p in ctx.params)
        return cls(int(parameter_tensors * pb) + Footprint.logits(ctx, [ModelPath()]), 0, pb, 0)
    return classmethod(of)


def run(parameter_tensors, dtype="float32", blocks=True):
    """An audit under ``fake_budget(parameter_tensors)`` (None: no budget, not even the default
    target: one pass, one block); ``blocks`` False:
    a block of parameters costs as much as all of them, so only passes can fit the budget."""
    loaded = load_model("llama", seed=0, config_overrides=WIDE)
    config = CheckConfig(model="llama", paths=("reduction", "model"), microbatches=(1, 4), paddings=("right",),
                         groupings=("contiguous",), batch_size=8, max_length=16, dtype=dtype)
    said = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Footprint, "of", fake_budget(parameter_tensors) if parameter_tensors is not None else
                      classmethod(lambda cls, ctx, step_paths=False: None))
        if not blocks:
            patch.setattr(passes, "block_bytes", lambda params, n: sum(p.numel() * p.element_size() for _, p in params))
        with LiveTensorBytes() as meter:
            meter.count_existing(loaded.model)
            report = audit(config, said.append, loaded=loaded)
    return report, meter.peak, sum(p.numel() * p.element_size() for p in loaded.model.parameters()), said


@pytest.fixture(scope="module")
def one_and_many():
    return run(None), run(2.0, blocks=False)  # room for one sum and the kept gradient: one sum a pass


def test_passes_give_the_same_cases(one_and_many):
    (one, _, _, _), (many, _, _, said) = one_and_many
    assert any("4 passes" in line for line in said) and not any("blocks" in line for line in said)
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
    (_, peak_one, pb, _), (_, peak_many, _, _) = one_and_many
    assert 2 * pb <= peak_one - peak_many <= 3.5 * pb, (peak_one - peak_many) / pb


def close(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return (math.isnan(x) and math.isnan(y)) or x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-300)
    return x == y


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.heavy)])
def test_blocks_of_parameters_give_the_same_numbers_and_verdicts(dtype, one_and_many):
    """Under a budget below one whole sum and its kept gradient, the parameters run in blocks,
    each block's sums compared and freed before the next: every case's numbers are those of one
    block to float64 rounding (the products summed over blocks), the verdicts the same, the
    planted findings (mean_of_means and sequence_mean over unequal microbatches) found, and the
    peak lower than one sum a pass."""
    one, _, _, _ = run(None, dtype) if dtype != "float32" else one_and_many[0]
    blocked, peak_blocked, pb, said = run(1.0, dtype)
    assert any("blocks to fit --max-memory" in line for line in said), said
    a, b = one.cases.drop(columns=["detail"]), blocked.cases.drop(columns=["detail"])
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 2 * 5
    for column in a.columns:
        for x, y in zip(a[column], b[column]):
            assert close(x, y), (column, x, y)
    assert list(one.cases["verdict"]) == list(blocked.cases["verdict"])
    found = blocked.cases[blocked.cases["verdict"] == "diverge"]
    assert set(found["reduction"]) >= {"mean_of_means", "sequence_mean"}, blocked.cases[["reduction", "verdict"]]
    if dtype == "float32":
        _, peak_many, _, _ = one_and_many[1]
        assert peak_blocked < peak_many - pb / 4, (peak_blocked / pb, peak_many / pb)


def test_param_blocks_are_contiguous_and_cover_every_parameter():
    params = [(str(i), torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate([5, 1, 1, 8, 2, 2, 2, 3])]
    for n in range(1, 10):
        blocks = param_blocks(params, n)
        assert [i for b in blocks for i in b] == list(range(len(params))) and all(blocks)
        assert len(blocks) <= max(n, 1) + 1
    assert param_blocks(params, 1) == [list(range(8))]
    assert block_bytes(params, 100) == 8 * 4  # the largest tensor: no smaller block


def test_a_budget_that_cannot_hold_the_smallest_pass_refuses_in_one_line():
    """One sum of the smallest block a pass is the least a pass holds, and a step path cannot be
    split: where even that does not fit --max-memory, the run refuses (exit 2) in one line saying
    the least it needs."""
    import dataclasses

    from lossaudit.audit.harness import prepare

    loaded = load_model("llama", seed=0, config_overrides=WIDE)
    config = CheckConfig(model="llama", paths=("reduction",), reductions=("num_items",), microbatches=(1, 4),
                         paddings=("right",), groupings=("contiguous",), batch_size=8, max_length=16, max_memory=1e-6)
    ctx = prepare(config, loaded)
    paths = [reduction("num_items")]
    runs = passes_for(ctx, paths)
    assert runs == [paths]
    assert blocks_for(ctx, runs) is None
    f = Footprint.of(ctx)
    pb = sum(p.numel() * p.element_size() for _, p in ctx.params)
    assert f.pass_bytes(ctx, paths) >= f.base + pb and f.step_bytes() >= f.base + pb
    said = unheld(ctx, runs, step_paths=False, blocks=None)
    assert said is not None and "cannot hold" in said and "--max-memory" in said and "\n" not in said
    assert f"at least {f.pass_bytes(ctx, paths, len(ctx.params)) / GIB:.2f} GiB" in said
    with pytest.raises(UsageError, match="cannot hold this audit"):
        audit(config, loaded=loaded)
    roomy = dataclasses.replace(ctx, config=dataclasses.replace(config, max_memory=1000.0))
    assert unheld(roomy, runs, step_paths=True) is None and blocks_for(roomy, runs) == 1
    assert unheld(dataclasses.replace(ctx, config=dataclasses.replace(config, max_memory=None)), runs, True) is None  # CPU: no limit but --max-memory


def test_the_plan_takes_the_fewest_runs_over_a_layout(monkeypatch):
    """Passes and blocks both cost the layout's forwards again: the planner takes the plan with
    the fewest passes x blocks that fits (here one pass in blocks rather than four passes)."""
    from lossaudit.audit.harness import prepare

    loaded = load_model("llama", seed=0, config_overrides=WIDE)
    config = CheckConfig(model="llama", paths=("reduction", "model"), microbatches=(1, 4), paddings=("right",),
                         groupings=("contiguous",), batch_size=8, max_length=16)
    ctx = prepare(config, loaded)
    paths = [reduction(name) for name in ("mean_of_means", "num_items", "sequence_mean", "sum")] + [ModelPath()]
    monkeypatch.setattr(Footprint, "of", fake_budget(2.0))
    runs, blocks = passes.plan_for(ctx, paths)
    f = Footprint.of(ctx)
    assert all(f.pass_bytes(ctx, r, blocks) <= f.budget for r in runs)
    assert len(runs) * blocks < len(plan(paths, 1))  # fewer runs than one sum a pass
    for per_pass in range(1, 5):  # no plan that fits has fewer runs
        n = blocks_for(ctx, plan(paths, per_pass))
        assert n is None or len(plan(paths, per_pass)) * n >= len(runs) * blocks
