"""How an objective turns per-token (or per-pair) losses into the one scalar of an optimizer step:
its declared aggregation over the optimizer window (every microbatch of the step, on every rank).

- ``TokenMean()``: the token sum over the window's target-token count (the default; what
  ``num_items_in_batch`` exists for);
- ``SequenceMean()``: each sequence's token mean, averaged over the window's sequences that have a
  target (GRPO's ``loss_type="grpo"``, verl's ``seq-mean-token-mean``);
- ``SumOver(n)``: the token sum over a constant ``n`` (Dr. GRPO's sequences x max completion
  length, verl's ``seq-mean-token-sum-norm``): ``n`` is given, or read from a trainer's config;
- ``PairMean(beta)``: the mean over preference pairs of DPO's sigmoid loss
  ``-log sigmoid(beta ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))``, each log-probability
  the sum over a completion's tokens, the reference model's a constant (a frozen copy of the initial
  weights).

``parse_aggregation("sum-over:192")`` reads the ``--objective`` text; ``spec`` writes it back. The math
lives in ``core/objective.py``; this module imports nothing heavy (the option table reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

DPO_BETA = 0.1  # TRL's DPOConfig default


@dataclass(frozen=True, slots=True)
class Aggregation:
    """Base of the declared aggregations (module doc)."""

    pairwise = False  # its losses are per pair of sequences (chosen, rejected), not per token

    @property
    def spec(self) -> str:
        """The ``--objective`` text that declares it."""
        raise NotImplementedError

    def describe(self) -> str:
        """One phrase for reports and causes."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class TokenMean(Aggregation):
    @property
    def spec(self) -> str:
        return "token-mean"

    def describe(self) -> str:
        return "the token mean over the optimizer window"


@dataclass(frozen=True, slots=True)
class SequenceMean(Aggregation):
    @property
    def spec(self) -> str:
        return "sequence-mean"

    def describe(self) -> str:
        return "a mean of per-sequence token means"


@dataclass(frozen=True, slots=True)
class SumOver(Aggregation):
    n: float

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, (int, float)) or not 0 < self.n < float("inf"):
            raise ValueError(f"sum-over needs a positive constant, got {self.n!r}")

    @property
    def spec(self) -> str:
        return f"sum-over:{self.n:g}"

    def describe(self) -> str:
        return f"a sum over a constant {self.n:g}"


@dataclass(frozen=True, slots=True)
class PairMean(Aggregation):
    beta: float = DPO_BETA
    pairwise = True

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < float("inf"):
            raise ValueError(f"pair-mean needs a positive beta, got {self.beta!r}")

    @property
    def spec(self) -> str:
        return "pair-mean" if self.beta == DPO_BETA else f"pair-mean:{self.beta:g}"

    def describe(self) -> str:
        return f"a pair mean of the DPO sigmoid loss (beta {self.beta:g})"


CHOICES = "token-mean, sequence-mean, sum-over:N, pair-mean[:BETA]"


def parse_aggregation(text: str) -> Aggregation:
    """``--objective`` text as an Aggregation; ValueError (one line) when it is none."""
    name, sep, arg = text.strip().partition(":")
    simple = {"token-mean": TokenMean, "sequence-mean": SequenceMean}
    if name in simple and not sep:
        return simple[name]()
    if name in ("sum-over", "pair-mean") and (sep or name == "pair-mean"):
        try:
            number = float(arg) if sep else DPO_BETA
            return SumOver(int(number) if number.is_integer() else number) if name == "sum-over" else PairMean(number)
        except ValueError:
            raise ValueError(f"{text!r}: {name} takes a positive number after ':', as in "
                             f"{'sum-over:192' if name == 'sum-over' else 'pair-mean:0.1'}") from None
    raise ValueError(f"unknown objective {text!r}; choose from {CHOICES}")


def aggregation_check(value) -> str | None:
    """The option table's check: an Aggregation (a string was parsed before)."""
    return None if isinstance(value, Aggregation) and type(value) is not Aggregation else \
        f"expected one of {CHOICES} (or an Aggregation object), got {value!r}"
