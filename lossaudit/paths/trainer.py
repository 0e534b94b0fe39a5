"""The ``trainer`` path: a real ``transformers.Trainer`` optimizer step per layout (per-device
batch B/k, ``gradient_accumulation_steps=k``), and once on the full batch (k=1).

The update the step applied is compared with the reference gradient, and the loss the Trainer
logs with the reference loss. With ``--loss-fn`` the step runs a second time with the user's
function as ``compute_loss_func`` (its cases carry the function's name as ``reduction``).
"""

from __future__ import annotations

import math
import os
import tempfile

from ..compat import GA_FIX_RELEASE, release_has_ga_fix, training_arguments, transformers_version
from ..config import parse_value
from ..errors import UsageError
from ..grads import compare_grads
from ..layouts import Layout
from ..reference import step_tokens
from ..tokens import TASKS
from .base import PATHS, Measurement, PathSpec, StepPath
from .loss_fn import resolve_loss_fn
from .trainer_step import StepResult, StepUnavailable, trainer_step


def _check_values(user_args: dict) -> None:
    """Values the installed TrainingArguments refuses are usage errors, found before any step."""
    if not user_args:
        return
    with tempfile.TemporaryDirectory(prefix="lossaudit-args-") as out:
        try:
            training_arguments({"output_dir": out, "use_cpu": True, "report_to": "none"}, user_args)
        except (ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--trainer-arg: TrainingArguments refused the values: {first}") from None


def full_batch_layout(batch_size: int, world_size: int = 1) -> Layout:
    return Layout(1, "contiguous", "right", (tuple(range(batch_size)),), world_size)


class TrainerPath(StepPath):
    name = "trainer"

    def __init__(self, config):
        self.user_args = {k: parse_value(v) for k, v in config.trainer_args}
        _check_values(self.user_args)
        self.loss_fns = [(None, None)]
        if config.loss_fn:
            self.loss_fns.append((config.loss_fn, resolve_loss_fn(config.loss_fn)))
        self.full_batch_done = False

    def run(self, ctx, layout):
        layouts = [layout]
        if not self.full_batch_done and layout.microbatches != 1:  # the GA-off arm, always
            layouts.insert(0, full_batch_layout(len(ctx.batch), layout.world_size))
        self.full_batch_done = True
        return [self._case(ctx, each, spec, fn) for each in layouts for spec, fn in self.loss_fns]

    def _case(self, ctx, layout, spec, fn) -> Measurement:
        counts = step_tokens(ctx.batch, layout).counts
        try:
            if layout.world_size != 1:
                raise StepUnavailable("the trainer path runs in one process; --world-size is not supported by it yet")
            step = trainer_step(ctx, layout, user_args=self.user_args, compute_loss_func=fn)
        except StepUnavailable as exc:
            return Measurement(self.name, spec, layout, math.nan, None, counts, error=str(exc))
        except Exception as exc:  # the library's or the user's code failed: one case, not the run
            if os.environ.get("LOSSAUDIT_DEBUG") == "1":
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return Measurement(self.name, spec, layout, math.nan, None, counts,
                               error=f"the Trainer step failed: {type(exc).__name__}: {first}")
        reference = ctx.reference.loss
        return Measurement(
            self.name, spec, layout, step.logged_loss,
            compare_grads(ctx.reference.grads, step.update.items()), counts,
            note=_note(step, layout, sum(counts)),
            extra={
                "logged_loss": step.logged_loss,
                "logged_loss_rel_err": abs(step.logged_loss - reference) / abs(reference) if reference else math.nan,
                "trainer_num_items": step.num_items,
                "trainer_accepts_loss_kwargs": step.accepts_loss_kwargs,
            },
        )


def _note(step: StepResult, layout: Layout, total: int) -> str:
    """Facts about what the Trainer did that explain a divergence (empty when unremarkable)."""
    counted = {n for n in step.num_items if n is not None}
    if counted and counted != {total}:
        return f"the Trainer gave num_items_in_batch={sorted(counted)}, the step holds {total} target tokens"
    if layout.microbatches == 1 or counted:
        return ""
    if not release_has_ga_fix():
        return (f"transformers {transformers_version()} predates the Oct-2024 gradient-accumulation fix "
                f"({GA_FIX_RELEASE}): the Trainer passes no num_items_in_batch")
    if step.accepts_loss_kwargs is False:
        return "the Trainer passed no num_items_in_batch (model_accepts_loss_kwargs is False for this model)"
    return "the Trainer passed no num_items_in_batch"


PATHS.register(
    "trainer",
    PathSpec("trainer", TrainerPath, TASKS, "one real transformers.Trainer optimizer step (SGD, lr 1) per layout"),
)
