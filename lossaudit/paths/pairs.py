"""lossaudit's own pair mean (issue 22): the correct computation of a declared pair objective
(DPO's sigmoid loss, ``core/objective.py``) over a window cut into microbatches of whole pairs,
from the harness's shared forward of each microbatch. It calibrates a pairwise run's noise floor
as the token-mean reduction does a token run's (``audit/harness.calibration``)."""

from __future__ import annotations

from ..core.objective import Objective, pair_losses
from ..core.pairs import microbatch_pairs, reference_logps
from .base import Contribution, Label, LogitPath


class PairMeanPath(LogitPath):
    """Each microbatch's pair losses, summed, over the window's pair count; the reference model's
    log-probabilities are the float64 reference's own (the initial weights), constants."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.label = Label("reduction", objective.aggregation.spec, calibrates=True)

    def start(self, ctx, layout, step):
        self.ctx, self.layout = ctx, layout

    def microbatch(self, view):
        rows = self.layout.groups[view.index]
        logps = -view.losses.sum(dim=1)  # (B_m,): each row's completion log-probability
        ref = reference_logps(self.ctx.reference.sequence_losses, rows).to(logps.device)
        losses = pair_losses(logps, ref, microbatch_pairs(len(rows)), self.objective.aggregation.beta)
        return Contribution(losses.sum() / len(self.ctx.batch.pairs))
