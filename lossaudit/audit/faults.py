"""What can go wrong during a run, and how it is told: non-finite tensors, an exception in
one path, running out of memory. A fault in one case never loses the others."""

from __future__ import annotations

import contextlib
import os
import traceback
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import EnvironmentProblem, LossauditError

# The knobs that shrink an audit's memory, in the order worth trying; a flag is named only
# if the installed CheckConfig has the field (``--num-layers`` may not exist).
MEMORY_KNOBS = (("batch_size", "--batch-size"), ("max_length", "--max-length"), ("num_layers", "--num-layers"))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (and other accelerators') OOM, whichever way torch reports it."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, (oom, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()  # the CPU allocator says "can't allocate memory"
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def must_propagate(exc: BaseException) -> bool:
    """Errors that end the run rather than one case: OOM (the next case would hit it too)
    and lossaudit's own usage and environment errors. A UsageError or DivergenceError that the
    code under audit raised itself is that code's failure, a case's error like any other."""
    return is_out_of_memory(exc) or not isinstance(exc, Exception) or (
        isinstance(exc, LossauditError) and raised_by_lossaudit(exc))


PACKAGE = str(Path(__file__).resolve().parents[1])


def raised_by_lossaudit(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback, where it was raised, is lossaudit's."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return True
    return str(Path(frames[-1].filename).resolve()).startswith(PACKAGE + os.sep)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message (at file.py:123 in function)``."""
    message = " ".join(str(exc).split())
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"
    return f"{type(exc).__name__}: {message[:300]}{where}" if message else f"{type(exc).__name__}{where}"


def out_of_memory_message(exc: BaseException, config) -> str:
    knobs = [f"{flag} (now {getattr(config, name)})" for name, flag in MEMORY_KNOBS if hasattr(config, name)]
    first = " ".join(str(exc).split())[:160]
    return (f"out of memory on {config.device} ({first}); lower " + ", ".join(knobs[:-1])
            + (" or " if len(knobs) > 1 else "") + knobs[-1])


@contextlib.contextmanager
def out_of_memory_is_environmental(config) -> Iterator[None]:
    """Turn an OOM anywhere in the audit into one message that names the knobs (exit 3)."""
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc) and not isinstance(exc, LossauditError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise EnvironmentProblem(out_of_memory_message(exc, config)) from None
        raise
