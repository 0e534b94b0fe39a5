"""The ``model`` path: the model's own loss, ``forward(labels=..., num_items_in_batch=N)``
per microbatch, summed over the step, as a correct accumulation loop would use it."""

from __future__ import annotations

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
        self.rejected = False

    def microbatch(self, index, mb, outputs, losses, num_items_rejected):
        loss = outputs.loss
        if num_items_rejected:  # the pre-4.46 recipe: the microbatch mean over k
            self.rejected = True
            loss = loss / len(self.counts)
        self.acc.add(grads_of(loss, self.ctx.params))
        self.loss += float(loss.detach())

    def finish(self):
        note = (
            "forward() does not accept num_items_in_batch, so the step used each microbatch's mean / k"
            if self.rejected
            else ""
        )
        return [
            Measurement(
                path=self.name,
                reduction=None,
                layout=self.layout,
                loss=self.loss,
                grads=compare_grads(self.ctx.reference.grads, self.acc.items()),
                counts=self.counts,
                note=note,
            )
        ]


PATHS.register(
    "model",
    PathSpec("model", lambda config: ModelPath(), TASKS,
             "the model's own loss with num_items_in_batch"),
)
