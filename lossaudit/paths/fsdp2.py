"""FSDP2 as the Trainer and accelerate run it (``--data-parallel fsdp2 --world-size N`` on
``--path trainer`` and ``--path accelerate``).

The accelerate recipes build their ``Accelerator`` with
``FullyShardedDataParallelPlugin(fsdp_version=2)``; the Trainer is given ``fsdp=True,
fsdp_config={"version": 2}``, from which it builds that plugin. accelerate's ``fsdp2_prepare_model``
calls ``fully_shard`` on every block the model names in ``_no_split_modules`` and on the
whole model; the gradients are reduce-scattered and averaged over the ranks.

On the CPU neither shards by itself (accelerate 1.16.0, ``AcceleratorState.__init__``): a CPU
run on several ranks is ``MULTI_CPU`` and only the accelerator device types (``MULTI_GPU``,
``MULTI_XPU``, ...) are turned into ``FSDP``, so the FSDP plugin is dropped and the model is
wrapped in DDP without a word (``Trainer.is_fsdp_enabled`` is False); with ``use_cpu=False`` on
a machine without an accelerator the Trainer refuses ("Using fsdp only works in distributed
training"). ``shard_on_cpu`` does the one thing accelerate leaves out: it sets the state's
distributed type to ``FSDP`` with the plugin given, right after the Accelerator is built (in
the process-wide state too, as accelerate does for FSDP on a GPU); from
there the Trainer's and accelerate's own FSDP2 code runs (``fully_shard`` over gloo works on
the CPU).

The Trainer refuses an optimizer passed in under FSDP, so it builds its own: ``optim="sgd"``
(no momentum), learning rate 1, no decay, no clipping. The step's full gradient is read just
before that optimizer steps (the Trainer's ``on_pre_optimizer_step``), each sharded gradient
(a DTensor) gathered with ``full_tensor()`` on every rank; that is the update SGD(lr=1) applies.
"""

from __future__ import annotations

import torch

from ..core.grads import trainable
from ..stacks.ranks import full_gradient

def settings() -> dict:
    """The TrainingArguments the Trainer's FSDP2 is run with (a fresh dict each time: the Trainer
    writes its defaults into the fsdp_config it is given)."""
    return {"fsdp": True, "fsdp_config": {"version": 2}, "optim": "sgd"}

CPU_NOTE = ("FSDP2 on the CPU: accelerate keeps a CPU run's distributed type MULTI_CPU and drops the FSDP "
            "plugin (the model would be wrapped in DDP); the audit set it to FSDP, so accelerate's own FSDP2 "
            "code sharded the model")


def plugin():
    """accelerate's FSDP2 plugin as the recipes build it (the Trainer builds its own from ``settings()``)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2)


def shard_on_cpu(accelerator, fsdp_plugin) -> bool:
    """Turn a CPU run's dropped FSDP plugin back on (see the module's text). True when this run is
    FSDP on the CPU by the audit's doing (here, or by an earlier call in this process: accelerate's
    state is process-wide)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = fsdp_plugin
        state.distributed_type = DistributedType.FSDP
        # as AcceleratorState does for FSDP: the process-wide state every later AcceleratorState() copies
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return state.distributed_type == DistributedType.FSDP and state.device.type == "cpu"


def trainer_shard_on_cpu(trainer) -> bool:
    """``shard_on_cpu`` for a Trainer that asked for FSDP (its ``fsdp`` argument)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not trainer.args.fsdp or not shard_on_cpu(
            trainer.accelerator, FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)):
        return False
    trainer.is_fsdp_enabled = True
    return True


def sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


class FullGradient:
    """The step's full gradient, read just before the optimizer steps (a collective: every rank
    gathers; ``keep`` says whether this rank keeps it): ``watch`` an optimizer, or give the
    Trainer ``callback``. ``steps`` counts the optimizer steps; a second one (a loop that steps
    too often) leaves the last one's gradient."""

    def __init__(self, model: torch.nn.Module, keep: bool):
        self.model, self.keep, self.steps = model, keep, 0
        self.gradient: list[tuple[str, torch.Tensor | None]] = [(n, None) for n, _ in trainable(model)]

    def watch(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_pre_hook(lambda *_: self._read())

    @property
    def callback(self):
        from transformers import TrainerCallback

        return type("FullGradientCallback", (TrainerCallback,),
                    {"on_pre_optimizer_step": lambda *_, **__: self._read()})()

    def _read(self) -> None:
        self.steps += 1
        # a sharded model's gradients are DTensors once FSDP2 reduce-scattered them; a plain one
        # never was (FSDP2 finds backward through the module's outputs: ones it cannot traverse,
        # not a pytree, hide it), so each rank holds its own
        self.unreduced = [n for n, p in trainable(self.model)
                          if p.grad is not None and not hasattr(p.grad, "full_tensor")] if sharded(self.model) else []
        gradient = full_gradient(self.model)
        if self.keep:
            self.gradient = gradient

    @property
    def note(self) -> str:
        if not getattr(self, "unreduced", None):
            return ""
        return (f"FSDP2 never reduced the gradients of {len(self.unreduced)} sharded parameters "
                f"({', '.join(self.unreduced[:3])}{', ...' if len(self.unreduced) > 3 else ''}): each rank kept its "
                f"own (does the model return its outputs in a structure FSDP2 cannot traverse?); rank 0's is judged")
