"""The run's answer comes from a process the code under audit cannot end.

A user's step, trainer class or Lightning factory runs inside the audit; if it calls
``os._exit(0)`` the process ends with status 0 and no report, which would read as clean. So
the entry points (``python -m lossaudit``, the ``lossaudit`` script) fork: the child runs the
command and, as its last act, writes its exit status with its pid to a pipe; the parent, which
runs nothing else, waits for the child and answers with that status. A child that ends without
writing it (``os._exit``, a signal, the kernel's OOM killer) is one line and exit 3.

Signals: the child gets its own process group, so a terminal's Ctrl-C reaches the parent only,
which passes SIGINT and SIGTERM on (once) and waits; on Linux the child is sent SIGTERM if the
parent dies, so a killed parent leaves no run behind holding the report's lock.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
from typing import Callable

RECORD = struct.Struct("<ii")  # (pid, exit status)
FORWARDED = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1


def available() -> bool:
    return hasattr(os, "fork") and os.environ.get("LOSSAUDIT_NO_SUPERVISOR") != "1"


def supervised(work: Callable[[], int]) -> int:
    """``work()``'s exit status, as the child that ran it reported it; 3 with one line when the
    child ended without reporting one. The child never returns: it exits with the status."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(work, write_end)
    os.close(write_end)
    previous = {sig: signal.signal(sig, lambda signum, frame: _forward(pid, signum)) for sig in FORWARDED}
    try:
        status = _wait(pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reported = _reported(read_end, pid)
    os.close(read_end)
    if reported is not None:
        return reported
    print(f"lossaudit: error: the run ended without an answer ({_how(status)}): code under audit ended "
          "the process (os._exit?) or it was killed; no report was written", file=sys.stderr)
    return 3


def _child(work: Callable[[], int], write_end: int) -> None:
    try:
        os.setpgid(0, 0)  # the terminal's signals go to the parent, which passes them on once
    except OSError:
        pass
    _die_with_parent()
    status = 3
    try:
        status = work()
    except SystemExit as exc:  # argparse's --help
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:  # main() answers everything else; what is left is an internal error
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.write(write_end, RECORD.pack(os.getpid(), status))
        os.close(write_end)
    sys.exit(status)  # atexit handlers run; the caller's code after main() does not


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return status
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


def _reported(read_end: int, pid: int) -> int | None:
    """The status the child wrote, if the child itself wrote one (a process it forked cannot)."""
    os.set_blocking(read_end, False)
    data = b""
    try:
        while chunk := os.read(read_end, 4096):
            data += chunk
    except BlockingIOError:  # a process the child forked still holds the pipe open
        pass
    for offset in range(0, len(data) - RECORD.size + 1, RECORD.size):
        writer, status = RECORD.unpack_from(data, offset)
        if writer == pid:
            return status
    return None


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.WEXITSTATUS(status)}"
