"""The ``trainer`` path: a real ``transformers.Trainer`` optimizer step per layout (per-device
batch B/k, ``gradient_accumulation_steps=k``), and once on the full batch (k=1).

The update the step applied is compared with the reference gradient, and the loss the Trainer
logs with the reference loss. With ``--loss-fn`` the step runs a second time with the user's
function as ``compute_loss_func`` (its cases carry the function's name as ``reduction``).

With ``--world-size N`` every step runs on N ranks spawned by ``lossaudit.audit.distributed``: each
rank builds its own Trainer, which wraps the model in DDP, and trains on the layout's k
microbatches of that rank. The update (the same on every rank after DDP's all-reduce) and the
logged loss come from rank 0; what ``compute_loss`` was given comes from every rank.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

from ..core.batch import Batch
from ..models.compat import GA_FIX_RELEASE, release_has_ga_fix, training_arguments, transformers_version
from ..audit.config import CheckConfig, parse_value
from ..audit.distributed import DEFAULT_TIMEOUT_S, PortableModel, fresh, run_ranks
from ..core.errors import first_line, UsageError
from ..core.grads import trainable
from ..core.layouts import Layout, group
from ..core.tokens import TASKS
from .base import PATHS, AuditContext, Label, Outcome, PathSpec, StepPath
from .grpo import GRPOPath
from .loss_fn import resolve_loss_fn
from ..stacks.grpo import grpo_problems, is_grpo
from ..stacks.axolotl import checked as checked_axolotl
from ..stacks.swift import checked as checked_swift
from ..stacks.deepspeed import ZERO_STAGES, stage_of, zero_config
from ..stacks.frameworks import arguments_class, required_problem, rows_problem
from ..stacks.trl import check_arguments, resolve_trainer_class
from .axolotl_config import run_axolotl_config
from .trainer_class import run_trainer_class
from .trainer_step import StepResult, StepUnavailable, trainer_step


def _check_values(user_args: dict) -> None:
    """Values the installed TrainingArguments refuses are usage errors, found before any step."""
    if not user_args:
        return
    with tempfile.TemporaryDirectory(prefix="lossaudit-args-") as out:
        try:
            training_arguments({"output_dir": out, "use_cpu": True, "report_to": "none"}, user_args)
        except (ValueError, TypeError) as exc:
            first = first_line(exc)
            raise UsageError(f"--trainer-arg: TrainingArguments refused the values: {first}") from None


def full_batch_layout(batch: Batch, world_size: int = 1) -> Layout:
    """The GA-off arm: one microbatch per rank, the batch cut contiguously over the ranks."""
    return Layout(1, "contiguous", "right", group(batch, world_size, "contiguous"), world_size)


@dataclass
class RankJob:
    """What every rank needs for the Trainer steps (the user's loss function travels by name)."""

    model: PortableModel
    batch: Batch
    config: CheckConfig
    steps: list[tuple[Layout, str | None]]  # (layout, --loss-fn spec or None), in order
    user_args: dict
    data_parallel: str = "ddp"  # the Trainer's DDP, its own FSDP2 (paths/fsdp2.py), or DeepSpeed (user_args)


def rank_trainer_steps(rank: int, world_size: int, job: RankJob, device) -> list[StepResult | str]:
    """Body of one rank: every Trainer step on this rank's microbatches, in the job's order.
    A step the Trainer cannot express is its one-line reason (the same on every rank). FSDP2
    shards the model in place and DeepSpeed trains (ZeRO-3: partitions) the model it is given:
    each of their steps gets a fresh copy."""
    fns = {spec: resolve_loss_fn(spec) for _, spec in job.steps if spec}
    renew = job.data_parallel == "fsdp2" or "deepspeed" in job.user_args
    results: list[StepResult | str] = []
    ctx = None
    for layout, spec in job.steps:
        if ctx is None or renew:
            model = fresh(job.model, device)
            model.train()
            ctx = AuditContext(model, job.batch, None, trainable(model), device, job.config)
        try:
            step = trainer_step(ctx, layout, user_args=job.user_args, compute_loss_func=fns.get(spec), rank=rank,
                                data_parallel=job.data_parallel)
        except StepUnavailable as exc:
            results.append(str(exc))
            continue
        # the update is rank 0's (the same everywhere): only it travels back, through the host
        step.update = {n: None if u is None else u.cpu() for n, u in step.update.items()} if rank == 0 else {}
        results.append(step)
    return results


class TrainerPath(StepPath):
    """A Trainer step per layout, with the model's own loss or with one compute_loss_func. The
    model's own loss trains a MoE router aux loss too; a user's compute_loss_func is judged as
    the cross entropy it is meant to be (as the loss-fn path judges it)."""

    name = "trainer"

    def __init__(self, user_args: dict, spec: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 trainer_class: type | None = None, axolotl=None, swift=None, data_parallel: str = "ddp"):
        self.user_args, self.spec, self.timeout_s = user_args, spec, timeout_s
        self.data_parallel = data_parallel  # on N ranks: the Trainer's DDP or its own FSDP2
        self.fn = resolve_loss_fn(spec) if spec else None
        # --trainer-class: the user's Trainer subclass instead of the stock one (its name in the
        # reduction column; judged as cross entropy: whether it trains a MoE aux loss is its own)
        self.trainer_class = trainer_class
        self.axolotl = axolotl  # --axolotl-config: stacks.axolotl.AxolotlConfig
        self.swift = swift  # --swift-args: stacks.swift.SwiftArgs (trainer_class: ms-swift's Seq2SeqTrainer)
        own = trainer_class.__name__ if trainer_class else ("axolotl" if axolotl is not None else None)
        self.label = Label("trainer", spec or own, trains_aux=spec is None and own is None)

    @classmethod
    def build(cls, config) -> list["TrainerPath"]:
        user_args = {k: parse_value(v) for k, v in config.trainer_args}
        if config.data_parallel in ZERO_STAGES:  # lossaudit's DeepSpeed config, the audit's own settings
            user_args["deepspeed"] = zero_config(ZERO_STAGES[config.data_parallel])
        if getattr(config, "axolotl_config", None):
            return [cls(user_args, axolotl=checked_axolotl(config))]
        if getattr(config, "swift_args", None):  # swift sft's trainer for a causal LM (TrainerFactory)
            source = checked_swift(config)
            return [cls(user_args, trainer_class=resolve_trainer_class("swift.trainers:Seq2SeqTrainer"), swift=source)]
        if config.trainer_class:
            trainer_class = resolve_trainer_class(config.trainer_class)
            arguments_class(trainer_class)  # first: one line when its arguments class cannot be told
            problem = required_problem(trainer_class) or rows_problem(trainer_class, config.prompt_masking)
            if problem:
                raise UsageError(problem)
            check_arguments(trainer_class, user_args)
            if is_grpo(trainer_class):  # judged per optimizer step against its loss type's declaration
                problems = grpo_problems(user_args, config.aggregation)
                if problems:
                    raise UsageError(*problems)
                return [GRPOPath(trainer_class, user_args)]
            return [cls(user_args, trainer_class=trainer_class)]
        _check_values(user_args)
        dp = config.data_parallel
        return [cls(user_args, data_parallel=dp)] + ([cls(user_args, config.loss_fn, data_parallel=dp)]
                                                     if config.loss_fn else [])

    def run_resolved(self, ctx, layout: Layout):
        """axolotl trains a model of its own loading: the audited model's backwards (``core/backwards.py``)
        would see none of its step, only what the packed-step explanation computes on the audited model."""
        return self.run(ctx, layout) if self.axolotl is not None else super().run_resolved(ctx, layout)

    def _step(self, ctx, layout: Layout) -> StepResult:
        if self.axolotl is not None:
            return run_axolotl_config(ctx, layout, self.axolotl)
        if self.trainer_class is not None:
            return run_trainer_class(ctx, layout, self.trainer_class, user_args=self.user_args, source=self.swift)
        return trainer_step(ctx, layout, user_args=self.user_args, compute_loss_func=self.fn)

    def with_full_batch(self, ctx, layouts: list[Layout]) -> list[Layout]:
        """``layouts``, after the GA-off arm (k=1) when the run does not start with one."""
        if layouts and layouts[0].microbatches != 1:
            layouts = [full_batch_layout(ctx.batch, layouts[0].world_size), *layouts]
        return layouts

    def run(self, ctx, layout):
        return [self._outcome(ctx, layout, [self._step(ctx, layout)])]

    def run_layouts(self, ctx, layouts, guard, say):
        world_size = layouts[0].world_size if layouts else 1
        if world_size == 1:
            if self.axolotl is not None and self.axolotl.owned_in():
                say("axolotl: the audit sets what the config sets for " + ", ".join(self.axolotl.owned_in()))
            if self.swift is not None and self.swift.owned_in():
                say("ms-swift: the audit sets what the file sets for " + ", ".join(self.swift.owned_in()))
            return super().run_layouts(ctx, self.with_full_batch(ctx, layouts), guard, say)
        if self.trainer_class is not None or self.axolotl is not None:
            what = ("--axolotl-config" if self.axolotl is not None else "--swift-args" if self.swift is not None
                    else f"--trainer-class {self.trainer_class.__name__}")
            reason = f"{what} runs in one process (--world-size 1)"
            return [guard.judge.failed(self.label, layout, reason) for layout in self.with_full_batch(ctx, layouts)]
        steps = [(layout, self.spec) for layout in self.with_full_batch(ctx, layouts)]
        say(f"trainer: {len(steps)} Trainer steps on {world_size} ranks ({self.data_parallel})")
        job = RankJob(PortableModel.of(ctx.model), ctx.batch, ctx.config, steps, self.user_args, self.data_parallel)
        per_rank, reason = guard.call(f"the Trainer step on {world_size} ranks", lambda: run_ranks(
            rank_trainer_steps, job, world_size, device_type=ctx.device.type, timeout_s=self.timeout_s))
        if reason is not None:
            return [guard.judge.failed(self.label, layout, reason) for layout, _ in steps]
        cases = []
        for i, (layout, _) in enumerate(steps):
            ranks = [results[i] for results in per_rank]
            failed = isinstance(ranks[0], str)
            cases.append(guard.judge.failed(self.label, layout, ranks[0]) if failed
                         else guard.judge.measure(self._outcome(ctx, layout, ranks)))
        return cases

    def _outcome(self, ctx, layout: Layout, ranks: list[StepResult]) -> Outcome:
        """The outcome of one step from what each rank returned (rank 0 first)."""
        step, counts = ranks[0], ctx.batch.group_targets(layout.groups)
        reference = ctx.reference.loss
        extra = {
            "logged_loss": step.logged_loss,
            "logged_loss_rel_err": abs(step.logged_loss - reference) / abs(reference) if reference else math.nan,
            "trainer_num_items": [n for rank in ranks for n in rank.num_items],  # rank-major, as counts
            "trainer_accepts_loss_kwargs": step.accepts_loss_kwargs,
        }
        if self.axolotl is not None:  # the config's settings the audit replaced, as "key (value -> audit's)"
            extra["axolotl_config_owned"] = self.axolotl.owned_in()
        if self.swift is not None:  # the same for --swift-args
            extra["swift_args_owned"] = self.swift.owned_in()
        if "deepspeed" in self.user_args:  # the gradient read before DeepSpeed's step (stacks/deepspeed.py)
            extra["deepspeed_zero_stage"] = stage_of(self.user_args["deepspeed"])
        if layout.world_size > 1:
            extra["rank_tokens"] = layout.per_rank(counts)
            extra["trainer_average_tokens_across_devices"] = step.average_tokens
            extra["data_parallel"] = self.data_parallel
        # num_items_in_batch counts tokens: no part of a pair objective (DPO divides by the pairs)
        note = "" if ctx.objective.pairwise else "; ".join(x for x in (step.note, _note(ranks, layout, counts)) if x)
        return Outcome(self.label, layout, step.logged_loss, step.update.items(), note=note, extra=extra)


def _note(ranks: list[StepResult], layout: Layout, counts: list[int]) -> str:
    """Facts about what the Trainer did that explain a divergence (empty when unremarkable)."""
    step, total = ranks[0], sum(counts)
    counted = {n for rank in ranks for n in rank.num_items if n is not None}
    if counted and counted != {total}:
        if layout.world_size > 1:
            return _per_rank_note(ranks, layout, counts)
        return f"the Trainer gave num_items_in_batch={sorted(counted)}, the step holds {total} target tokens"
    notes = [] if counted else _uncounted(step, layout)
    if not counted and layout.world_size > 1 and step.average_tokens and step.accepts_loss_kwargs is not False:
        n = layout.world_size
        notes.append(f"average_tokens_across_devices multiplies each rank's loss by {n} (the process count) "
                     f"although compute_loss got no num_items_in_batch to divide by: {n}x per rank")
    return "; ".join(notes)


def _uncounted(step: StepResult, layout: Layout) -> list[str]:
    """Why an accumulated step got no num_items_in_batch (nothing to say at k=1)."""
    if layout.microbatches == 1:
        return []
    if not release_has_ga_fix():
        return [f"transformers {transformers_version()} predates the Oct-2024 gradient-accumulation fix "
                f"({GA_FIX_RELEASE}): the Trainer passes no num_items_in_batch"]
    if step.accepts_loss_kwargs is False:
        return ["the Trainer passed no num_items_in_batch (model_accepts_loss_kwargs is False for this model)"]
    return ["the Trainer passed no num_items_in_batch"]


def _per_rank_note(ranks: list[StepResult], layout: Layout, counts: list[int]) -> str:
    """Why the ranks' num_items_in_batch differ from the step's count: tokens not gathered."""
    given = [sorted({n for n in rank.num_items if n is not None}) for rank in ranks]
    local = layout.per_rank(counts)
    said = ", ".join(f"rank {r}: {g[0] if len(g) == 1 else g}" for r, g in enumerate(given))
    if all(g == [n] for g, n in zip(given, local)):
        why = ("average_tokens_across_devices=False" if ranks[0].average_tokens is False else
               f"transformers {transformers_version()} gathers no token count over ranks")
        return (f"tokens not averaged across devices ({why}): each rank's num_items_in_batch is its own "
                f"target count ({said}; the step holds {sum(counts)}), so each rank normalises by its own "
                f"count and DDP averages the ranks: per-rank normalisation")
    return f"the Trainer gave num_items_in_batch {said}, the step holds {sum(counts)} target tokens"


PATHS.register(
    "trainer",
    PathSpec("trainer", TrainerPath.build, TASKS, "one real transformers.Trainer optimizer step (SGD, lr 1) per layout",
             requires=("accelerate",),  # transformers.Trainer imports it
             declares=lambda config, objective: bool(config.trainer_class)),
)
