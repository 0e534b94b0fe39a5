"""The regression gate's thresholds: parsed into check objects when the arguments are read,
so a bad value is a usage error before any work.

One option table (``OPTIONS``) defines them for both front ends: ``python -m lossaudit``
(``compare`` and ``check --baseline``) and the pytest plugin (as ``--lossaudit-...``).
This module imports no torch, transformers or pandas: the pytest plugin loads it at start-up.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..core.errors import UsageError

METRICS = {"grad": "grad_rel_err", "loss": "loss_rel_err"}
MOVED = 2.0  # an error that grew or shrank more than this factor is printed even when the gate passes it


@dataclass(frozen=True, slots=True)
class Growth:
    """A case's error in NEW more than ``factor`` times its error in OLD. An error below the
    dtype floor counts as the floor, so rounding noise at 1e-8 growing to 1e-7 is no growth."""

    metric: str  # "grad" or "loss"
    factor: float

    @property
    def option(self) -> str:
        return f"--max-{self.metric}-growth"

    def violation(self, old: float, new: float, floor: float) -> str | None:
        if not (math.isfinite(old) and math.isfinite(new)):
            return None  # a case that cannot be measured is judged by its verdict
        growth = new / max(old, floor)
        if growth > self.factor:
            return f"{self.metric} err grew {growth:.3g}x ({old:.2e} -> {new:.2e}; {self.option} {self.factor:g}x)"
        return None


@dataclass(frozen=True, slots=True)
class Limit:
    """A case's error at or below ``value`` in OLD and above it in NEW: it grew past the limit."""

    metric: str
    value: float

    @property
    def option(self) -> str:
        return f"--max-{self.metric}-rel-err"

    def violation(self, old: float, new: float, floor: float) -> str | None:
        if math.isfinite(old) and math.isfinite(new) and old <= self.value < new:
            return f"{self.metric} err {old:.2e} -> {new:.2e} passed {self.option} {self.value:g}"
        return None


Check = Growth | Limit
OFF = ("off", "none")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def growth_parser(metric: str):
    def parse(text: str) -> Growth | None:
        text = text.strip().lower()
        if text in OFF:
            return None
        factor = _number(text[:-1] if text.endswith("x") else text, "a factor above 1 like 10x, or off")
        if factor <= 1:
            raise argparse.ArgumentTypeError(f"expected a factor above 1 like 10x, or off, got {text!r}")
        return Growth(metric, factor)

    parse.__name__ = "factor"  # argparse names the type in its own messages
    return parse


def limit_parser(metric: str):
    def parse(text: str) -> Limit | None:
        text = text.strip().lower()
        if text in OFF:
            return None
        return Limit(metric, _number(text, "a positive relative error like 1e-4, or off"))

    parse.__name__ = "relative error"
    return parse


@dataclass(frozen=True, slots=True)
class Option:
    """One gate option; ``name`` is the CLI flag without its dashes."""

    name: str
    parse: object
    default: str | None
    help: str
    flag: bool = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def kwargs(self) -> dict:
        if self.flag:
            return {"action": "store_true", "help": self.help}
        default = None if self.default is None else self.parse(self.default)
        return {"type": self.parse, "default": default, "metavar": "VALUE", "help": self.help}


OPTIONS = (
    Option("max-grad-growth", growth_parser("grad"), "10x",
           "regression when a case's gradient error grows more than this factor (default 10x; off)"),
    Option("max-loss-growth", growth_parser("loss"), "10x",
           "regression when a case's loss error grows more than this factor (default 10x; off)"),
    Option("max-grad-rel-err", limit_parser("grad"), None,
           "regression when a case's gradient error passes this value (e.g. 1e-4; default off)"),
    Option("max-loss-rel-err", limit_parser("loss"), None,
           "regression when a case's loss error passes this value (e.g. 1e-4; default off)"),
    Option("strict", None, None, "cases present in only one report fail the comparison", flag=True),
    Option("allow-different-batch", None, None,
           "compare reports of another objective, batch (targets, sequences, seed), model or layouts; "
           "without it such a comparison is refused (exit 2)", flag=True),
    Option("all-cases", None, None, "print every case, not only those that changed (the files written "
           "hold every case either way)", flag=True),
)
FLAGS = tuple(o.dest for o in OPTIONS if o.flag)


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """The gate options of ``compare`` and ``check --baseline``."""
    for option in OPTIONS:
        parser.add_argument(f"--{option.name}", dest=option.dest, **option.kwargs())


def add_pytest_options(group, prefix: str = "lossaudit-") -> None:
    """The same options for pytest, as ``--lossaudit-max-grad-growth`` and so on."""
    for option in OPTIONS:
        group.addoption(f"--{prefix}{option.name}", dest=f"lossaudit_{option.dest}", **option.kwargs())


@dataclass(frozen=True, slots=True)
class Gate:
    """The parsed options of one comparison: its thresholds and flags."""

    checks: tuple[Check, ...] = (Growth("grad", 10.0), Growth("loss", 10.0))
    strict: bool = False
    allow_different_batch: bool = False
    all_cases: bool = False  # how much is printed; what is judged does not depend on it

    @classmethod
    def from_values(cls, values: dict) -> "Gate":
        """From parsed option values keyed by ``Option.dest`` (missing keys take the defaults)."""
        checks = []
        for option in OPTIONS:
            if option.flag:
                continue
            value = values.get(option.dest, option.kwargs()["default"])
            if value is not None:
                checks.append(value)
        return cls(tuple(checks), **{flag: bool(values.get(flag, False)) for flag in FLAGS})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Gate":
        return cls.from_values(vars(args))

    @classmethod
    def parse(cls, **options) -> "Gate":
        """From Python keyword arguments: ``Gate.parse(max_grad_growth="5x", strict=True)``;
        the values are the CLI's strings (or numbers). Raises UsageError on a bad value."""
        known = {o.dest: o for o in OPTIONS}
        values, problems = {}, []
        for key, value in options.items():
            option = known.get(key)
            if option is None:
                problems.append(f"unknown gate option {key!r}; choose from {', '.join(known)}")
            elif option.flag:
                values[key] = bool(value)
            else:
                try:
                    values[key] = option.parse(str(value))
                except argparse.ArgumentTypeError as exc:
                    problems.append(f"--{option.name}: {exc}")
        if problems:
            raise UsageError(*problems)
        return cls.from_values(values)
