"""The ``model`` path: the model's own loss, ``forward(labels=..., num_items_in_batch=N)``
per microbatch, summed over the step, as a correct accumulation loop would use it.

A MoE model's loss includes coef * its router aux loss (``output_router_logits=True``); the
path records the aux each microbatch reported, so the judge can tell its cross-entropy part
from its aux part (moe.py)."""

from __future__ import annotations

from ..core.tokens import TASKS
from .base import PATHS, Contribution, Label, LogitPath, PathSpec

REJECTED = "forward() does not accept num_items_in_batch, so the step used each microbatch's mean / k"


class ModelPath(LogitPath):
    label = Label("model", trains_aux=True)
    wants_labels = True

    def start(self, ctx, layout, step):
        self.rejected = False
        self.with_aux = ctx.reference is not None and ctx.reference.aux is not None

    def microbatch(self, view):
        scale = 1.0
        if view.num_items_rejected:  # the pre-4.46 recipe: the microbatch mean over k
            self.rejected = True
            scale = 1.0 / view.step.k
        aux = getattr(view.outputs, "aux_loss", None)
        carried = float(aux.detach()) * scale if aux is not None and self.with_aux else (0.0 if self.with_aux else None)
        return Contribution(view.outputs.loss, scale, carried)

    def note(self):
        return REJECTED if self.rejected else ""


PATHS.register(
    "model",
    PathSpec("model", lambda config: [ModelPath()], TASKS,
             "the model's own loss with num_items_in_batch",
             unavailable=lambda config: None if config.objective.plain else
             f"the model's own loss is plain cross entropy, not the {config.objective.describe()} under audit"),
)
