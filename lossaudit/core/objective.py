"""The objective every path and the reference compute: a per-token loss and a declared
aggregation over the optimizer window (``core/aggregation.py``).

The per-token loss is cross entropy, with label smoothing when the user trains with it
(``--trainer-arg label_smoothing_factor=0.1``): then the reference and the harness's own
reductions smooth too, so a path is judged on its reduction only, never on the objective.

The aggregation is the token mean unless a step declares another (``--objective``,
``lossaudit.check(objective=...)``) or a trainer class declares its own: ``stacks/trl.DECLARED``
maps a class name (anywhere in the MRO) to ``fn(trainer_args) -> Aggregation`` (DPO's pair mean,
``stacks/dpo.py``), and ``audit/harness.declared_objective`` puts it in the run's context
(``ctx.objective``, what the reference, the judge and the causes read). The interface other
modules use:

- ``Objective.token_losses(logits, labels, task)``: float64 per-target losses, (B, T');
- ``Objective.window_loss(losses, mask, pairs=())``: the declared scalar of a whole window (the
  reference: ``core/reference.py``);
- ``Objective.window_weights(step)``: per-microbatch token weights of a token aggregation over a
  window cut into microbatches (the harness's own correct reduction of the declared objective);
- ``Objective.token_mean``, ``Objective.describe()``, ``Objective.fields()`` (the report's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .aggregation import Aggregation, PairMean, SequenceMean, SumOver, TokenMean
from .reductions import Reduction, StepTokens, Weight, num_items, sequence_mean
from .tokens import token_losses

LABEL_SMOOTHING_ARG = "label_smoothing_factor"  # the TrainingArguments field


@dataclass(frozen=True, slots=True)
class Objective:
    label_smoothing: float = 0.0
    aggregation: Aggregation = field(default_factory=TokenMean)

    @classmethod
    def from_trainer_args(cls, trainer_args: tuple[tuple[str, str], ...],
                          aggregation: Aggregation | None = None) -> "Objective":
        values = dict(trainer_args)
        return cls(float(values.get(LABEL_SMOOTHING_ARG, 0.0)), aggregation or TokenMean())

    @property
    def plain(self) -> bool:
        return self.label_smoothing == 0.0

    @property
    def token_mean(self) -> bool:
        """The default aggregation: every number of a token-mean run is what it always was."""
        return isinstance(self.aggregation, TokenMean)

    @property
    def pairwise(self) -> bool:
        return self.aggregation.pairwise

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
        """Per-target losses in float64, (B, T'), 0 where no target (see tokens.token_losses)."""
        return token_losses(logits, labels, task, label_smoothing=self.label_smoothing)

    def window_weights(self, step: StepTokens) -> list[Weight]:
        """A token aggregation's weight per microbatch of a window (reductions.py's convention)."""
        a = self.aggregation
        if isinstance(a, TokenMean):
            return num_items(step)
        if isinstance(a, SequenceMean):
            return sequence_mean(step)
        if isinstance(a, SumOver):
            return [1.0 / a.n] * step.k
        raise TypeError(f"{a.spec} is not a token aggregation")

    def reduction(self) -> Reduction:
        """The declared token aggregation as a reduction (the harness's own correct one)."""
        return Reduction(self.aggregation.spec, self.window_weights, expected=False, doc=self.aggregation.describe())

    def window_loss(self, losses: torch.Tensor, mask: torch.Tensor, pairs: tuple = (),
                    reference_logps: torch.Tensor | None = None) -> torch.Tensor:
        """The declared scalar of one whole window from its per-target ``losses`` (B, T') (0 off
        target) and target ``mask``. A pairwise one takes ``pairs`` ((chosen row, rejected row)
        per pair) and the frozen reference model's log-probabilities per row (default: these
        losses' own, detached: the reference model is the initial weights)."""
        if self.pairwise:
            logps = -losses.sum(dim=1)  # (B,): each row's completion log-probability
            ref = logps.detach() if reference_logps is None else reference_logps.to(logps)
            return pair_losses(logps, ref, pairs, self.aggregation.beta).mean()
        if self.token_mean:  # as it always was computed, to the last bit
            return losses.sum() / int(mask.sum())
        (weight,) = self.window_weights(StepTokens((mask,)))
        if isinstance(weight, torch.Tensor):
            return (weight.to(losses) * losses).sum()
        return losses.sum() * weight

    def describe(self) -> str:
        """The per-token loss (unchanged text for the token mean: reports compare it)."""
        loss = "token cross entropy" if self.plain else \
            f"token cross entropy with label smoothing {self.label_smoothing:g}"
        if self.pairwise:
            return "sequence log-probabilities of chosen and rejected completions (sums of token log-probabilities)"
        return loss

    def fields(self) -> dict:
        """The report's: what is computed per token and how it is aggregated."""
        return {"objective": self.describe(), "aggregation": self.aggregation.spec,
                "aggregation_doc": self.aggregation.describe()}


def pair_losses(logps: torch.Tensor, ref_logps: torch.Tensor, pairs, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss per pair: ``-log sigmoid(beta (chosen log-ratio - rejected log-ratio))``
    (P,), from per-row log-probabilities of the policy and of the frozen reference."""
    chosen = torch.tensor([c for c, _ in pairs], device=logps.device)
    rejected = torch.tensor([r for _, r in pairs], device=logps.device)
    ratios = logps - ref_logps
    return -F.logsigmoid(beta * (ratios[chosen] - ratios[rejected]))


def objective_problems(trainer_args: tuple[tuple[str, str], ...]) -> list[str]:
    value = dict(trainer_args).get(LABEL_SMOOTHING_ARG)
    if value is None:
        return []
    try:
        ok = 0.0 <= float(value) < 1.0
    except ValueError:
        ok = False
    return [] if ok else [f"--trainer-arg {LABEL_SMOOTHING_ARG}={value}: expected a number in [0, 1)"]


__all__ = ["Aggregation", "Objective", "PairMean", "SequenceMean", "SumOver", "TokenMean", "pair_losses"]
