"""--path accelerate --data-parallel fsdp2 on 2 spawned gloo ranks (issue 24): accelerate's recipes with
its FullyShardedDataParallelPlugin(fsdp_version=2), the full gradient gathered (DTensor.full_tensor)
before the optimizer steps. On the CPU accelerate 1.16.0 drops the plugin (MULTI_CPU keeps DDP); the
audit turns it on and says so (paths/fsdp2.py)."""

import pytest

from lossaudit.core.layouts import plan_layouts
from lossaudit.paths.accelerate import RECIPES, AcceleratePath, Recipe
from lossaudit.paths.fsdp2 import CPU_NOTE

import planted
from judged import judged
from test_distributed import no_children_left
from toy import ToyLM, ToyLMOutputs, toy_batch, toy_context

pytestmark = pytest.mark.heavy  # spawned ranks: about 65 s here in all

PER_RANK = Recipe("planted_per_rank", planted.per_rank_mean, "manual")
SUM = Recipe("planted_sum", planted.unnormalised_sum, "accumulate")


@pytest.fixture(scope="module")
def sharded():
    """One spawn of 2 ranks per recipe, k = 1, 2; the imbalanced grouping hands rank 0 the sequences
    with the fewest targets."""
    batch = toy_batch([9, 3, 7, 2, 5, 6, 4, 8], [1, 1, 4, 1, 2, 1, 3, 1])
    ctx = toy_context(batch, ToyLMOutputs())
    recipes = [RECIPES.get(n) for n in ("token_count", "token_count_accumulate")] + [PER_RANK, SUM]
    layouts = plan_layouts(batch, (1, 2), paddings=("right",), groupings=("imbalanced",), world_size=2)
    cases = judged(ctx, layouts, [AcceleratePath(r, timeout_s=300, data_parallel="fsdp2") for r in recipes])
    assert no_children_left() == []
    return {(m.label.reduction, m.layout.microbatches): (m, verdict, detail) for m, verdict, detail in cases}


def cases(sharded, recipe):
    return [v for (name, _), v in sharded.items() if name == recipe]


def test_every_step_was_sharded(sharded):
    for m, verdict, detail in sharded.values():
        assert verdict != "error", detail
        assert m.extra["data_parallel"] == "fsdp2" and CPU_NOTE in detail and m.extra["optimizer_steps"] == 1


@pytest.mark.parametrize("recipe", ["token_count", "token_count_accumulate"])
def test_the_documented_recipes_match_under_fsdp2(sharded, recipe):
    for m, verdict, detail in cases(sharded, recipe):
        assert verdict == "match", (m.layout.name, detail)
        assert m.grads.rel_err < 1e-12 and len(set(m.extra["rank_tokens"])) == 2


def test_per_rank_normalisation_is_found_under_fsdp2(sharded):
    for m, verdict, detail in cases(sharded, "planted_per_rank"):
        assert verdict == "diverge" and m.grads.rel_err > 1e-2, m.layout.name
        if m.layout.microbatches > 1:  # at k=1 it coincides with the mean of microbatch means
            assert "per-rank normalisation" in detail


def test_an_unnormalised_sum_is_found_with_its_scale_under_fsdp2(sharded):
    for m, verdict, _ in cases(sharded, "planted_sum"):
        # sum / k per rank, FSDP2 averages over 2 ranks: total / (2k) times the token mean's gradient
        assert verdict == "diverge" and m.grads.scale == pytest.approx(sum(m.counts) / (2 * m.layout.microbatches),
                                                                        rel=1e-9)


def test_gradients_fsdp2_never_reduced_are_found_and_said():
    """ToyLM's outputs (a SimpleNamespace) hide its backward from FSDP2: no reduce-scatter at all."""
    batch = toy_batch([9, 3, 7, 2], [1, 1, 4, 1])
    layouts = plan_layouts(batch, (1,), paddings=("right",), groupings=("imbalanced",), world_size=2)
    [(m, verdict, detail)] = judged(toy_context(batch, ToyLM()), layouts,
                                    [AcceleratePath(RECIPES.get("token_count"), timeout_s=300, data_parallel="fsdp2")])
    assert verdict == "diverge" and "FSDP2 never reduced the gradients of 2 sharded parameters (embed, head)" in detail
    assert no_children_left() == []
