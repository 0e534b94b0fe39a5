"""The ``reduction`` path: lossaudit's own reductions over the model's logits.

Reductions that weigh a microbatch's tokens uniformly share one backward of the
microbatch's token sum and differ only by a scale; others go back from the same logits.
"""

from __future__ import annotations

from ..grads import GradAccumulator, compare_grads, grads_of
from ..reductions import Reduction, resolve_reduction
from ..reference import weighted_sum
from ..tokens import TASKS
from .base import PATHS, LogitPath, Measurement, PathSpec


class ReductionPath(LogitPath):
    name = "reduction"

    def __init__(self, reductions: list[Reduction]):
        self.reductions = reductions

    def start(self, ctx, layout, step):
        self.ctx, self.layout, self.counts = ctx, layout, step.counts
        self.weights = {r.name: r.weights(step) for r in self.reductions}
        self.acc = {r.name: GradAccumulator(ctx.params) for r in self.reductions}
        self.loss = {r.name: 0.0 for r in self.reductions}

    def microbatch(self, index, mb, outputs, losses, num_items_rejected):
        weights = {name: w[index] for name, w in self.weights.items()}
        uniform = [name for name, w in weights.items() if not hasattr(w, "shape")]
        if uniform:
            token_sum = losses.sum()
            grads = grads_of(token_sum, self.ctx.params)
            for name in uniform:
                self.acc[name].add(grads, weights[name])
                self.loss[name] += float(token_sum.detach()) * weights[name]
        for name in weights.keys() - set(uniform):
            weighted = weighted_sum(weights[name], losses)
            self.acc[name].add(grads_of(weighted, self.ctx.params))
            self.loss[name] += float(weighted.detach())

    def finish(self):
        reference = self.ctx.reference.grads
        return [
            Measurement(
                path=self.name,
                reduction=r.name,
                layout=self.layout,
                loss=self.loss[r.name],
                grads=compare_grads(reference, self.acc[r.name].items()),
                counts=self.counts,
                expected=r.expected,
            )
            for r in self.reductions
        ]


PATHS.register(
    "reduction",
    PathSpec(
        "reduction",
        lambda config: ReductionPath([resolve_reduction(n) for n in config.reductions]),
        TASKS,
        "lossaudit's own reductions of the model's logits",
    ),
)
