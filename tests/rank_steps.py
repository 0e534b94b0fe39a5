"""Users' steps on N data-parallel ranks, for tests/stacks/test_stacks_ranks.py (module level:
spawned ranks import them). ``model`` arrives wrapped (DDP or FSDP2); each rank gets its own k
microbatches. Each returns what this rank backwarded, summed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stack_modules import _targets, _token_sum


def _world() -> int:
    return dist.get_world_size()


def _gathered(microbatches) -> int:
    """The step's target count over every microbatch and rank (torchtitan's recipe)."""
    count = torch.tensor([sum(_targets(b) for b in microbatches)], dtype=torch.int64)
    dist.all_reduce(count)
    return int(count)


def _backward_all(model, microbatches, denominator: float, factor: float = 1.0) -> float:
    loss = 0.0
    for batch in microbatches:
        part = _token_sum(model, batch) * factor / denominator
        part.backward()
        loss += float(part.detach())
    return loss


def _sum_gradients(model) -> None:
    """FSDP2: sum the ranks' gradients rather than average them, on every sharded module."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)


def per_rank_count_step(model, microbatches):
    """Planted bug: each rank divides its token sum by its own target count (a naive loop)."""
    return _backward_all(model, microbatches, sum(_targets(b) for b in microbatches))


def gathered_count_step(model, microbatches):
    """Right under DDP (and FSDP2's default average): the gathered count, times the world size
    because the wrapper averages the ranks' gradients."""
    return _backward_all(model, microbatches, _gathered(microbatches), _world())


def gathered_count_twice_step(model, microbatches):
    """Planted bug: the gathered count, and the wrapper's average on top (1/world size)."""
    return _backward_all(model, microbatches, _gathered(microbatches))


def gathered_count_sum_step(model, microbatches):
    """Right under FSDP2 (torchtitan): the gathered count, divide factor 1 (gradients summed)."""
    _sum_gradients(model)
    return _backward_all(model, microbatches, _gathered(microbatches))


def gathered_count_sum_undone_step(model, microbatches):
    """Planted bug: divide factor 1 and still multiplied by the world size (world size x)."""
    _sum_gradients(model)
    return _backward_all(model, microbatches, _gathered(microbatches), _world())


def root_factor_only_step(model, microbatches):
    """Planted bug: set_gradient_divide_factor(1) on the root only; the blocks still average."""
    model.set_gradient_divide_factor(1.0)
    return _backward_all(model, microbatches, _gathered(microbatches))


def silent_gathered_count_step(model, microbatches):
    """Right under DDP, returns nothing: judged on its gradient alone."""
    gathered_count_step(model, microbatches)


def never_synced_step(model, microbatches):
    """Planted bug: no_sync on every microbatch, so DDP never all-reduces: each rank keeps its own."""
    with model.no_sync():
        return gathered_count_step(model, microbatches)


def reweighted_rank_step(model, microbatches):
    """Planted bug: the gathered count 1 % short on rank 0 and 1 % long on rank 1 (1 % of the
    weight moved between the ranks' microbatches, the step's total nearly kept)."""
    return _backward_all(model, microbatches, _gathered(microbatches) * (0.99 if dist.get_rank() == 0 else 1.01),
                         _world())
