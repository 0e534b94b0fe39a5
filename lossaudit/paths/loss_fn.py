"""The ``loss-fn`` path: a user's loss function with the Trainer's ``compute_loss_func``
signature, ``fn(outputs, labels, num_items_in_batch=None)``, on the shared forward of each
microbatch. As the Trainer does, it is given the model outputs, the unshifted labels and the
step's target-token count, and the step's gradient is the sum over microbatches: a correct
function divides its token sum by ``num_items_in_batch``."""

from __future__ import annotations

from typing import Callable

import torch

from ..core.registry import load_callable
from ..core.tokens import TASKS
from .base import PATHS, Contribution, Label, LogitPath, PathSpec

LossFn = Callable[..., torch.Tensor]


def resolve_loss_fn(spec: str) -> LossFn:
    return load_callable(spec, "loss function")


class LossFnPath(LogitPath):
    def __init__(self, spec: str):
        self.spec = spec
        self.fn = resolve_loss_fn(spec)
        self.label = Label("loss-fn", spec)

    def start(self, ctx, layout, step):
        # a tensor on the model's device, as the Trainer passes it
        self.num_items = torch.tensor(step.total, device=ctx.device)
        self.device = ctx.device

    def microbatch(self, view):
        loss = self.fn(view.outputs, view.mb.labels.to(self.device), num_items_in_batch=self.num_items)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"{self.spec} returned {type(loss).__name__}, not a scalar tensor")
        return Contribution(loss)


PATHS.register(
    "loss-fn",
    PathSpec(
        "loss-fn",
        lambda config: [LossFnPath(config.loss_fn)],
        TASKS,
        "a user's compute_loss_func(outputs, labels, num_items_in_batch) on the shared forward",
        unavailable=lambda config: None if config.loss_fn else "needs --loss-fn module:function",
    ),
)
