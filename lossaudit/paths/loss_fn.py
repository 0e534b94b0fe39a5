"""The ``loss-fn`` path: a user's loss function with the Trainer's ``compute_loss_func``
signature, ``fn(outputs, labels, num_items_in_batch=None)``, on the shared forward of each
microbatch. As the Trainer does, it is given the model outputs, the unshifted labels and the
step's target-token count, and the step's gradient is the sum over microbatches: a correct
function divides its token sum by ``num_items_in_batch``."""

from __future__ import annotations

from typing import Callable

import torch

from ..grads import GradAccumulator, compare_grads, grads_of
from ..registry import load_callable
from ..tokens import TASKS
from .base import PATHS, LogitPath, Measurement, PathSpec

LossFn = Callable[..., torch.Tensor]


def resolve_loss_fn(spec: str) -> LossFn:
    return load_callable(spec, "loss function")


class LossFnPath(LogitPath):
    name = "loss-fn"

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = resolve_loss_fn(spec)

    def start(self, ctx, layout, step):
        self.ctx, self.layout, self.counts = ctx, layout, step.counts
        # a tensor on the model's device, as the Trainer passes it
        self.num_items = torch.tensor(step.total, device=ctx.device)
        self.acc = GradAccumulator(ctx.params)
        self.loss = 0.0
        self.error: str | None = None

    def microbatch(self, index, mb, outputs, losses, num_items_rejected):
        if self.error:
            return
        try:
            loss = self.fn(outputs, mb.labels.to(self.ctx.device), num_items_in_batch=self.num_items)
        except Exception as exc:  # the user's code: one case fails, not the run
            self.error = f"{self.spec} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            self.error = f"{self.spec} returned {type(loss).__name__}, not a scalar tensor"
            return
        self.acc.add(grads_of(loss, self.ctx.params))
        self.loss += float(loss.detach())

    def finish(self):
        return [
            Measurement(
                path=self.name,
                reduction=self.spec,
                layout=self.layout,
                loss=float("nan") if self.error else self.loss,
                grads=None if self.error else compare_grads(self.ctx.reference.grads, self.acc.items()),
                counts=self.counts,
                error=self.error,
            )
        ]


PATHS.register(
    "loss-fn",
    PathSpec(
        "loss-fn",
        lambda config: LossFnPath(config.loss_fn),
        TASKS,
        "a user's compute_loss_func(outputs, labels, num_items_in_batch) on the shared forward",
        unavailable=lambda config: None if config.loss_fn else "needs --loss-fn module:function",
    ),
)
