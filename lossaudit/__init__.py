"""lossaudit: does a training stack compute the same loss and gradient under gradient
accumulation, padding and data parallelism as on the full batch?

    >>> import lossaudit
    >>> report = lossaudit.check("llama", microbatches=[4])
    >>> report.cases            # a pandas DataFrame, one row per case
    >>> report.assert_clean()   # raises DivergenceError (an AssertionError) on a finding
"""

from __future__ import annotations

import importlib

from .core.errors import DivergenceError, EnvironmentProblem, LossauditError, UsageError

__version__ = "0.1.0"
LAZY = {"StepTokens": "core.reductions", "register_reduction": "core.reductions"}


def __getattr__(name: str):
    """torch loads on first use: ``import lossaudit`` stays light for the pytest plugin."""
    if name in LAZY:
        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check(model, **options):
    """Audit ``model`` and return a :class:`lossaudit.report.report.Report`.

    ``model`` is a name or directory, or a ``torch.nn.Module`` the caller built (a
    PreTrainedModel, or a PeftModel around one). Options are the fields of
    :class:`lossaudit.audit.config.CheckConfig` (the option table of ``lossaudit.audit.options``); ``path``
    is accepted for ``paths``, sequences may be lists, a dict gives KEY=VALUE options, and a
    string is read as on the command line.
    """
    from .audit.config import config_from
    from .audit.harness import audit

    loaded = None
    if not isinstance(model, str):  # an object the caller built
        from .stacks.objects import loaded_object

        loaded = loaded_object(model, options.get("task"))
        model = loaded.name
    progress = options.pop("progress", None)
    return audit(config_from(model, **options), progress, loaded=loaded)


def compare(old, new, **thresholds):
    """Compare report ``new`` with the baseline ``old`` (Reports or paths to report.json).

    ``thresholds`` take the CLI's values: ``max_grad_growth="10x"``, ``max_loss_rel_err=1e-4``,
    ``strict=True``, ``allow_different_batch=True`` (reports of another objective, batch or
    layouts are refused with UsageError without it). Returns a
    :class:`lossaudit.gate.baseline.Comparison` (``.cases`` is a DataFrame).
    """
    from .gate.baseline import compare as compare_reports
    from .gate.thresholds import Gate

    return compare_reports(old, new, Gate.parse(**thresholds))


__all__ = [
    "check", "compare", "register_reduction", "StepTokens",
    "LossauditError", "UsageError", "DivergenceError", "EnvironmentProblem",
]
