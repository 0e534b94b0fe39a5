"""The objective every path and the reference compute per target token.

Plain cross entropy unless the user trains with label smoothing
(``--trainer-arg label_smoothing_factor=0.1``): then the reference and the harness's own
reductions smooth too, so a path is judged on its reduction only, never on the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens import token_losses

LABEL_SMOOTHING_ARG = "label_smoothing_factor"  # the TrainingArguments field


@dataclass(frozen=True, slots=True)
class Objective:
    label_smoothing: float = 0.0

    @classmethod
    def from_trainer_args(cls, trainer_args: tuple[tuple[str, str], ...]) -> "Objective":
        values = dict(trainer_args)
        return cls(float(values.get(LABEL_SMOOTHING_ARG, 0.0)))

    @property
    def plain(self) -> bool:
        return self.label_smoothing == 0.0

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
        """Per-target losses in float64, (B, T'), 0 where no target (see tokens.token_losses)."""
        return token_losses(logits, labels, task, label_smoothing=self.label_smoothing)

    def describe(self) -> str:
        if self.plain:
            return "token cross entropy"
        return f"token cross entropy with label smoothing {self.label_smoothing:g}"


def objective_problems(trainer_args: tuple[tuple[str, str], ...]) -> list[str]:
    value = dict(trainer_args).get(LABEL_SMOOTHING_ARG)
    if value is None:
        return []
    try:
        ok = 0.0 <= float(value) < 1.0
    except ValueError:
        ok = False
    return [] if ok else [f"--trainer-arg {LABEL_SMOOTHING_ARG}={value}: expected a number in [0, 1)"]
