"""The ``step`` path: the user's own training step, ``--step MODULE:FUNCTION``.
``FUNCTION(model, microbatches)`` runs forward and backward over the layout's microbatches (dicts
of model inputs with ``labels``; under a pair objective each microbatch's chosen rows first, then
its rejected ones, with ``ref_logps``) and returns the step's loss; the gradient it leaves in
``.grad`` is read (``stacks/step.py``)."""

from __future__ import annotations

import math

import torch

from ..audit.distributed import DEFAULT_TIMEOUT_S, PortableModel, run_ranks
from ..core.backwards import Backwards
from ..core.layouts import Layout, microbatches
from ..core.pairs import reference_logps
from ..core.registry import load_callable
from ..stacks import StackStep
from ..stacks.ranks import StepJob, combine, run_rank
from ..stacks.step import run_step_function
from ..core.tokens import TASKS
from .base import PATHS, Label, Outcome, PathSpec, StepPath, Unavailable
from .lightning import spec_name


def resolve_step(spec):
    return spec if callable(spec) else load_callable(spec, "step function")


class StepFunctionPath(StepPath):
    name = "step"
    changes_model = True  # a real loop's step may update, cast or freeze the model
    cuts_backwards = True  # it knows its microbatches' inputs: a step that visits them out of order is followed

    def __init__(self, spec, data_parallel: str = "ddp", *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.spec = spec
        self.fn = resolve_step(spec)
        self.data_parallel = data_parallel
        self.timeout_s = timeout_s
        self.label = Label("step", spec_name(spec))

    @classmethod
    def build(cls, config) -> list["StepFunctionPath"]:
        return [cls(config.step, config.data_parallel)]

    def run(self, ctx, layout: Layout) -> list[Outcome]:
        if layout.world_size > 1:
            raise Unavailable("a step on several ranks runs through run_layouts")
        reference = [ctx.reference.grads[n] for n, _ in ctx.params]
        watched: list[Backwards] = []

        def watch(dicts):  # each backward of the step, cut per microbatch
            watched.append(Backwards(ctx.model, ctx.params, reference, [d["input_ids"] for d in dicts]))
            return watched[0]

        step = run_step_function(ctx.model, microbatches(ctx.batch, layout), self.fn, ctx.device,
                                 pair_extras(ctx, layout) if ctx.objective.pairwise else None, watch=watch)
        projections, unresolved = watched[0].resolve(layout.microbatches, [g for _, g in step.gradient])
        return [self._outcome(layout, step, projections, unresolved)]

    def run_layouts(self, ctx, layouts, guard, say):
        """On --world-size N: every layout in one spawn of N ranks (stacks/ranks.py); a step on
        ranks is judged on its whole gradient, not per microbatch."""
        world_size = layouts[0].world_size if layouts else 1
        if world_size == 1:
            return super().run_layouts(ctx, layouts, guard, say)
        say(f"step: {len(layouts)} layouts on {world_size} ranks ({self.data_parallel})")
        job = StepJob(PortableModel.of(ctx.model), ctx.batch, layouts, self.spec, self.data_parallel)
        per_rank, reason = guard.call(f"the step path on {world_size} ranks", lambda: run_ranks(
            run_rank, job, world_size, device_type=ctx.device.type, timeout_s=self.timeout_s))
        if reason is not None:
            return [guard.judge.failed(self.label, layout, reason) for layout in layouts]
        unresolved = (f"per-microbatch weights not resolved: the step ran on {world_size} ranks (lossaudit's backward "
                      "hooks run in one process); judged on its whole step")
        return [guard.judge.measure(self._outcome(layout, combine([steps[i] for steps in per_rank], self.data_parallel),
                                                  unresolved=unresolved))
                for i, layout in enumerate(layouts)]

    def _outcome(self, layout: Layout, step: StackStep, projections=None, unresolved: str | None = None) -> Outcome:
        notes = list(step.notes)
        if math.isnan(step.loss):
            notes.append(f"{self.label.reduction} returned no loss: loss not compared, judged on its gradient alone")
        if unresolved:
            notes.append(unresolved)
        return Outcome(self.label, layout, step.loss, step.gradient, note="; ".join(notes), extra=step.extra,
                       loss_compared=not math.isnan(step.loss), projections=projections)


def pair_extras(ctx, layout: Layout) -> list[dict]:
    """A pairwise step's microbatches (chosen rows, then rejected) also carry ``ref_logps`` (B_m,):
    the frozen reference model's completion log-probabilities, constants, float32 (float64 for a
    float64 model): a 16-bit sum of a completion's log-probabilities would round the constant."""
    dtype = torch.promote_types(next(ctx.model.parameters()).dtype, torch.float32)
    return [{"ref_logps": reference_logps(ctx.reference.sequence_losses, group).to(ctx.device, dtype)}
            for group in layout.groups]


PATHS.register(
    "step",
    PathSpec("step", StepFunctionPath.build, TASKS, "your training step: --step MODULE:FUNCTION(model, microbatches)",
             unavailable=lambda config: None if config.step else "needs --step MODULE:FUNCTION",
             declares=lambda config, objective: True),
)
