"""A user's step (``--step``) on N data-parallel ranks (issue 24).

Every rank (spawned, or a launcher's: ``audit/distributed.py``) builds its own copy of the
model for each layout, wraps it as ``--data-parallel`` asks and calls ``FUNCTION(wrapped,
microbatches)`` on its own k microbatches (the layout's rank r holds groups[r*k:(r+1)*k]):

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; every backward all-reduces and
  averages the ranks' gradients, so each rank holds the same gradient, their sum / world size;
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each block the model names in
  ``_no_split_modules``, then on the whole model; the gradients are reduce-scattered (averaged
  unless the step calls ``set_gradient_divide_factor``) and each rank holds a shard, a DTensor:
  ``full_tensor()`` gathers it. On gloo, which has no PREMUL_SUM reduce op (what a divide
  factor other than the world size uses), every sharded module is set to
  ``set_force_sum_reduction_for_comms(True)``: a sum with the division applied before or after
  it, the same arithmetic.

The step's gradient is rank 0's full gradient; if ranks hold different gradients (a step that
never synchronised them) the note says by how much. The step's loss is what the ranks returned,
combined as the wrapper combined their gradients (summed, then divided by its divide factor:
the mean under DDP and FSDP2's default, the sum when the step sets FSDP2's factor to 1), so a
step whose gradient is right reports the right loss. A step returning no number on some rank
reports no loss (NaN): it is judged on its gradient alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..audit.distributed import PortableModel, fresh
from ..core.batch import Batch
from ..core.grads import trainable
from ..core.layouts import Layout, collate
from . import StackStep
from ..core.registry import load_callable
from .step import _as_loss as as_loss, batch_dicts

# spread between ranks' gradients that DDP's all-reduce could leave (gloo: none; another backend's
# reduction order may differ per rank) before it is called unsynchronised
SPREAD_TOLERANCE = 1e-6


@dataclass
class StepJob:
    """What every rank needs: the model, the batch, the layouts and the step to run."""

    model: PortableModel
    batch: Batch
    layouts: list[Layout]
    step: object  # "module:function", or a module-level function (pickled by reference)
    data_parallel: str = "ddp"


@dataclass
class RankStep:
    """One rank's step on one layout."""

    loss: float  # what this rank's step returned (NaN: no number)
    divide_factors: set[float]  # the wrapper's gradient is the ranks' sum divided by these (one each module)
    gradient: list[tuple[str, torch.Tensor | None]] | None = None  # full; rank 0 only
    spread: float = 0.0  # max |difference| between ranks' gradients / max |gradient|


def wrap(model: torch.nn.Module, data_parallel: str, device: torch.device) -> torch.nn.Module:
    """The model as a user's sharded or replicated loop holds it."""
    if data_parallel == "ddp":
        ids = None if device.type == "cpu" else [device]
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if data_parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or ())
        sharded = [fully_shard(m) for m in list(model.modules()) if m is not model and type(m).__name__ in blocks]
        sharded.append(fully_shard(model))
        if torch.distributed.get_backend() == "gloo":  # gloo has no PREMUL_SUM (a divide factor's reduce op)
            for module in sharded:
                module.set_force_sum_reduction_for_comms(True)
        return sharded[-1]
    raise ValueError(f"unknown data-parallel wrapper {data_parallel!r}")


def divide_factors(wrapped: torch.nn.Module, data_parallel: str, world_size: int) -> set[float]:
    """What the wrapper divided the ranks' summed gradient by: one factor for DDP; under FSDP2
    each sharded module's own (``set_gradient_divide_factor`` acts on the module it is called
    on, not on the blocks inside it; unset: the world size)."""
    if data_parallel != "fsdp2":
        return {float(world_size)}
    factors = set()
    for module in wrapped.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", None) or ():
            factor = group.gradient_divide_factor
            factors.add(float(world_size) if factor is None else float(factor))
    return factors or {float(world_size)}


def full_gradient(model: torch.nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """Every trainable parameter's whole gradient, on the CPU (a collective under FSDP2: every
    rank calls it)."""
    out = []
    for name, p in trainable(model):
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append((name, None if g is None else g.detach().cpu().clone()))
    return out


def spread(params: list[tuple[str, torch.nn.Parameter]]) -> float:
    """How far the ranks' gradients differ (0: all the same), relative to the largest entry. A
    parameter with no gradient counts as zeros: every rank must make the same collectives."""
    worst, largest = 0.0, 0.0
    for _, p in params:
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
        high, low = g.clone(), g.clone()
        torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
        if g.numel():
            worst = max(worst, float((high - low).abs().max()))
            largest = max(largest, float(g.abs().max()))
    return worst / largest if largest else worst


def rank_step(model: torch.nn.Module, microbatches, fn, data_parallel: str, rank: int, world_size: int,
              device: torch.device) -> RankStep:
    """One call of the user's step on this rank's microbatches, under the wrapper."""
    for p in model.parameters():
        p.grad = None
    dicts = batch_dicts(model, microbatches, device)  # inputs as the unwrapped model takes them
    wrapped = wrap(model, data_parallel, device)
    returned = fn(wrapped, dicts)
    factors = divide_factors(wrapped, data_parallel, world_size)
    # on the device the group reduces on (nccl takes no CPU tensors); FSDP2's full_tensor is one gather
    gap = spread(trainable(model)) if data_parallel == "ddp" else 0.0
    gradient = full_gradient(model)
    return RankStep(as_loss(returned), factors, gradient if rank == 0 else None, gap)


def run_rank(rank: int, world_size: int, job: StepJob, device: torch.device) -> list[RankStep]:
    """Body of one rank: the user's step on every layout, each on a fresh copy of the model."""
    fn = job.step if callable(job.step) else load_callable(job.step, "step function")
    steps = []
    for layout in job.layouts:
        model = fresh(job.model, device)
        model.train()
        mbs = [collate(job.batch, g, layout.padding) for g in layout.rank_groups(rank)]
        steps.append(rank_step(model, mbs, fn, job.data_parallel, rank, world_size, device))
        del model
    return steps


def combine(per_rank: list[RankStep], data_parallel: str) -> StackStep:
    """The step as lossaudit judges it, from every rank's RankStep on one layout."""
    first = per_rank[0]
    losses = [s.loss for s in per_rank]
    notes = []
    factors = sorted(first.divide_factors)
    factor = factors[0] if len(factors) == 1 else math.nan
    loss = math.nan if any(math.isnan(x) for x in losses) else sum(losses) / factor
    if len(factors) > 1:
        notes.append("FSDP2 divided the ranks' summed gradients by different factors in different modules ("
                     + ", ".join(f"{x:g}" for x in factors) + "): set_gradient_divide_factor reached some "
                     "sharded modules and not others; the loss is not compared")
    if first.spread > SPREAD_TOLERANCE:
        notes.append(f"ranks hold different gradients after the step (largest difference {first.spread:.3g} of the "
                     f"largest entry): the gradients were not all-reduced (no_sync on every microbatch?); rank 0's "
                     f"is judged")
    if not any(g is not None for _, g in first.gradient or []):
        notes.append("the step function left no gradient in .grad")
    extra = {"data_parallel": data_parallel, "rank_losses": losses, "divide_factor": factor}
    return StackStep(first.gradient or [], loss, notes, extra)
