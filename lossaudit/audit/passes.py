"""Passes over a layout: when the logit paths' gradient sums would not fit the device's memory
together, they run in several passes, each running the layout's forwards and backwards again
for some of them. The first pass holds the correct reduction (it measures what the judge
learns about the layout); the others are planned in path order.

A pass's peak is estimated from the reference's own (a full-batch forward and backward: a
training step's activations and gradient, measured on CUDA) plus a parameter-sized tensor per
sum beyond the first, the kept correct gradient where a path has a loss of its own, and the
model path's float32 logits (memory.py).
"""

from __future__ import annotations

import math

import torch

from .memory import GIB, comparison_bytes, model_loss_bytes, shape_of
from ..paths.base import LogitPath

DEVICE_SHARE = 0.94  # of a CUDA device's memory, by default: an 80 GB card's 79.2 GiB gives 74.5 GiB
# without --max-memory the logit paths are planned within this times the reference's measured
# peak (its full-batch forward and backward: about a training step's), or within what the step
# paths, which cannot be split, need where that is more; on CUDA within DEVICE_SHARE too
DEFAULT_HEADROOM = 1.4
# ... but never planned tighter than this beyond it: below, the memory is not worth a layout's
# passes again, and on the CPU a small model's resident peak is the allocator's noise (the tiny
# llama's reference measured 20 MiB in a fresh process, 6 MiB in a warm one)
DEFAULT_SLACK = 256 * 2 ** 20
# the float64 reference's loss, at the start of its backward: its float64 logits, log-softmax
# and their gradients, about this many tensors of the token losses' size (B x T x V x 8 bytes):
# measured at issue 28's CPU shape, another objective's reference in blocks took 296 MiB above
# the declared reference and a step's gradient, 4.7 of them (62.5 MiB each)
REFERENCE_LOSS_TENSORS = 5


def sum_groups(paths: list[LogitPath]) -> list[list[LogitPath]]:
    """The paths grouped by the gradient sum they fill: those with the same weight on every
    microbatch (num_items, the correct reduction, and sum) share one; any other has its own.
    The correct reduction's group comes first."""
    constant = [p for p in paths if p.constant_weights]
    groups = [[p] for p in paths if not p.constant_weights]
    return [constant] + groups if constant else groups


def plan(paths: list[LogitPath], per_pass: int | None) -> list[list[LogitPath]]:
    """``paths`` split into passes of at most ``per_pass`` sums each (None: one pass)."""
    groups = sum_groups(paths)
    if per_pass is None or len(groups) <= per_pass:
        return [paths]
    per_pass = max(per_pass, 1)
    passes = [[p for g in groups[i:i + per_pass] for p in g] for i in range(0, len(groups), per_pass)]
    order = {id(p): i for i, p in enumerate(paths)}
    return [sorted(ps, key=lambda p: order[id(p)]) for ps in passes]


def budget_bytes(max_memory_gib: float | None, device: torch.device) -> int | None:
    """What the audit may not exceed on ``device``: ``--max-memory``, else on CUDA a share of
    the device's memory, else no limit (the default plan's target is ``Footprint.of``'s)."""
    if max_memory_gib is not None:
        return int(max_memory_gib * GIB)
    if device.type == "cuda":
        return int(DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return None


def sums_per_pass(budget: int | None, base: int, param_bytes: int, extra: int) -> int | None:
    """How many sums one pass may hold: what the budget leaves above ``base`` (the reference's
    peak) and ``extra`` (the kept correct gradient, the model path's logits), one
    parameter-sized tensor each; at least one. None: no limit."""
    if budget is None or not param_bytes:
        return None
    return max(1, math.floor((budget - base - extra) / param_bytes))


def param_blocks(params, n: int) -> list[list[int]]:
    """The indices of ``params`` in at most ``n`` contiguous blocks of about equal bytes (a
    tensor larger than a block's share is a block of its own); one block: all of them."""
    sizes = [p.numel() * p.element_size() for _, p in params]
    if n <= 1 or len(sizes) <= 1:
        return [list(range(len(sizes)))]
    share = sum(sizes) / n
    blocks, current, held = [], [], 0
    for i, size in enumerate(sizes):
        if current and held + size > share:
            blocks.append(current)
            current, held = [], 0
        current.append(i)
        held += size
    return blocks + [current]


def block_bytes(params, n: int) -> int:
    """The largest block's bytes when ``params`` run in ``n`` blocks."""
    return max(sum(params[i][1].numel() * params[i][1].element_size() for i in block) for block in param_blocks(params, n))


def blocks_for(ctx, runs: list[list[LogitPath]], budget: int | None = None, f: "Footprint | None" = None) -> int | None:
    """Blocks of parameters each layout's passes run in (harness.run_layout): 1, unless the
    largest pass would not fit ``budget`` (by default the Footprint's: ``--max-memory``, or
    without it DEFAULT_HEADROOM x the reference's peak); then the fewest that fit, each costing
    the layout's forwards and backwards once more. None: no number of blocks fits. An MoE aux
    target runs in one block."""
    f = f or Footprint.of(ctx)
    runs = [paths for paths in runs if paths]
    if f is None or not runs:
        return 1
    budget = f.budget if budget is None else budget
    most = 1 if ctx.reference.aux else len(ctx.params)
    smallest = block_bytes(ctx.params, most)
    for n in range(1, most + 1):
        if all(f.pass_bytes(ctx, paths, n) <= budget for paths in runs):
            return n
        if block_bytes(ctx.params, n) <= smallest:  # no smaller block to be had
            break
    return None


def plan_for(ctx, paths: list[LogitPath], step_paths: bool = False,
             f: "Footprint | None | bool" = False) -> tuple[list[list[LogitPath]], int | None]:
    """The run's passes and blocks of parameters: the plan that fits the budget with the fewest
    runs over each layout (passes x blocks; fewer passes first where two tie). Blocks None:
    nothing fits (the smallest pass in the smallest blocks is then what ``unheld`` says).

    Without --max-memory the budget is a target (``Footprint.of``): where no plan meets it, the
    plan that fits the device's share on CUDA, and on the CPU, where nothing else bounds it, the
    fastest (one pass, one block). ``f``: the run's Footprint where the caller measured it (False:
    measure it here)."""
    f = Footprint.of(ctx, step_paths) if f is False else f
    if f is None or not paths:
        return [paths], 1
    best = _fewest_runs(ctx, paths, f, f.budget)
    if best is None and f.default:
        if f.limit is None:
            return [paths], 1
        best = _fewest_runs(ctx, paths, f, f.limit)
    return best if best is not None else (plan(paths, 1), None)


def _fewest_runs(ctx, paths, f: "Footprint", budget: int):
    best = None
    for per_pass in range(len(sum_groups(paths)), 0, -1):
        runs = plan(paths, per_pass)
        blocks = blocks_for(ctx, runs, budget, f)
        if blocks is not None and (best is None or len(runs) * blocks < len(best[0]) * best[1]):
            best = (runs, blocks)
    return best


def passes_for(ctx, paths: list[LogitPath]) -> list[list[LogitPath]]:
    """The run's passes: one, unless the sums would not fit ``--max-memory`` (on CUDA, by
    default, the device's memory)."""
    f = Footprint.of(ctx)
    if f is None or not paths:
        return [paths]
    own = any(p.own_backward for p in paths)
    return plan(paths, sums_per_pass(f.budget, f.base, f.pb,
                                     (f.pb if own else 0) + f.logits(ctx, paths) + f.transient + f.losses))


class Footprint:
    """What a pass holds, estimated from the reference's measured peak (``base``: weights, the
    gradient it built and the full batch's activations; on CUDA max_memory_allocated, on the
    CPU what the process held, audit.memory.ResidentMeter), against ``budget``: what the plan
    aims at. ``limit``: what the run may not exceed (refused before any layout runs where it
    cannot fit): --max-memory, which is then the budget too; without it (``default``) the
    device's share on CUDA, and nothing on the CPU."""

    def __init__(self, budget: int, base: int, pb: int, transient: int, losses: int = 0, *, default: bool = False,
                 limit: int | None = None):
        self.budget, self.base, self.pb, self.transient, self.losses = budget, base, pb, transient, losses
        self.default = default
        self.limit = limit if default else budget

    @classmethod
    def of(cls, ctx, step_paths: bool = False) -> "Footprint | None":
        """The run's footprint; ``step_paths``: a step path runs (the default budget holds it).
        None: no budget, nor a measured reference peak to plan a default one from."""
        given = getattr(ctx.config, "max_memory", None)
        limit = budget_bytes(given, ctx.device)
        pb = sum(p.numel() * p.element_size() for _, p in ctx.params)
        if ctx.device.type == "cuda":
            base = torch.cuda.max_memory_allocated(ctx.device)  # the reference's full-batch step, or more
        elif getattr(ctx, "memory", None) is not None:  # what the process held at the reference's peak
            base = ctx.memory.peak()
        elif given is None:  # nothing measured to plan a default from
            return None
        else:  # activations are not counted: the weights and the reference gradient only
            base = sum(p.numel() * p.element_size() for p in ctx.model.parameters()) + pb
        # a microbatch's gradient of the largest tensor arrives while its sum holds one already,
        # and the comparison's widened pieces
        if not ctx.params:
            return None
        transient = max(p.numel() * p.element_size() for _, p in ctx.params) + \
            comparison_bytes(shape_of(ctx.model, sums=1))
        # the float64 token losses of a full-batch microbatch (k=1), saved for its backward: the
        # reference's peak comes at the end of its backward, when its own are freed, but a pass
        # holds them beside the reference it keeps (measured at issue 28's CPU shape: without
        # them a pass came 25 MiB above its estimate)
        batch = ctx.batch
        losses = 8 * len(batch) * max(batch.lengths, default=0) * (getattr(ctx.loaded, "vocab_size", 0) or 0)
        f = cls(limit or 0, base, pb, transient, losses)
        if given is not None:
            return f
        # no --max-memory: DEFAULT_HEADROOM x the reference's peak (at least DEFAULT_SLACK above
        # it), never below what a step path (which cannot be split) needs, within the device's
        # share on CUDA
        target = max(int(DEFAULT_HEADROOM * base), base + DEFAULT_SLACK, f.step_need(ctx) if step_paths else 0)
        return cls(target if limit is None else min(target, limit), base, pb, transient, losses, default=True,
                   limit=limit)

    @staticmethod
    def logits(ctx, paths) -> int:
        if not any(p.label.path == "model" for p in paths):
            return 0
        batch = ctx.batch
        return model_loss_bytes(len(batch), max(batch.lengths), getattr(ctx.loaded, "vocab_size", 0) or 0)

    def pass_bytes(self, ctx, paths, blocks: int = 1) -> int:
        """A pass's estimated peak: the reference's, one parameter-sized tensor per sum and the
        kept correct gradient where a path has a loss of its own (a block's, where the parameters
        run in ``blocks``), the model path's logits."""
        sums = len(sum_groups(paths))
        own = any(p.own_backward for p in paths)
        held = self.pb if blocks <= 1 else block_bytes(ctx.params, blocks)
        return self.base + (sums + own) * held + self.logits(ctx, paths) + self.transient + self.losses

    def step_bytes(self) -> int:
        """A step path's: the reference's peak (the step's own, about a training step's) and the
        reference kept beside it. The update the probe reads is the step's own gradient
        (paths/probe.py: lossaudit's step paths step plain SGD), no tensor beyond it."""
        return self.base + self.pb + self.transient

    def other_bytes(self, ctx, blocks: int = 1) -> int:
        """While another objective's reference is taken for a step that missed its target
        (Judge.other_objectives), beside the declared reference and the step's gradient: the
        reference's peak with a block's gradient instead of the whole, or, where that is more,
        its float64 loss's transients at the start of its backward (which the measured peak,
        taken at the end of a whole gradient's backward, does not show)."""
        held = self.pb if blocks <= 1 else block_bytes(ctx.params, blocks)
        return self.base + self.pb + max(held, int(REFERENCE_LOSS_TENSORS * self.losses)) + self.transient

    def other_blocks(self, ctx) -> int:
        """The fewest blocks of parameters another objective's reference fits the budget in;
        where none does, the fewest that hold the least."""
        counts = range(1, max(len(ctx.params), 1) + 1)
        fits = next((n for n in counts if self.other_bytes(ctx, n) <= self.budget), None)
        if fits is not None:
            return fits
        least = min(self.other_bytes(ctx, n) for n in counts)
        return next(n for n in counts if self.other_bytes(ctx, n) == least)

    def step_need(self, ctx) -> int:
        """What a step path cannot do without: its step beside the reference, and, should it
        miss its target, another objective's reference in the fewest blocks that hold the least."""
        return max(self.step_bytes(), min(self.other_bytes(ctx, n) for n in range(1, max(len(ctx.params), 1) + 1)))

    def describe(self) -> str:
        """What the budget is, for the run's stderr."""
        if not self.default:
            return f"--max-memory ({self.budget / GIB:.2f} GiB)"
        return (f"the default memory target of {self.budget / GIB:.2f} GiB ({DEFAULT_HEADROOM}x the reference's "
                f"measured peak of {self.base / GIB:.2f} GiB, or what a step path needs; --max-memory sets another)")


def unheld(ctx, runs: list[list[LogitPath]], step_paths: bool, blocks: int | None = 1,
           f: "Footprint | None | bool" = False) -> str | None:
    """A line saying that the memory the run may hold (--max-memory; without it on CUDA the
    device's share) cannot hold this audit and the least it needs (None where every pass fits,
    or nothing limits the run): the smallest pass is one sum (and a kept gradient) of the
    smallest block of parameters to be had (``blocks`` None: none fits), and a step path cannot
    be split. ``f`` as ``plan_for``'s."""
    f = Footprint.of(ctx, step_paths) if f is False else f
    if f is None or f.limit is None:
        return None
    fewest = len(ctx.params) if blocks is None else blocks
    least = [f.pass_bytes(ctx, paths, fewest) for paths in runs if paths] + ([f.step_need(ctx)] if step_paths else [])
    need = max(least, default=0)
    if need <= f.limit:
        return None
    what = "--max-memory" if not f.default else f"{DEVICE_SHARE:.0%} of the device's memory; --max-memory"
    steps = "; a step path holds one beside that peak, and where it misses another objective's reference" \
        if step_paths else ""
    return (f"the memory budget of {f.limit / GIB:.2f} GiB ({what}) cannot hold this audit: it needs at least "
            f"{need / GIB:.2f} GiB (the reference's peak {f.base / GIB:.2f} GiB and parameter-sized tensors of "
            f"{f.pb / GIB:.2f} GiB{steps}): raise --max-memory, or lower --batch-size or --num-layers")
