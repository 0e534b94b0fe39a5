"""Running paths as an audit does, for tests that build their own context and layouts."""

from lossaudit.audit.harness import run_paths
from lossaudit.core.layouts import Layout


def judged(ctx, layouts, paths):
    """(measured, verdict, detail) for every case of ``paths`` on ``layouts`` (a Layout or a
    list), beside the correct reduction, with the tolerance the run's own noise gives."""
    return run_paths(ctx, [layouts] if isinstance(layouts, Layout) else layouts, paths).verdicts()
