"""The Trainer's own FSDP2 (``--path trainer --data-parallel fsdp2 --world-size N``).

The Trainer is given ``fsdp=True, fsdp_config={"version": 2}`` (accelerate's
``FullyShardedDataParallelPlugin(fsdp_version=2)``): accelerate's ``fsdp2_prepare_model``
calls ``fully_shard`` on every block the model names in ``_no_split_modules`` and on the
whole model; the gradients are reduce-scattered and averaged over the ranks.

On the CPU the Trainer does not shard by itself (accelerate 1.16.0,
``AcceleratorState.__init__``): a ``use_cpu`` run on several ranks is ``MULTI_CPU`` and only
the accelerator device types (``MULTI_GPU``, ``MULTI_XPU``, ...) are turned into ``FSDP``, so
the FSDP plugin is dropped, ``Trainer.is_fsdp_enabled`` is False and the model is wrapped in
DDP without a word; with ``use_cpu=False`` on a machine without an accelerator the Trainer
refuses ("Using fsdp only works in distributed training"). ``shard_on_cpu`` does the one thing
accelerate leaves out: it sets the state's distributed type to ``FSDP`` with the Trainer's own
plugin, right after the Trainer built its Accelerator; from there the Trainer's and
accelerate's own FSDP2 code runs (``fully_shard`` over gloo works on the CPU).

The Trainer refuses an optimizer passed in under FSDP, so it builds its own: ``optim="sgd"``
(no momentum), learning rate 1, no decay, no clipping. The step's full gradient is read just
before that optimizer steps (the Trainer's ``on_pre_optimizer_step``), each sharded gradient
(a DTensor) gathered with ``full_tensor()`` on every rank; that is the update SGD(lr=1) applies.
"""

from __future__ import annotations

import torch

from ..core.grads import trainable

SETTINGS = {"fsdp": True, "fsdp_config": {"version": 2}, "optim": "sgd"}

CPU_NOTE = ("the Trainer's FSDP2 on the CPU: accelerate keeps a CPU run's distributed type MULTI_CPU and drops "
            "the FSDP plugin (the Trainer would wrap the model in DDP); the audit set it to FSDP, so the "
            "Trainer's and accelerate's own FSDP2 code sharded the model")


def shard_on_cpu(trainer) -> bool:
    """Turn a CPU run's dropped FSDP plugin back on (see the module's text); True if it had to."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if (not trainer.args.fsdp or getattr(state, "fsdp_plugin", None) is not None
            or state.distributed_type != DistributedType.MULTI_CPU):
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


def sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


class FullGradient:
    """A Trainer callback: the step's full gradient, read before the optimizer steps (a
    collective: every rank gathers; ``keep`` says whether this rank keeps it)."""

    def __init__(self, keep: bool):
        from transformers import TrainerCallback

        self.keep, self.steps = keep, 0
        self.gradient: dict[str, torch.Tensor | None] = {}
        self.callback = type("FullGradientCallback", (TrainerCallback,), {"on_pre_optimizer_step": self._read})()

    def _read(self, args, state, control, model=None, **kwargs):
        self.steps += 1
        gradient = {}
        for name, p in trainable(model):
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):
                g = g.full_tensor()
            gradient[name] = None if g is None else g.detach().cpu().clone()
        if self.keep:
            self.gradient = gradient  # a second step (a loop that steps too often): the last one
