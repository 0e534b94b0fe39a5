"""Reductions: how one step's per-token losses become one scalar.

A reduction gives each microbatch a weight: a float when every target token of that
microbatch weighs the same (then its gradient is that float times the gradient of the
microbatch's token sum, so one backward serves all such reductions), or a tensor of
per-token weights shaped like the microbatch's target mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .registry import Registry, load_callable

Weight = Union[float, torch.Tensor]


@dataclass(frozen=True)
class StepTokens:
    """The target tokens of one optimizer step, microbatch by microbatch."""

    masks: tuple[torch.Tensor, ...]  # bool (B_m, T'_m) per microbatch

    @property
    def counts(self) -> list[int]:
        return [int(m.sum()) for m in self.masks]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def k(self) -> int:
        return len(self.masks)


WeightFn = Callable[[StepTokens], Sequence[Weight]]


@dataclass(frozen=True)
class Reduction:
    name: str
    weights: WeightFn
    expected: bool  # known to differ from the token mean: shown, never a finding
    doc: str = ""


REDUCTIONS: Registry[Reduction] = Registry("reduction")


def register_reduction(name: str, weights: WeightFn, *, expected: bool = False, doc: str = "") -> Reduction:
    """Add a reduction. ``weights(step)`` returns one weight per microbatch (see module doc)."""
    return REDUCTIONS.register(name, Reduction(name, weights, expected, doc))


def _safe_inverse(n: float) -> float:
    # 1/0 -> inf, so an empty microbatch's 0 * inf gives NaN, as torch's mean of nothing does
    return 1.0 / n if n else float("inf")


def mean_of_means(step: StepTokens) -> list[Weight]:
    return [_safe_inverse(step.k * n) for n in step.counts]


def num_items(step: StepTokens) -> list[Weight]:
    return [_safe_inverse(step.total)] * step.k


def token_sum(step: StepTokens) -> list[Weight]:
    return [1.0] * step.k


def sequence_mean(step: StepTokens) -> list[Weight]:
    """Each sequence's token mean, averaged over the step's sequences that have targets."""
    per_seq = [m.sum(dim=1, keepdim=True) for m in step.masks]
    sequences = sum(int((n > 0).sum()) for n in per_seq)
    # float64: a bool mask over a long count would give float32 weights, 3e-8 off
    return [m.to(torch.float64) / (n.clamp(min=1) * max(sequences, 1)) for m, n in zip(step.masks, per_seq)]


register_reduction("mean_of_means", mean_of_means, expected=True, doc="each microbatch's token mean, divided by k")
register_reduction("num_items", num_items, doc="each microbatch's token sum over the step's target-token count")
register_reduction("sequence_mean", sequence_mean, expected=True, doc="mean over sequences of each sequence's token mean")
register_reduction("sum", token_sum, expected=True, doc="the plain token sum")

DEFAULT_REDUCTIONS = ("mean_of_means", "num_items", "sequence_mean", "sum")


def resolve_reduction(name: str) -> Reduction:
    """A registered name, or ``module:function`` naming a user's weight function."""
    if name in REDUCTIONS or ":" not in name:
        return REDUCTIONS.get(name)
    fn = load_callable(name, "reduction")
    return Reduction(name, fn, expected=False, doc=fn.__doc__ or "")
