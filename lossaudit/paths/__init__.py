"""The code paths under audit. Importing this package registers the built-in ones."""

from . import accelerate, model, reduction, loss_fn, trainer  # noqa: F401  (registration, in default order)
from . import lightning, step  # noqa: F401  (the user's own stack: issue 15)
from .base import (PATHS, AuditContext, Contribution, Label, LogitPath, MicrobatchView, Outcome, PathSpec, StepPath,
                   Unavailable)

__all__ = ["PATHS", "AuditContext", "Contribution", "Label", "LogitPath", "MicrobatchView", "Outcome", "PathSpec",
           "StepPath", "Unavailable"]
