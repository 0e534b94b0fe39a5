"""The ``step`` path: the user's own training step, ``--step MODULE:FUNCTION``.
``FUNCTION(model, microbatches)`` runs forward and backward over the layout's microbatches (dicts
of model inputs with ``labels``) and returns the step's loss; the gradient it leaves in
``.grad`` is read (``stacks/step.py``)."""

from __future__ import annotations

import math

from ..core.backwards import Backwards
from ..core.layouts import Layout, microbatches
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
    cuts_backwards = True  # it knows its microbatches' inputs: a step that visits them out of order is followed

    def __init__(self, spec):
        self.fn = resolve_step(spec)
        self.label = Label("step", spec_name(spec))

    @classmethod
    def build(cls, config) -> list["StepFunctionPath"]:
        return [cls(config.step)]

    def run(self, ctx, layout: Layout) -> list[Outcome]:
        if layout.world_size > 1:
            raise Unavailable("the step path runs in one process (--world-size 1)")
        reference = [ctx.reference.grads[n] for n, _ in ctx.params]
        watched: list[Backwards] = []

        def watch(dicts):  # each backward of the step, cut per microbatch
            watched.append(Backwards(ctx.model, ctx.params, reference, [d["input_ids"] for d in dicts]))
            return watched[0]

        step = run_step_function(ctx.model, microbatches(ctx.batch, layout), self.fn, ctx.device, watch=watch)
        if math.isnan(step.loss):
            raise Unavailable(f"{self.label.reduction} returned no loss: return the step's loss "
                              "(the sum of what it backwarded) so that it can be compared")
        projections, unresolved = watched[0].resolve(layout.microbatches, [g for _, g in step.gradient])
        return [Outcome(self.label, layout, step.loss, step.gradient, note="; ".join(x for x in step.notes + [unresolved] if x),
                        projections=projections)]


PATHS.register(
    "step",
    PathSpec("step", StepFunctionPath.build, TASKS, "your training step: --step MODULE:FUNCTION(model, microbatches)",
             unavailable=lambda config: None if config.step else "needs --step MODULE:FUNCTION"),
)
