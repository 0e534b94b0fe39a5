"""The code paths under audit. Importing this package registers the built-in ones."""

from . import accelerate, model, reduction, loss_fn, trainer  # noqa: F401  (registration, in default order)
from .base import (PATHS, AuditContext, Contribution, Label, LogitPath, MicrobatchView, Outcome, PathSpec, StepPath,
                   Unavailable)

__all__ = ["PATHS", "AuditContext", "Contribution", "Label", "LogitPath", "MicrobatchView", "Outcome", "PathSpec",
           "StepPath", "Unavailable"]
