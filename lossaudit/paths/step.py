"""The ``step`` path: the user's own training step, ``--step MODULE:FUNCTION``.
``FUNCTION(model, microbatches)`` runs forward and backward over the layout's microbatches (dicts
of model inputs with ``labels``; under a pair objective each microbatch's chosen rows first, then
its rejected ones, with ``ref_logps``) and returns the step's loss; the gradient it leaves in
``.grad`` is read (``stacks/step.py``)."""

from __future__ import annotations

import math

import torch

from ..core.layouts import Layout, microbatches
from ..core.pairs import reference_logps
from ..core.registry import load_callable
from ..stacks.step import run_step_function
from ..core.tokens import TASKS
from .base import PATHS, Label, Outcome, PathSpec, StepPath, Unavailable
from .lightning import spec_name


def resolve_step(spec):
    return spec if callable(spec) else load_callable(spec, "step function")


class StepFunctionPath(StepPath):
    name = "step"
    changes_model = True  # a real loop's step may update, cast or freeze the model

    def __init__(self, spec):
        self.fn = resolve_step(spec)
        self.label = Label("step", spec_name(spec))

    @classmethod
    def build(cls, config) -> list["StepFunctionPath"]:
        return [cls(config.step)]

    def run(self, ctx, layout: Layout) -> list[Outcome]:
        if layout.world_size > 1:
            raise Unavailable("the step path runs in one process (--world-size 1)")
        step = run_step_function(ctx.model, microbatches(ctx.batch, layout), self.fn, ctx.device,
                                 pair_extras(ctx, layout) if ctx.objective.pairwise else None)
        if math.isnan(step.loss):
            raise Unavailable(f"{self.label.reduction} returned no loss: return the step's loss "
                              "(the sum of what it backwarded) so that it can be compared")
        return [Outcome(self.label, layout, step.loss, step.gradient, note="; ".join(step.notes))]


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
