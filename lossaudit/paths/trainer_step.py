"""One real ``transformers.Trainer`` optimizer step on one layout, and what it did.

The Trainer gets the layout's sequences in the layout's order (a sequential sampler over the
concatenated microbatches), the layout's padding through the shared collate/model_inputs, and
plain SGD with lr 1 and no momentum, decay, clipping or warm-up, so the update it applies is the
gradient the Trainer produced; ``probe.UpdateProbe`` reads it exactly (``params_before -
params_after`` in float32 would round it by ulp(param), about the tolerance on some models),
on the model's device, without a copy of the weights.

On a data-parallel rank (a process group is up, ``RANK``/``WORLD_SIZE`` set, see
``lossaudit.audit.distributed``) the Trainer wraps the model in DDP itself; it is fed the k
microbatches ``layout.rank_groups(rank)`` through a plain DataLoader, so accelerate's sharding
of the Trainer's dataloader cannot re-split or reorder them.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from ..models.compat import trainer_takes, training_arguments, transformers_version
from ..core.forward import model_inputs
from ..core.layouts import Layout, collate
from .base import AuditContext, Unavailable
from ..stacks.deepspeed import FullGradients
from .fsdp2 import CPU_NOTE, FullGradient, settings as fsdp2_settings, sharded, trainer_shard_on_cpu
from .probe import UpdateProbe


class StepUnavailable(Unavailable):
    """The installed Trainer cannot express this step; the message is the one-line reason."""


@dataclass
class StepResult:
    update: dict[str, torch.Tensor]  # the update the optimizer step applied, as a gradient
    logged_loss: float  # TrainOutput.training_loss, also log_history's train_loss
    num_items: list[int | None]  # num_items_in_batch the Trainer gave compute_loss, per microbatch
    accepts_loss_kwargs: bool | None  # Trainer.model_accepts_loss_kwargs (None before 4.46)
    average_tokens: bool | None = None  # args.average_tokens_across_devices (None: the release lacks it)
    # what the step's own path found or did that explains its update (stacks.packing.explain; the
    # audit running the Trainer's FSDP2 on the CPU, paths/fsdp2.py)
    note: str = ""


class _Indices(torch.utils.data.Dataset):
    def __init__(self, order: list[int]):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return self.order[i]


class _Collator:
    """Sample indices -> the model inputs every other path gives the model, plus labels."""

    def __init__(self, ctx: AuditContext, padding: str):
        self.ctx, self.padding = ctx, padding

    def __call__(self, indices: list[int]) -> dict:
        mb = collate(self.ctx.batch, tuple(indices), self.padding)
        return {**model_inputs(self.ctx.model, mb, torch.device("cpu")), "labels": mb.labels}


@lru_cache(maxsize=None)
def _trainer_class():
    from transformers import Trainer

    class LayoutTrainer(Trainer):
        """Feeds sequences in dataset order and records what compute_loss was given."""

        def _get_train_sampler(self, *args, **kwargs):  # 4.40 takes no argument, later ones one
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def get_train_dataloader(self):
            if self.args.world_size == 1:
                return super().get_train_dataloader()
            # this rank's own microbatches, in order: accelerate must not shard them over ranks
            return torch.utils.data.DataLoader(
                self.train_dataset, batch_size=self.args.train_batch_size, collate_fn=self.data_collator,
                sampler=torch.utils.data.SequentialSampler(self.train_dataset), num_workers=0)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.sharded_on_cpu = trainer_shard_on_cpu(self)  # --data-parallel fsdp2 on the CPU

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.seen_num_items.append(given(kwargs.get("num_items_in_batch")))
            return super().compute_loss(model, inputs, *args, **kwargs)

    return LayoutTrainer


def given(n):
    """num_items_in_batch as compute_loss got it, kept where it is: a tensor on the model's
    device is read after the step (``int()`` here would wait for the GPU at every microbatch)."""
    return n.detach().clone() if isinstance(n, torch.Tensor) else n


def per_device_batch(layout: Layout) -> int:
    """The Trainer's fixed per-device batch size for ``layout``, or StepUnavailable."""
    sizes = {len(g) for g in layout.groups}
    if len(sizes) != 1:
        total = sum(len(g) for g in layout.groups)
        ranks = f" x {layout.world_size} ranks" if layout.world_size > 1 else ""
        raise StepUnavailable(
            f"the Trainer needs equal microbatches; {total} sequences do not split into "
            f"{layout.microbatches}{ranks} of one size (sizes {sorted(len(g) for g in layout.groups)})"
        )
    return sizes.pop()


def _settings(ctx: AuditContext, layout: Layout, out: str) -> dict:
    """What the audit sets, by newest name (compat drops what a release lacks)."""
    return {**_common_settings(ctx, layout, out), **_logging(layout)}


def _logging(layout: Layout) -> dict:
    """Off in one process. On N ranks, a log at the step: only a logging step gathers the loss
    over ranks; without one, ``training_loss`` is rank 0's own share (x N where tokens are
    averaged across devices), not what the loss curve shows."""
    if layout.world_size == 1:
        return {"logging_strategy": "no"}
    return {"logging_strategy": "steps", "logging_steps": 1}


def _common_settings(ctx: AuditContext, layout: Layout, out: str) -> dict:
    return {
        "output_dir": out,
        "per_device_train_batch_size": per_device_batch(layout),
        "gradient_accumulation_steps": layout.microbatches,
        "max_steps": 1,
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,  # 0 turns clipping off in every release
        "seed": ctx.config.seed if ctx.config is not None else 0,
        "use_cpu": ctx.device.type == "cpu",
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "dataloader_drop_last": False,
    }


def _build(ctx: AuditContext, layout: Layout, rank: int, out: str, user_args: dict,
           compute_loss_func: Callable | None, data_parallel: str = "ddp"):
    kwargs = {}
    settings = _settings(ctx, layout, out)
    if data_parallel == "fsdp2":  # the Trainer builds its own SGD under FSDP (it refuses one passed in)
        args = training_arguments({**settings, **fsdp2_settings()}, user_args)
    else:
        args = training_arguments(settings, user_args)
        optimizer = torch.optim.SGD([p for _, p in ctx.params], lr=1.0, momentum=0.0, weight_decay=0.0)
        kwargs["optimizers"] = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0))
    if compute_loss_func is not None:
        kwargs["compute_loss_func"] = compute_loss_func
    trainer = _trainer_class()(
        model=ctx.model,
        args=args,
        train_dataset=_Indices([i for g in layout.rank_groups(rank) for i in g]),
        data_collator=_Collator(ctx, layout.padding),
        **kwargs,
    )
    return prepared(trainer)


def prepared(trainer):
    """A built Trainer made ready for one audited step: what compute_loss gets is recorded (see
    LayoutTrainer) and nothing prints."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.seen_num_items = []
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


@contextlib.contextmanager
def _quiet_and_cheap():
    """Library chatter off; earlier objects out of the garbage collector's sight (the
    Trainer runs a full collection at every start, costly with transformers imported)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    gc.freeze()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        gc.unfreeze()
        hf_logging.set_verbosity(verbosity)


def trainer_step(
    ctx: AuditContext, layout: Layout, *, user_args: dict, compute_loss_func: Callable | None = None, rank: int = 0,
    data_parallel: str = "ddp",
) -> StepResult:
    """Run one Trainer step on ``layout`` (this process is data-parallel rank ``rank`` of
    ``layout.world_size``); the model's weights are restored afterwards, except under FSDP2
    (``data_parallel="fsdp2"``), which shards the model in place: give it a fresh one."""
    if compute_loss_func is not None and not trainer_takes("compute_loss_func"):
        raise StepUnavailable(f"transformers {transformers_version()} Trainer has no compute_loss_func (4.46+)")
    per_device_batch(layout)
    build = lambda out: _build(ctx, layout, rank, out, user_args, compute_loss_func, data_parallel)  # noqa: E731
    if data_parallel == "fsdp2":
        return train_sharded_step(build, keep=rank == 0)
    # under DeepSpeed the engine steps on its own partitions: its full gradient is read before the step
    probe = FullGradients if "deepspeed" in user_args else UpdateProbe
    return train_one_step(ctx, build, probe=probe)


def train_sharded_step(build: Callable[[str], object], *, keep: bool) -> StepResult:
    """``build(output_dir)``'s Trainer (its own FSDP2) trains one step; the full gradient is read
    before its optimizer steps (``fsdp2.FullGradient``), kept where ``keep``."""
    with _quiet_and_cheap(), tempfile.TemporaryDirectory(prefix="lossaudit-trainer-") as out:
        trainer = build(out)
        reader = FullGradient(trainer.model, keep)  # sharded in place: the same module
        trainer.add_callback(reader.callback)
        result = trainer.train()
    if not sharded(trainer.model):
        raise StepUnavailable("--data-parallel fsdp2: the Trainer did not shard the model (no FSDPModule after "
                              f"its step; accelerate's distributed type {trainer.accelerator.distributed_type})")
    return StepResult(dict(reader.gradient), float(result.training_loss), _given(trainer),
                      getattr(trainer, "model_accepts_loss_kwargs", None),
                      getattr(trainer.args, "average_tokens_across_devices", None),
                      "; ".join(n for n in (CPU_NOTE if getattr(trainer, "sharded_on_cpu", False) else "",
                                            reader.note) if n))


def train_one_step(ctx: AuditContext, build: Callable[[str], object], quiet=contextlib.nullcontext,
                   probe=UpdateProbe) -> StepResult:
    """``build(output_dir)``'s Trainer trains one step; the update it applied is read exactly and
    the model's weights are restored. ``quiet``: more chatter to silence (a library's bars);
    ``probe``: what reads the update (``stacks.deepspeed.FullGradients`` under DeepSpeed)."""
    probe = probe(ctx.model)
    try:
        with _quiet_and_cheap(), quiet(), tempfile.TemporaryDirectory(prefix="lossaudit-trainer-") as out:
            trainer = build(out)
            probe.watch(trainer.optimizer)
            result = trainer.train()
            update = dict(probe.gradient())  # None everywhere if the Trainer never stepped
    finally:
        probe.restore()
    return StepResult(update, float(result.training_loss), _given(trainer),
                      getattr(trainer, "model_accepts_loss_kwargs", None),
                      getattr(trainer.args, "average_tokens_across_devices", None))


def _given(trainer) -> list[int | None]:
    return [None if n is None else int(n) for n in trainer.seen_num_items]
