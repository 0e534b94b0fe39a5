"""Data parallelism: layouts over ranks, the spawned-rank runner, and the accelerate path on
2 gloo ranks with planted per-rank bugs."""

import pytest
import torch

import lossaudit
from lossaudit.core.batch import BatchSpec, make_batch
from lossaudit.audit.config import CheckConfig
from lossaudit.audit.distributed import run_ranks
from lossaudit.core.errors import RankFailure, UsageError
from lossaudit.core.layouts import plan_layouts
from lossaudit.paths.accelerate import RECIPES, AcceleratePath, Recipe

import planted
import ranks
from judged import judged
from toy import toy_batch, toy_context

psutil = pytest.importorskip("psutil")


def no_children_left():
    """Rank processes still running or unreaped (Python's own resource tracker, which lives
    as long as the test process, does not count)."""
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "spawn_main" in " ".join(child.cmdline()):
                left.append(child)
        except psutil.NoSuchProcess:
            pass
    return left


# ---- layouts over ranks -------------------------------------------------------------------

def test_world_size_layouts_give_each_rank_its_k_microbatches():
    batch = make_batch(BatchSpec(), vocab_size=100, pad_id=0)
    for layout in plan_layouts(batch, (1, 2, 4), world_size=2):
        assert len(layout.groups) == 2 * layout.microbatches and layout.world_size == 2
        ranks_ = [layout.rank_groups(r) for r in range(2)]
        assert all(len(g) == layout.microbatches for g in ranks_)
        assert sorted(i for rank in ranks_ for g in rank for i in g) == list(range(len(batch)))


def test_default_layouts_give_ranks_uneven_token_counts():
    batch = make_batch(BatchSpec(), vocab_size=100, pad_id=0)  # the default batch of `check`
    for world_size in (2, 4):
        for layout in plan_layouts(batch, CheckConfig(model="x", world_size=world_size).ks, world_size=world_size):
            totals = [sum(batch.targets[i] for g in layout.rank_groups(r) for i in g) for r in range(world_size)]
            assert len(set(totals)) > 1, (layout.name, totals)


def test_world_size_caps_microbatches():
    assert CheckConfig(model="x", world_size=2).ks == (1, 2, 4)
    with pytest.raises(UsageError, match="batch size over --world-size"):
        CheckConfig(model="x", world_size=4, microbatches=(4,))


# ---- the runner ---------------------------------------------------------------------------

def test_a_rank_that_raises_is_one_line_and_the_others_are_ended():
    with pytest.raises(RankFailure) as info:
        run_ranks(ranks.rank_1_raises, None, 2, timeout_s=120)
    assert str(info.value) == "rank 1: ValueError: planted failure on rank 1"
    assert no_children_left() == []


def test_a_hanging_rank_times_out_and_is_reaped():
    with pytest.raises(RankFailure, match="did not finish within 8s"):
        run_ranks(ranks.rank_1_hangs, None, 2, timeout_s=8)
    assert no_children_left() == []


# ---- the accelerate path on 2 gloo ranks ----------------------------------------------------

PER_RANK = Recipe("planted_per_rank", planted.per_rank_mean, "manual")
SUM = Recipe("planted_sum", planted.unnormalised_sum, "accumulate")


@pytest.fixture(scope="module")
def two_ranks():
    """One spawn of 2 ranks: every recipe on every k, right padding. Uneven ranks: the
    imbalanced grouping hands rank 0 the sequences with the fewest targets."""
    batch = toy_batch([9, 3, 7, 2, 5, 6, 4, 8], [1, 1, 4, 1, 2, 1, 3, 1])
    ctx = toy_context(batch)
    recipes = [RECIPES.get(n) for n in ("naive", "token_count", "token_count_accumulate")] + [PER_RANK, SUM]
    layouts = plan_layouts(batch, (1, 2), paddings=("right",), groupings=("contiguous", "imbalanced"), world_size=2)
    cases = judged(ctx, layouts, [AcceleratePath(r, timeout_s=300) for r in recipes])
    assert no_children_left() == []
    return {(m.label.reduction, m.layout.microbatches, m.layout.grouping): (m, verdict, detail)
            for m, verdict, detail in cases}


def cases(two_ranks, recipe):
    return [v for (name, _, _), v in two_ranks.items() if name == recipe]


@pytest.mark.parametrize("recipe", ["token_count", "token_count_accumulate"])
def test_documented_recipe_matches_on_two_ranks(two_ranks, recipe):
    for m, verdict, detail in cases(two_ranks, recipe):
        assert verdict == "match", (m.layout.name, detail)
        assert m.grads.rel_err < 1e-12 and m.layout.world_size == 2
        assert len(set(m.extra["rank_tokens"])) == 2  # the ranks really were uneven


def test_per_rank_normalisation_is_found_and_named(two_ranks):
    for m, verdict, detail in cases(two_ranks, "planted_per_rank"):
        assert not m.label.expected and verdict == "diverge" and m.grads.rel_err > 1e-2, m.layout.name
        if m.layout.microbatches > 1:  # at k=1 it coincides with the mean of microbatch means
            assert "per-rank normalisation" in detail


def test_unnormalised_sum_is_found_on_two_ranks(two_ranks):
    for m, verdict, _ in cases(two_ranks, "planted_sum"):
        assert verdict == "diverge" and not m.label.expected
        # sum / k per rank, averaged over 2 ranks: total / (2k) times the token mean's gradient
        assert m.grads.scale == pytest.approx(sum(m.counts) / (2 * m.layout.microbatches), rel=1e-9)


def test_naive_loop_is_expected_to_differ_on_two_ranks(two_ranks):
    for m, verdict, _ in cases(two_ranks, "naive"):
        assert m.label.expected and verdict == "diverge"


@pytest.mark.heavy  # spawned ranks for every layout; the recipes on two ranks run in the default tier
def test_llama_on_two_ranks_through_the_api():
    report = lossaudit.check("llama", path=["accelerate", "reduction"], reductions=["num_items"], world_size=2,
                             microbatches=[2], groupings=["imbalanced"], paddings=["left"])
    assert report.exit_status == 0, report.cases[["path", "reduction", "verdict", "detail"]]
    acc = report.cases[report.cases["path"] == "accelerate"].set_index("reduction")
    assert (report.cases["world_size"] == 2).all()
    assert acc.loc["token_count", "verdict"] == "match"
    rank_tokens = acc.loc["token_count", "rank_tokens"]
    assert len(rank_tokens) == 2 and rank_tokens[0] != rank_tokens[1]
    assert no_children_left() == []


def test_cli_rejects_more_microbatches_than_ranks_can_share():
    from test_cli import assert_usage_error, run

    assert_usage_error(run("check", "llama", "--world-size", "3", "--microbatches", "4"),
                       "--microbatches 4: must be between 1 and the batch size over --world-size (2)")


def test_a_transformers_model_travels_as_class_config_and_weights():
    from lossaudit.audit.distributed import PortableModel
    from lossaudit.models.loading import load_model

    model = load_model("llama", seed=0).model.to(torch.float64)
    portable = PortableModel.of(model)
    assert portable.module is None and portable.cls is type(model)
    rebuilt = portable.build(torch.device("cpu"))
    assert rebuilt is not model
    for (name, p), (_, q) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert q.dtype == torch.float64 and torch.equal(p, q), name
    toy = toy_context(toy_batch([3, 4], [1, 1])).model
    assert PortableModel.of(toy).module is toy  # any other module travels pickled
