"""The exception hierarchy. Each class maps to one exit status of the CLI."""

from __future__ import annotations


class LossauditError(Exception):
    """Root of every error lossaudit raises on purpose."""

    exit_status = 3


class UsageError(LossauditError, ValueError):
    """Bad arguments or bad input: the user can fix it. Exit status 2.

    Holds every problem found, so a user sees them all at once.
    """

    exit_status = 2

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("; ".join(self.problems))


class EnvironmentProblem(LossauditError):
    """The environment cannot run the audit (missing package, out of memory). Exit 3."""

    exit_status = 3


class DivergenceError(LossauditError, AssertionError):
    """An audited path does not match the reference. pytest shows it as a failure."""

    exit_status = 1


class RankFailure(EnvironmentProblem):
    """A data-parallel rank raised, died or hung. Paths turn it into ``error`` cases."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line for a user: its first line, else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
