"""The ``reduction`` path: lossaudit's own reductions over the model's logits, one path object
per reduction. A reduction that weighs a microbatch's tokens uniformly contributes a multiple
of the microbatch's token sum, so the harness backs it once for all of them; others contribute
their own weighted sum."""

from __future__ import annotations

import dataclasses
import numbers

import torch

from ..core.objective import Objective
from ..core.reductions import Reduction, mean_of_means, num_items, resolve_reduction, token_sum
from ..core.reference import weighted_sum
from ..core.tokens import TASKS
from .base import PATHS, Contribution, Label, LogitPath, PathSpec


class ReductionPath(LogitPath):
    def __init__(self, reduction: Reduction, *, calibrates: bool = False):
        self.reduction = reduction
        self.label = Label("reduction", reduction.name, expected=reduction.expected, calibrates=calibrates,
                           formula=reduction, cause=reduction.doc if reduction.expected else "")
        self.constant_weights = reduction.weights in (num_items, token_sum)
        self.own_backward = reduction.weights not in (num_items, token_sum, mean_of_means)

    @classmethod
    def of(cls, reduction: Reduction, objective: Objective = Objective()) -> "ReductionPath":
        """The path for ``reduction``; the built-in num_items is the run's correct reduction of the
        token mean. Under another declared objective every reduction is shown, never a finding
        (the harness's own reduction of the declared objective calibrates: harness.calibration)."""
        if not objective.token_mean:
            return cls(dataclasses.replace(reduction, expected=True))
        return cls(reduction, calibrates=reduction.name == "num_items" and not reduction.expected and ":" not in reduction.name)

    def start(self, ctx, layout, step):
        self.weights = weights_of(self.reduction, step)  # the user's weight function runs here, guarded

    def uniform_weights(self):
        return None if any(hasattr(w, "shape") for w in self.weights) else [float(w) for w in self.weights]

    def microbatch(self, view):
        weight = self.weights[view.index]
        if hasattr(weight, "shape"):
            return Contribution(weighted_sum(weight, view.losses))
        return Contribution(view.token_sum, float(weight))


def weights_of(reduction: Reduction, step) -> list:
    """``reduction``'s weights for ``step``: one per microbatch, each a number or a tensor; what
    else a user's function returns is its failure (a TypeError: the layout's error case)."""
    weights = reduction.weights(step)
    try:
        weights = list(weights)
    except TypeError:
        raise TypeError(f"returned {type(weights).__name__}, not one weight per microbatch") from None
    if len(weights) != step.k:
        raise TypeError(f"returned {len(weights)} weights for {step.k} microbatches")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (numbers.Real, torch.Tensor)):
            raise TypeError(f"returned a weight of type {type(w).__name__} ({w!r:.40}): a weight is a number "
                            "or a tensor of per-token weights")
    return weights


PATHS.register(
    "reduction",
    PathSpec("reduction", lambda config: [ReductionPath.of(resolve_reduction(n), config.objective)
                                          for n in config.reductions], TASKS,
             "lossaudit's own reductions of the model's logits",
             declares=lambda config, objective: not objective.pairwise),
)
