"""The user's own training stack (issue 15): a training step function (``step.py``), a Lightning
module (``lightning.py``), what a ``transformers.Trainer`` subclass such as TRL's SFTTrainer needs
(``trl.py``; ``paths/trainer_class.py`` runs its step), a PEFT-wrapped model (``peft.py``), a
model object from Python (``objects.py``).

Runners only measure: one optimizer step of the stack on a layout's microbatches, returned as a
:class:`StackStep` (the step's gradient, its loss, notes); the paths turn it into an Outcome and
``judge.py`` judges it. This package imports only ``errors`` at import time, so core modules
may ask ``stacks.peft`` what a wrapped model scores.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..core.errors import EnvironmentProblem, UsageError, first_line

# optional package -> the extra that installs it
EXTRAS = {"peft": "peft", "trl": "trl", "lightning": "lightning", "datasets": "trl", "axolotl": "axolotl", "deepspeed": "deepspeed",
          "swift": "swift"}


@dataclass
class StackStep:
    """What one optimizer step of a stack did."""

    gradient: list[tuple[str, torch.Tensor | None]]  # per trainable parameter; None: no gradient
    loss: float  # the loss the stack reports for the step (NaN when it reports none)
    notes: list[str] = field(default_factory=list)  # facts that explain a divergence
    extra: dict = field(default_factory=dict)  # report fields


def pip_command(package: str) -> str:
    return f"pip install 'lossaudit[{EXTRAS.get(package, package)}]'"


def missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def require(package: str, what: str) -> None:
    """EnvironmentProblem (exit 3) naming the pip command when ``package`` is not installed."""
    if missing(package):
        raise EnvironmentProblem(f"{what} needs {package}: {pip_command(package)}")


def read_mapping(flag: str, path: str, syntax: str, holds: str) -> tuple[Path, dict]:
    """A framework's config file given as ``flag PATH`` (axolotl's YAML, ms-swift's arguments): the
    file and its mapping, or one UsageError (no such file, not ``syntax``, not a mapping of ``holds``)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: {syntax}: {first_line(exc)}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{flag} {path}: expected a mapping of {holds}")
    return file, values
