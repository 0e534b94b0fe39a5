"""Without --max-memory the audit plans its logit paths within DEFAULT_HEADROOM (1.4) times the
reference's measured peak (at least DEFAULT_SLACK above it), never below what a step path
needs, within the device's share on CUDA; where no plan meets that target on the CPU it runs
the fastest and never refuses. --max-memory keeps its exact meaning."""

import dataclasses
import math

import pytest
import torch

from lossaudit.audit import harness, passes
from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import audit, calibration, prepare, selected_paths
from lossaudit.audit.memory import GIB
from lossaudit.audit.passes import DEFAULT_HEADROOM, DEFAULT_SLACK, Footprint, plan_for, unheld
from lossaudit.core.reductions import REDUCTIONS
from lossaudit.models.loading import load_model
from lossaudit.paths import PATHS, LogitPath, StepPath
from lossaudit.paths.reduction import ReductionPath

# parameters (1.4 M, 5.6 MB in float32) outweigh the activations of 8 x 16 tokens
WIDE = dict(hidden_size=256, intermediate_size=512, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2)


class Peak:
    """A ResidentMeter that measured ``bytes`` at the reference's peak."""

    def __init__(self, bytes_):
        self.bytes = bytes_

    def peak(self):
        return self.bytes


def config(**kw):
    return CheckConfig(model="llama", paths=("reduction",), reductions=("num_items",), microbatches=(1, 4),
                       paddings=("right",), groupings=("contiguous",), batch_size=8, max_length=16, **kw)


@pytest.fixture(scope="module")
def wide():
    ctx = prepare(config(), load_model("llama", seed=0, config_overrides=WIDE))
    pb = sum(p.numel() * p.element_size() for _, p in ctx.params)
    weights = sum(p.numel() * p.element_size() for p in ctx.model.parameters())
    # a training step's peak: W, its gradient, activations of two more (the arriving gradient,
    # comparison pieces and float64 losses, 5 MB, are large beside a model this small)
    return ctx, pb, weights + 3 * pb


NUM_ITEMS = [ReductionPath.of(REDUCTIONS.get("num_items"))]


def paths():
    return NUM_ITEMS


def test_the_default_target_plans_blocks_within_1_4x_the_reference(wide, monkeypatch):
    ctx, pb, base = wide
    monkeypatch.setattr(passes, "DEFAULT_SLACK", 0)
    ctx = dataclasses.replace(ctx, memory=Peak(base))
    f = Footprint.of(ctx)
    assert f.default and f.limit is None and f.budget == int(DEFAULT_HEADROOM * base)
    runs, blocks = plan_for(ctx, paths())
    assert runs == [paths()] and blocks > 1  # one block: W + the reference + a sum is 1.5x here
    assert f.pass_bytes(ctx, paths(), blocks) <= f.budget < f.pass_bytes(ctx, paths(), blocks - 1)  # the fewest
    assert unheld(ctx, runs, False, blocks) is None
    assert "default memory target" in f.describe() and "--max-memory" in f.describe()


def test_a_step_path_raises_the_default_target_to_what_it_needs(wide, monkeypatch):
    """A step path cannot be split: it holds the reference beside the step's own peak (the update
    is the step's gradient). A default check never refuses for a budget the user did not set."""
    ctx, pb, base = wide
    monkeypatch.setattr(passes, "DEFAULT_SLACK", 0)
    ctx = dataclasses.replace(ctx, memory=Peak(base))
    f = Footprint.of(ctx, step_paths=True)
    assert f.step_bytes() == base + pb + f.transient > DEFAULT_HEADROOM * base
    # and should it miss its target, another objective's reference in the blocks that hold least
    least = min(f.other_bytes(ctx, n) for n in range(1, len(ctx.params) + 1))
    assert f.step_need(ctx) == max(f.step_bytes(), least) >= f.step_bytes()
    assert f.other_bytes(ctx, f.other_blocks(ctx)) == least  # nothing fits beyond it: the least there is
    assert f.budget == f.step_need(ctx) and f.limit is None
    runs, blocks = plan_for(ctx, paths(), step_paths=True)
    assert f.pass_bytes(ctx, paths(), blocks) <= f.budget and unheld(ctx, runs, True, blocks) is None


def test_an_unmeetable_default_target_runs_the_fastest_plan_and_never_refuses(wide, monkeypatch):
    ctx, pb, base = wide
    monkeypatch.setattr(passes, "DEFAULT_SLACK", 0)
    monkeypatch.setattr(passes, "DEFAULT_HEADROOM", 1.0)  # nothing holds less than the reference's peak
    ctx = dataclasses.replace(ctx, memory=Peak(base))
    runs, blocks = plan_for(ctx, paths())
    assert (runs, blocks) == ([paths()], 1) and unheld(ctx, runs, True, blocks) is None


def test_the_slack_keeps_a_small_model_in_one_block(wide):
    ctx, pb, base = wide
    ctx = dataclasses.replace(ctx, memory=Peak(base))
    f = Footprint.of(ctx)
    assert f.budget == base + DEFAULT_SLACK and plan_for(ctx, paths()) == ([paths()], 1)


def test_max_memory_keeps_its_exact_meaning(wide):
    ctx, pb, base = wide
    ctx = dataclasses.replace(ctx, memory=Peak(base), config=dataclasses.replace(ctx.config, max_memory=0.5))
    f = Footprint.of(ctx, step_paths=True)
    assert not f.default and f.budget == f.limit == int(0.5 * GIB)


def test_nothing_measured_nothing_planned_on_the_cpu(wide):
    ctx, _, _ = wide
    assert Footprint.of(dataclasses.replace(ctx, memory=None)) is None
    assert plan_for(dataclasses.replace(ctx, memory=None), paths()) == ([paths()], 1)


def test_on_cuda_the_default_target_is_within_the_devices_share(wide, monkeypatch):
    """Where the target cannot be met the plan fits the device's share; where that cannot hold a
    step path the run refuses, naming the device's share (no GPU needed: the device's numbers
    are given)."""
    ctx, pb, base = wide
    monkeypatch.setattr(passes, "DEFAULT_SLACK", 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: base)
    share = {"bytes": 10 * GIB}
    real = passes.budget_bytes
    monkeypatch.setattr(passes, "budget_bytes", lambda gib, device: share["bytes"] if gib is None else real(gib, device))
    ctx = dataclasses.replace(ctx, device=torch.device("cuda"))
    f = Footprint.of(ctx)
    assert f.default and f.limit == 10 * GIB and f.budget == int(DEFAULT_HEADROOM * base)
    share["bytes"] = base + pb // 2  # below the target: the target is the device's share
    f = Footprint.of(ctx, step_paths=True)
    assert f.budget == f.limit == base + pb // 2
    said = unheld(ctx, [paths()], True, 1)
    assert said is not None and "of the device's memory" in said and "a step path holds one" in said
    monkeypatch.setattr(passes, "DEFAULT_HEADROOM", 1.0)  # the target unmeetable: the plan that fits the share
    share["bytes"] = base + int(1.45 * pb)
    runs, blocks = plan_for(ctx, paths())
    f = Footprint.of(ctx)
    assert blocks > 1 and f.pass_bytes(ctx, paths(), blocks) <= f.limit


def test_a_default_audit_in_blocks_says_so_and_finds_what_one_block_finds(monkeypatch):
    """End to end: the default target (the reference's peak as a parameter-dominated model's)
    runs the parameters in blocks, says so on stderr, and every case's numbers are one block's
    to float64 rounding."""
    one = audit(config(), loaded=load_model("llama", seed=0, config_overrides=WIDE))
    monkeypatch.setattr(passes, "DEFAULT_SLACK", 0)
    monkeypatch.setattr(harness, "cpu_meter", lambda model: Peak(
        4 * sum(p.numel() * p.element_size() for p in model.parameters())))
    said = []
    blocked = audit(config(), said.append, loaded=load_model("llama", seed=0, config_overrides=WIDE))
    assert any("blocks to fit the default memory target" in line for line in said), said
    a, b = one.cases.drop(columns=["detail"]), blocked.cases.drop(columns=["detail"])
    assert len(a) == len(b) == 2
    for column in a.columns:
        for x, y in zip(a[column], b[column]):
            assert x == y or (isinstance(x, float) and (math.isnan(x) and math.isnan(y) or
                                                        abs(x - y) <= 1e-9 * max(abs(x), abs(y)))), (column, x, y)


def test_the_tiny_default_check_runs_in_one_pass_and_one_block():
    """`check llama` with its default paths: activations dominate, the target holds one pass."""
    c = CheckConfig(model="llama")
    ctx = prepare(c)
    built = [p for name in selected_paths(c, ctx.batch.task, ctx.objective) for p in PATHS.get(name).build(c)]
    logit = [p for p in built if isinstance(p, LogitPath)] + [calibration(ctx.objective)]
    steps = any(isinstance(p, StepPath) for p in built)
    assert steps and len(logit) > 2
    f = Footprint.of(ctx, steps)
    assert f.default and f.pass_bytes(ctx, logit) <= f.budget
    assert plan_for(ctx, logit, steps) == ([logit], 1)


def test_the_help_names_the_constants_the_planner_uses():
    from lossaudit.audit.options import OPTIONS
    from lossaudit.audit.passes import DEVICE_SHARE

    (option,) = [o for o in OPTIONS if o.name == "max_memory"]
    text = option.help % ()  # argparse's %% escapes
    assert f"{DEFAULT_HEADROOM}x" in text and f"{DEVICE_SHARE:.0%}".replace("%", " %") in text
