"""The code paths under audit. Importing this package registers the built-in ones."""

from . import accelerate, model, reduction  # noqa: F401  (registration)
from .base import PATHS, AuditContext, LogitPath, Measurement, PathSpec, StepPath

__all__ = ["PATHS", "AuditContext", "LogitPath", "Measurement", "PathSpec", "StepPath"]
