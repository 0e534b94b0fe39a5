"""``python -m lossaudit``: argument parsing and exit statuses. The work is in the library.

Exit status: 0 clean, 1 findings, 2 bad usage or input, 3 environment or internal error.
Each subcommand is a module in ``lossaudit/cli/commands/`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
import warnings

from .supervisor import available as supervisor_available, supervised
from .commands import COMMANDS
from ..core.errors import EnvironmentProblem, LossauditError, UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(prog="lossaudit", description="Audit loss reduction under gradient accumulation.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"lossaudit.cli.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def _one_line(exc: BaseException) -> str:
    """A library's multi-line message (validation errors, CUDA hints) as one stderr line."""
    return " ".join(str(exc).split())


# the libraries whose warnings (deprecations, "you are using ...") would bury lossaudit's lines
LIBRARIES = ("transformers", "peft", "trl", "accelerate", "lightning", "lightning_fabric", "pytorch_lightning",
             "datasets", "huggingface_hub", "torch", "tokenizers")


def quiet_libraries() -> None:
    """transformers' load reports and progress bars, and the libraries' Python warnings (peft's,
    TRL's, a deprecation in transformers) would bury lossaudit's own lines (a cut --num-layers
    checkpoint lists every layer left unloaded); a user's setting (-W, PYTHONWARNINGS) wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as SIGINT is: the same clean-up, the same exit."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, 1, 2 or 3 whatever happens; LOSSAUDIT_DEBUG=1 adds the traceback to
    stderr but never changes the status. From an entry point (``argv`` None) the command runs
    in a child process that code under audit cannot end with a false answer (supervisor.py)."""
    if argv is None and supervisor_available():
        return supervised(lambda: _main(None))
    return _main(argv)


class ReaderGone:
    """stdout that outlives its reader: ``lossaudit compare A B | head`` closes the pipe while
    the command still has lines to print. The rest of the output is dropped (fd 1 goes to
    /dev/null) and the command runs to its own exit status, its files written."""

    def __init__(self, stream):
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self._gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _main(argv: list[str] | None) -> int:
    debug = os.environ.get("LOSSAUDIT_DEBUG") == "1"
    quiet_libraries()
    if argv is None and not isinstance(sys.stdout, ReaderGone):
        sys.stdout = ReaderGone(sys.stdout)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("missing command; try: python -m lossaudit check llama")
        return _run(args)
    except LossauditError as exc:
        _traceback(debug)
        print(f"lossaudit: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        print(f"lossaudit: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return 3
    except Exception as exc:  # an internal error: one line, the traceback on request
        _traceback(debug)
        hint = "" if debug else " (set LOSSAUDIT_DEBUG=1 for the traceback)"
        print(f"lossaudit: internal error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 3


def _run(args) -> int:
    """The command; a SystemExit from code it called (a user's reduction or loss function) is
    not the command's answer: it must never pass for a clean run."""
    try:
        return importlib.import_module(f"lossaudit.cli.commands.{args.command}").run(args)
    except SystemExit as exc:
        raise EnvironmentProblem(f"code called during the run raised SystemExit({exc.code!r}); "
                                 "the run was not completed") from None


def _traceback(debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
