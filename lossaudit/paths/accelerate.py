"""The ``accelerate`` path: a plain PyTorch loop driven by accelerate, as its docs show it.

Each recipe is one case per layout (its name goes in the ``reduction`` column):

- ``naive`` — the loop of accelerate's gradient-accumulation guide:
  ``with accelerator.accumulate(model): loss = model(**batch).loss; accelerator.backward(loss)``.
  ``backward`` divides each microbatch's token mean by k (and DDP averages over ranks): a mean
  of means, known to differ from the token mean on uneven token counts. Shown, never a finding.
- ``token_count`` — the guide's "Gradient accumulation on training samples of variable size":
  pre-load the k microbatches, count their target tokens, ``accelerator.gather`` the count over
  processes, ``loss = token_sum * k * num_processes / num_items_in_batch`` (because ``backward``
  divides by k and DDP averages over processes), ``no_sync`` on all but the last microbatch,
  one optimizer step. Audited.
- ``token_count_accumulate`` — the same loss inside ``accelerator.accumulate(model)``. Audited.

The optimizer is SGD with lr 1 and nothing else, so the update it applies is minus the
gradient, compared with the reference gradient. The weights are restored after every step.
With ``--world-size N`` the steps run on N spawned ranks (``lossaudit.audit.distributed``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..core.batch import Batch
from ..audit.distributed import DEFAULT_TIMEOUT_S, PortableModel, fresh, run_ranks
from ..core.forward import model_inputs
from ..core.layouts import Layout, Microbatch, collate
from ..core.registry import Registry
from ..core.wrapped import virtual_tokens
from ..core.tokens import TASKS, count_targets, prepend_ignored, token_losses
from .fsdp2 import CPU_NOTE, FullGradient, plugin, shard_on_cpu, sharded
from .base import PATHS, Label, Outcome, PathSpec, StepPath
from ..stacks.deepspeed import ZERO_STAGES, FullGradients, zero_config
from .probe import UpdateProbe


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """What a recipe knows when it computes one microbatch's loss."""

    k: int  # gradient_accumulation_steps
    world_size: int  # accelerator.num_processes
    local: int  # target tokens in this rank's k microbatches
    total: int  # the local counts gathered over processes and summed: the step's target tokens


# (model, inputs from forward.model_inputs, labels, task, counts) -> the loss given to accelerator.backward
LossFn = Callable[[torch.nn.Module, dict, torch.Tensor, str, TokenCounts], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    name: str
    loss: LossFn
    loop: str  # "accumulate" (accelerator.accumulate per microbatch) or "manual" (no_sync, one step)
    expected: bool = False  # known to differ from the token mean: shown, never a finding
    doc: str = ""


RECIPES: Registry[Recipe] = Registry("accelerate recipe")


def model_loss(model, inputs, labels, task, counts):
    """``model(**batch).loss``: the model's own mean over this microbatch's targets."""
    return model(**inputs, labels=labels).loss


def token_sum(model, inputs, labels, task) -> torch.Tensor:
    """The guide's summing criterion; label alignment comes from ``tokens`` (float64)."""
    return token_losses(model(**inputs).logits, prepend_ignored(labels, virtual_tokens(model)), task).sum()


def token_count_loss(model, inputs, labels, task, counts):
    return token_sum(model, inputs, labels, task) * counts.k * counts.world_size / counts.total


NAIVE_DOC = ("naive accelerate loop: model(**batch).loss is each microbatch's token mean and "
             "accelerator.backward divides it by k (DDP averages over ranks), a mean of means that "
             "differs from the token mean when microbatches hold different numbers of target tokens")
RECIPES.register("naive", Recipe("naive", model_loss, "accumulate", expected=True, doc=NAIVE_DOC))
RECIPES.register("token_count", Recipe(
    "token_count", token_count_loss, "manual",
    doc="accelerate docs, variable-size samples: token sum * k * num_processes / gathered token count"))
RECIPES.register("token_count_accumulate", Recipe(
    "token_count_accumulate", token_count_loss, "accumulate",
    doc="the docs' token-count loss inside accelerator.accumulate()"))
DEFAULT_RECIPES = ("naive", "token_count", "token_count_accumulate")


def accumulate_loop(accelerator, model, optimizer, batches, loss_fn) -> list[torch.Tensor]:
    """accelerate's guide: an ``accumulate`` block per microbatch; step and zero_grad in each
    (the prepared optimizer only acts when accelerate syncs, every k-th microbatch)."""
    losses = []
    for inputs, labels in batches:
        with accelerator.accumulate(model):
            loss = loss_fn(model, inputs, labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def manual_loop(accelerator, model, optimizer, batches, loss_fn) -> list[torch.Tensor]:
    """The guide's variable-size skeleton: no_sync on all but the last microbatch, one step. The
    guide calls DDP's ``model.no_sync``; ``accelerator.no_sync(model)`` is that under DDP and
    FSDP2's ``set_requires_gradient_sync(False)`` under FSDP2, which has no ``no_sync``."""
    losses = []
    for i, (inputs, labels) in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)
        with sync:
            loss = loss_fn(model, inputs, labels)
            accelerator.backward(loss)
        losses.append(loss.detach())
    optimizer.step()
    optimizer.zero_grad()
    return losses


LOOPS = {"accumulate": accumulate_loop, "manual": manual_loop}
# why the manual loop cannot accumulate under DeepSpeed ZeRO (measured on every stage; at k=1 it runs)
MANUAL_UNDER_ZERO = ("DeepSpeed refuses this loop: accelerator.backward outside accelerator.accumulate() steps the "
                     "engine after every microbatch, and DeepSpeed's model.no_sync() forbids that (ZeRO 1: "
                     "\"illegal to call Engine.step() inside no_sync\"; ZeRO 2, 3: no_sync is incompatible with "
                     "gradient partitioning); accumulate with accelerator.accumulate() under DeepSpeed")


@dataclass
class StepOutcome:
    gradient: list[tuple[str, torch.Tensor | None]]  # minus the applied update, per parameter
    loss: float  # what the update is the gradient of: sum of backward's losses / (k * ranks)
    optimizer_steps: int
    note: str = ""  # what the audit did to run the step as asked (FSDP2 on the CPU)


def run_step(model: torch.nn.Module, microbatches: list[Microbatch], recipe: Recipe, *, k: int, task: str,
             device: torch.device, data_parallel: str = "ddp") -> StepOutcome:
    """One optimizer step of ``recipe`` on this process's k microbatches. Under FSDP2
    (``data_parallel="fsdp2"``, on ranks) the model is sharded in place: give it a fresh one; under
    DeepSpeed ZeRO (``zero1``..``zero3``, accelerate's DeepSpeedPlugin) it trains the model it is given."""
    zero = ZERO_STAGES.get(data_parallel)
    probe = (UpdateProbe if zero is None else FullGradients)(model)
    fsdp_plugin = plugin() if data_parallel == "fsdp2" else None
    accelerator = _accelerator(k, device, zero, len(microbatches[0].labels), fsdp_plugin)
    note = CPU_NOTE if fsdp_plugin is not None and shard_on_cpu(accelerator, fsdp_plugin) else ""
    try:
        optimizer = torch.optim.SGD([p for _, p in probe.params], lr=1.0)  # no momentum, decay, clipping
        if fsdp_plugin is None:
            probe.watch(optimizer)
        else:  # the full gradient, read before the step; FSDP2 swaps the parameters for sharded ones
            reader = FullGradient(model, keep=True)
            reader.watch(optimizer)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        if fsdp_plugin is not None and not sharded(prepared):
            raise RuntimeError(f"--data-parallel fsdp2: accelerate did not shard the model (distributed type "
                               f"{accelerator.distributed_type})")
        # inputs are built for the unwrapped model: DDP's forward(*args, **kwargs) hides which it takes
        batches = [(model_inputs(model, mb, device), mb.labels.to(device)) for mb in microbatches]
        local = sum(count_targets(prepend_ignored(mb.labels, virtual_tokens(model)), task) for mb in microbatches)
        total = int(accelerator.gather(torch.tensor([local], device=device)).sum())
        counts = TokenCounts(k, accelerator.num_processes, local, total)
        loss_fn = partial(_call, recipe.loss, task=task, counts=counts)
        losses = LOOPS[recipe.loop](accelerator, prepared, optimizer, batches, loss_fn)
        summed = accelerator.reduce(torch.stack([x.to(torch.float64) for x in losses]).sum(), "sum")
        loss = float(summed) / (k * counts.world_size)
        if fsdp_plugin is not None:
            return StepOutcome(reader.gradient, loss, reader.steps, "; ".join(n for n in (note, reader.note) if n))
        return StepOutcome(probe.gradient(), loss, probe.steps)
    finally:
        probe.restore()
        accelerator.sync_gradients = True  # GradientState is process-wide: leave no half-open window


def _accelerator(k: int, device: torch.device, zero: int | None, micro_batch: int, fsdp_plugin=None):
    """The Accelerator of one step; with ``fsdp_plugin`` (FSDP2), or under ZeRO with accelerate's
    DeepSpeedPlugin.

    accelerate 1.16 does not run DeepSpeed on the CPU by itself: ``Accelerator(cpu=True)`` turns
    DeepSpeed off, and without it accelerate finds no device backend and counts 1 process while
    DeepSpeed's group holds N (``accelerator.gather`` then fails on gloo). So the process state is
    first built on gloo, ``PartialState(cpu=True)``, as ``TrainingArguments(use_cpu=True)`` builds
    it for the Trainer; the Accelerator then takes the plugin (DeepSpeed's CPU accelerator)."""
    from accelerate import Accelerator

    if zero is None:
        return Accelerator(cpu=device.type == "cpu", device_placement=False, gradient_accumulation_steps=k,
                           fsdp_plugin=fsdp_plugin)
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    AcceleratorState._reset_state(True)  # the process-wide state keeps the last step's plugin
    PartialState(cpu=device.type == "cpu")
    plugin = DeepSpeedPlugin(hf_ds_config=zero_config(zero, k=k, micro_batch=micro_batch))
    return Accelerator(device_placement=False, gradient_accumulation_steps=k, deepspeed_plugin=plugin)


def _call(loss: LossFn, model, inputs, labels, *, task, counts):
    return loss(model, inputs, labels, task, counts)


@dataclass
class RankJob:
    """What every rank needs: the model, the batch and what to run on it."""

    model: PortableModel
    batch: Batch
    layouts: list[Layout]
    recipes: list[Recipe]
    data_parallel: str = "ddp"  # accelerate's DDP, its FSDP2 plugin (paths/fsdp2.py), or DeepSpeed ZeRO (zeroN)


def rank_steps(rank: int, world_size: int, job: RankJob, device: torch.device) -> list[StepOutcome] | None:
    """Body of one data-parallel rank: every (layout, recipe) step on this rank's microbatches
    (under FSDP2, which shards the model in place, and DeepSpeed, which trains it, each on a fresh copy)."""
    model = None
    outcomes = []
    for layout in job.layouts:
        mbs = [collate(job.batch, g, layout.padding) for g in layout.rank_groups(rank)]
        for recipe in job.recipes:
            if model is None or job.data_parallel != "ddp":
                model = fresh(job.model, device)
                model.train()
            outcomes.append(run_step(model, mbs, recipe, k=layout.microbatches, task=job.batch.task, device=device,
                                     data_parallel=job.data_parallel))
    if rank != 0:
        return None  # every rank holds the same update after the all-reduce
    for outcome in outcomes:  # it travels back through the host
        outcome.gradient = [(n, None if g is None else g.cpu()) for n, g in outcome.gradient]
    return outcomes


class AcceleratePath(StepPath):
    """One recipe. The token-count recipes train cross entropy alone (the docs' summing
    criterion), so they are compared with the cross-entropy reference; a MoE router aux loss
    is not part of them."""

    name = "accelerate"

    def __init__(self, recipe: Recipe, *, timeout_s: float = DEFAULT_TIMEOUT_S, data_parallel: str = "ddp"):
        self.recipe = recipe
        self.data_parallel = data_parallel  # on N ranks: accelerate's DDP, its FSDP2 plugin or DeepSpeed ZeRO
        self.timeout_s = timeout_s
        self.label = Label("accelerate", recipe.name, expected=recipe.expected, cause=recipe.doc if recipe.expected else "")

    @property
    def zero(self) -> int | None:
        """The DeepSpeed ZeRO stage on ranks (--data-parallel zeroN), None otherwise."""
        return ZERO_STAGES.get(self.data_parallel)

    def run(self, ctx, layout):
        """One layout in this process (world size 1)."""
        mbs = [collate(ctx.batch, g, layout.padding) for g in layout.rank_groups(0)]
        outcome = run_step(ctx.model, mbs, self.recipe, k=layout.microbatches, task=ctx.batch.task, device=ctx.device)
        return [self._outcome(ctx, layout, outcome)]

    def run_layouts(self, ctx, layouts, guard, say):
        world_size = layouts[0].world_size if layouts else 1
        if world_size == 1:
            return super().run_layouts(ctx, layouts, guard, say)
        refused = [layout for layout in layouts if self._zero_refuses(layout)]
        runs = [layout for layout in layouts if layout not in refused]
        cases = {id(layout): guard.judge.failed(self.label, layout, MANUAL_UNDER_ZERO) for layout in refused}
        if runs:
            say(f"accelerate:{self.recipe.name}: {len(runs)} layouts on {world_size} ranks ({self.data_parallel})")
            job = RankJob(PortableModel.of(ctx.model), ctx.batch, runs, [self.recipe], self.data_parallel)
            outcomes, reason = guard.call(f"the accelerate path on {world_size} ranks", lambda: run_ranks(
                rank_steps, job, world_size, device_type=ctx.device.type, timeout_s=self.timeout_s))
            for i, layout in enumerate(runs):
                cases[id(layout)] = guard.judge.failed(self.label, layout, reason) if reason is not None \
                    else guard.judge.measure(self._outcome(ctx, layout, outcomes[0][i]))
        return [cases[id(layout)] for layout in layouts]

    def _zero_refuses(self, layout: Layout) -> bool:
        """The manual loop (no_sync, one step) accumulating under DeepSpeed: measured to fail."""
        return self.zero is not None and self.recipe.loop == "manual" and layout.microbatches > 1

    def _outcome(self, ctx, layout: Layout, outcome: StepOutcome) -> Outcome:
        per_rank = layout.per_rank(ctx.batch.group_targets(layout.groups))
        notes = [outcome.note] if outcome.note else []
        if outcome.optimizer_steps != 1:
            notes.append(f"the optimizer stepped {outcome.optimizer_steps} times for {layout.microbatches} "
                         f"accumulated microbatches (once expected)")
        extra = {"rank_tokens": per_rank, "optimizer_steps": outcome.optimizer_steps}
        if layout.world_size > 1:
            extra["data_parallel"] = self.data_parallel
        if self.zero is not None:
            extra["deepspeed_zero_stage"] = self.zero
        return Outcome(self.label, layout, outcome.loss, outcome.gradient, note="; ".join(notes), extra=extra)


PATHS.register(
    "accelerate",
    PathSpec("accelerate", lambda config: [AcceleratePath(RECIPES.get(n), data_parallel=config.data_parallel)
                                           for n in DEFAULT_RECIPES], TASKS,
             "a plain PyTorch loop with Accelerator.accumulate(): naive and token-count recipes",
             requires=("accelerate",)),
)
