"""``--trainer-class trl:GRPOTrainer``: TRL's GRPO trainer (or a subclass) run on rollouts drawn
from the seed (``stacks/grpo.py``), every optimizer step of its generation batches read.

The trainer gets the stock Trainer path's settings (SGD lr 1, no clipping, the seed), k
accumulation steps of B/k completions, the user's ``--trainer-arg`` (``loss_type``,
``steps_per_generation``, ``num_generations``, ``num_iterations``, ``beta``, ...) and as many
steps as it takes for the windows and the generation batches to line up again
(``audited_steps``). ``probe.StepUpdates`` reads each step's update (SGD lr 1) and puts the
weights back after it, so every step runs on the weights its rollouts were scored with: the
importance ratio is 1 and each step's gradient is its loss type's aggregation of
``-A log p`` over the step's window (``paths/grpo.py`` judges it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass

import torch

from ..audit.config import CheckConfig
from ..core.backwards import KeptBackwards
from ..core.grads import trainable
from ..core.layouts import Layout
from ..stacks.grpo import (PROMPT_LENGTHS, Rollouts, audit_subclass, draw_rollouts, prompt_text, reward_func,
                           rollout_func, silenced_experimental)
from ..stacks.trl import arguments, arguments_class, tokenizer
from .base import AuditContext
from .probe import StepUpdates
from .trainer_class import _no_progress_bars
from .trainer_step import _common_settings, _quiet_and_cheap, prepared


@dataclass
class StepWindow:
    """One optimizer step of the run: the sequences of each of its microbatches, in order, and
    the update it applied (as a gradient)."""

    microbatches: list[list[int]]
    update: list[tuple[str, torch.Tensor | None]]
    num_items: list[int | None]  # num_items_in_batch on each microbatch's inputs (None: none there)

    @property
    def sequences(self) -> list[int]:
        return [i for mb in self.microbatches for i in mb]


@dataclass
class GRPORun:
    steps: list[StepWindow]
    config: object  # the GRPOConfig the trainer ran with
    logged_loss: float
    left_pads: dict[int, int] = dataclasses.field(default_factory=dict)  # sequence id -> pads TRL put before its prompt
    # each backward's gradient, in the order they ran (core/backwards.KeptBackwards): one per microbatch
    backwards: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)


def audited_steps(microbatches: int, steps_per_generation: int, num_iterations: int) -> int:
    """Optimizer steps until the windows and the generation batches line up again: every step of
    a generation batch (and of each of its iterations)."""
    generate_every = steps_per_generation * num_iterations
    return math.lcm(microbatches, generate_every) // microbatches


@dataclass(frozen=True)
class Plan:
    steps_per_generation: int
    num_iterations: int
    steps: int  # optimizer steps the run audits
    prompts: int  # distinct prompts it consumes (x num_generations completions)


def plan(microbatches: int, per_device: int, user_args: dict, num_generations: int) -> Plan:
    """The run's shape for k = ``microbatches`` accumulation steps of ``per_device`` completions:
    steps_per_generation (the user's, else k), every step of a generation batch, and the prompts
    those steps consume."""
    spg = int(user_args.get("steps_per_generation") or microbatches)
    iterations = int(user_args.get("num_iterations", 1))
    steps = audited_steps(microbatches, spg, iterations)
    completions = max(per_device * spg, per_device * microbatches * steps // iterations)
    return Plan(spg, iterations, steps, max(1, -(-completions // num_generations)))


def generations(user_args: dict, generation_batches: list[int]) -> int:
    """num_generations: the user's, else 4 or 2, the first that divides every generation batch."""
    if user_args.get("num_generations") is not None:
        return int(user_args["num_generations"])
    return next((g for g in (4, 2) if all(n % g == 0 for n in generation_batches)), 2)


def _config_default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(arguments_class(cls)) if f.name == name)


def default_loss_type(cls: type) -> str:
    """The loss_type the class's config defaults to (trl 1.16: dapo)."""
    return _config_default(cls, "loss_type")


def max_completion_length(cls: type | None = None) -> int:
    """GRPOConfig's default max_completion_length (the constant of dr_grpo)."""
    import trl

    return int(_config_default(cls or trl.GRPOTrainer, "max_completion_length"))


def build_trainer(ctx, cls: type, rollouts: Rollouts, settings: dict, user_args: dict):
    """``cls`` (GRPOTrainer or a subclass) on the rollouts' prompts, with SGD lr 1 and the audit's
    settings, ready for ``StepUpdates``."""
    from datasets import Dataset

    args = arguments(cls, settings, user_args)
    optimizer = torch.optim.SGD([p for _, p in ctx.params], lr=1.0, momentum=0.0, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    loaded = ctx.loaded
    vocab = loaded.vocab_size if loaded is not None else ctx.model.get_input_embeddings().weight.shape[0]
    eos = loaded.eos_id if loaded is not None else None
    dataset = Dataset.from_list([{"prompt": prompt_text(p)} for p in range(rollouts.prompts)])
    with silenced_experimental(), _reference_source(ctx.model, args, settings["output_dir"]):
        trainer = audit_subclass(cls)(
            model=ctx.model, reward_funcs=[reward_func(rollouts)], args=args, train_dataset=dataset,
            processing_class=tokenizer(vocab, ctx.batch.pad_id, eos), optimizers=(optimizer, schedule),
            rollout_func=rollout_func(rollouts))
    trainer.lossaudit_rollouts = rollouts
    trainer.seen_seqs, trainer.left_pads = [], {}
    return prepared(trainer)


@contextlib.contextmanager
def _reference_source(model, args, out: str):
    """With ``beta`` > 0 TRL loads its frozen reference model from the policy's
    ``config._name_or_path``; a model built from a config has none, so it is saved under the run's
    output folder (the initial weights: the reference TRL would load) for the trainer's start."""
    named = getattr(model.config, "_name_or_path", "")
    if not getattr(args, "beta", 0.0) or (named and os.path.isdir(named)):
        yield
        return
    from transformers.utils import logging as hf_logging

    folder = os.path.join(out, "reference-model")
    model.config._name_or_path = folder
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        yield
    finally:
        model.config._name_or_path = named
        hf_logging.enable_progress_bar()


def run_grpo(ctx, cls: type, rollouts: Rollouts, settings: dict, user_args: dict) -> GRPORun:
    """Train ``settings["max_steps"]`` steps of ``cls``; every step's update and microbatches.
    The model's weights are as they were afterwards."""
    probe = StepUpdates(ctx.model)
    try:
        with _quiet_and_cheap(), _no_progress_bars(), tempfile.TemporaryDirectory(prefix="lossaudit-grpo-") as out:
            trainer = build_trainer(ctx, cls, rollouts, {**settings, "output_dir": out}, user_args)
            probe.watch(trainer.optimizer)
            with KeptBackwards(ctx.model, ctx.params) as kept:
                result = trainer.train()
    finally:
        probe.restore()
    k = trainer.args.gradient_accumulation_steps
    seqs, counts = trainer.seen_seqs, [None if n is None else int(n) for n in trainer.seen_num_items]
    steps = [StepWindow(seqs[s * k:(s + 1) * k], update, counts[s * k:(s + 1) * k])
             for s, update in enumerate(probe.updates)]
    return GRPORun(steps, trainer.args, float(result.training_loss), dict(trainer.left_pads), kept.gradients())


def settings_for(ctx, microbatches: int, per_device: int, steps: int, out: str = "") -> dict:
    """The stock Trainer path's settings (SGD lr 1, no clipping, ...) for ``steps`` steps of
    ``microbatches`` accumulation steps of ``per_device`` completions."""
    groups = tuple(tuple(range(i * per_device, (i + 1) * per_device)) for i in range(microbatches))
    settings = _common_settings(ctx, Layout(microbatches, "contiguous", "right", groups), out)
    return {**settings, "max_steps": steps, "logging_strategy": "no"}


def loss_type_run(loaded, loss_type: str, steps_per_generation: int, k: int, per_device: int, *, seed: int = 0,
                  trainer_class: type | None = None, max_completion: int = 12,
                  prompt_lengths: tuple[int, int] = PROMPT_LENGTHS, device: torch.device = torch.device("cpu"),
                  **trainer_args):
    """One GRPO run of ``loss_type`` on ``loaded`` (a loaded tiny model) outside the CLI: k
    accumulation steps of ``per_device`` completions at ``steps_per_generation``, rollouts drawn
    from ``seed`` (num_generations 4 or 2, as the CLI picks). Returns (ctx, rollouts, run), what
    ``paths.grpo.judge_steps`` takes. The release table and the tests measure with it."""
    import trl

    user = {"loss_type": loss_type, "steps_per_generation": steps_per_generation, **trainer_args}
    if loss_type == "luspo":
        user.setdefault("importance_sampling_level", "sequence")
    user["num_generations"] = generations(user, [per_device * steps_per_generation])
    shape = plan(k, per_device, user, user["num_generations"])
    rollouts = draw_rollouts(prompts=shape.prompts, generations=user["num_generations"],
                             vocab_size=loaded.vocab_size, pad_id=loaded.pad_id, eos_id=loaded.eos_id,
                             max_completion=max_completion, seed=seed, prompt_lengths=prompt_lengths)
    ctx = AuditContext(loaded.model, rollouts.batch, None, trainable(loaded.model), device,
                       CheckConfig(model=loaded.name), loaded)
    run = run_grpo(ctx, trainer_class or trl.GRPOTrainer, rollouts,
                   settings_for(ctx, k, per_device, shape.steps), user)
    return ctx, rollouts, run
