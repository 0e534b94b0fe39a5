"""The ``model`` path: the model's own loss, ``forward(labels=..., num_items_in_batch=N)``
per microbatch, summed over the step, as a correct accumulation loop would use it.

A MoE model's loss includes coef * its router aux loss (``output_router_logits=True``); the
path records the aux each microbatch reported, so the case can tell its cross-entropy part
from its aux part (see aux.py)."""

from __future__ import annotations

from ..aux import layout_aux
from ..grads import GradAccumulator, compare_grads, grads_of
from ..tokens import TASKS
from .base import PATHS, LogitPath, Measurement, PathSpec


class ModelPath(LogitPath):
    name = "model"
    wants_labels = True

    def start(self, ctx, layout, step):
        self.ctx, self.layout, self.counts = ctx, layout, step.counts
        self.acc = GradAccumulator(ctx.params)
        self.loss = 0.0
        self.aux: float | None = None
        self.rejected = False

    def microbatch(self, index, mb, outputs, losses, num_items_rejected):
        loss, scale = outputs.loss, 1.0
        if num_items_rejected:  # the pre-4.46 recipe: the microbatch mean over k
            self.rejected = True
            scale = 1.0 / len(self.counts)
        self.acc.add(grads_of(loss * scale, self.ctx.params))
        self.loss += float(loss.detach()) * scale
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None and self.ctx.reference.aux is not None:
            self.aux = (self.aux or 0.0) + float(aux.detach()) * scale

    def finish(self):
        note = (
            "forward() does not accept num_items_in_batch, so the step used each microbatch's mean / k"
            if self.rejected
            else ""
        )
        target = layout_aux(self.ctx, self.layout)
        reference = target.target_grads(self.ctx.reference.grads) if target else self.ctx.reference.grads
        if target is not None and self.aux is None:
            self.aux = 0.0  # a MoE model whose loss carries no aux: say so rather than guess
        return [
            Measurement(
                path=self.name,
                reduction=None,
                layout=self.layout,
                loss=self.loss,
                grads=compare_grads(reference, self.acc.items()),
                counts=self.counts,
                note=note,
                aux=self.aux,
                aux_target=target,
            )
        ]


PATHS.register(
    "model",
    PathSpec("model", lambda config: ModelPath(), TASKS,
             "the model's own loss with num_items_in_batch",
             unavailable=lambda config: None if config.objective.plain else
             f"the model's own loss is plain cross entropy, not the {config.objective.describe()} under audit"),
)
