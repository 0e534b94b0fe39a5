"""The accelerate path: accelerate's documented loops, audited against the float64 reference."""

import math

import pytest
import torch

import lossaudit
from lossaudit.core.layouts import plan_layouts
from lossaudit.paths.accelerate import RECIPES, AcceleratePath, Recipe

import planted
from judged import judged
from toy import toy_batch, toy_context

pytest.importorskip("accelerate")

UNEVEN = dict(lengths=[9, 3, 7, 2, 5, 6], prompts=[1, 1, 4, 1, 2, 1])  # 22 targets, uneven per microbatch


def audit_toy(recipes, ks=(2, 3)):
    batch = toy_batch(UNEVEN["lengths"], UNEVEN["prompts"])
    ctx = toy_context(batch)
    before = [p.detach().clone() for _, p in ctx.params]
    cases = judged(ctx, plan_layouts(batch, ks, paddings=("right",)), [AcceleratePath(r) for r in recipes])
    assert all(torch.equal(w, p) for w, (_, p) in zip(before, ctx.params)), "weights not restored"
    return cases


def test_documented_token_count_recipes_match_exactly():
    cases = audit_toy([RECIPES.get("token_count"), RECIPES.get("token_count_accumulate")])
    assert len({tuple(m.counts) for m, _, _ in cases}) > 1  # uneven counts, several layouts
    for m, verdict, detail in cases:
        assert verdict == "match", (m.layout.name, m.label.reduction, detail)
        assert m.grads.rel_err < 1e-12 and m.extra["optimizer_steps"] == 1


def test_naive_accumulate_loop_diverges_and_is_expected():
    cases = audit_toy([RECIPES.get("naive")])
    for m, verdict, detail in cases:
        assert m.label.expected and verdict == "diverge" and m.grads.rel_err > 1e-2
        assert "accelerator.backward divides it by k" in detail
        assert "each microbatch's token mean divided by k" in detail  # the likely cause, measured


def test_planted_unnormalised_sum_is_found():
    recipe = Recipe("planted_sum", planted.unnormalised_sum, "accumulate")
    for m, verdict, detail in audit_toy([recipe]):
        assert not m.label.expected and verdict == "diverge"
        # the token sum / k weighs tokens like the mean: same direction, total/k times too long
        assert m.grads.scale == pytest.approx(sum(m.counts) / m.layout.microbatches, rel=1e-9)
        assert "in the same direction" in detail


def test_a_failing_recipe_is_an_error_case_not_a_crash():
    def broken(model, inputs, labels, task, counts):
        raise RuntimeError("no such argument\nsecond line")

    (m, verdict, detail), *_ = audit_toy([Recipe("broken", broken, "manual")])
    assert verdict == "error" and "raised RuntimeError: no such argument second line" in detail
    assert detail.startswith("the accelerate path on k=2") and "\n" not in detail


def test_llama_accelerate_path_through_the_api():
    report = lossaudit.check("llama", path=["accelerate"], microbatches=[4], groupings=["imbalanced"], paddings=["left"])
    cases = report.cases.set_index("reduction")
    assert report.exit_status == 0, report.cases[["reduction", "detail"]]
    assert cases.loc["token_count", "grad_rel_err"] < report.tolerance["rtol"]
    assert cases.loc["naive", "verdict"] == "diverge" and cases.loc["naive", "expected"]
    assert cases.loc["naive", "world_size"] == 1 and cases.loc["naive", "optimizer_steps"] == 1
    assert math.isclose(cases.loc["naive", "grad_rel_err"],
                        float(lossaudit.check("llama", path=["reduction"], reductions=["mean_of_means"],
                                              microbatches=[4], groupings=["imbalanced"], paddings=["left"])
                              .cases["grad_rel_err"].iloc[0]), rel_tol=1e-3)
