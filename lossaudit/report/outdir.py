"""A report directory is one unit, and one run writes it.

- ``claim``: an exclusive lock (``flock`` on ``.NAME.lock`` beside the directory) held from
  before the audit until the report is in place, so two runs cannot both write one ``--out``;
  the kernel drops it when a run dies, so a killed run never leaves a stale lock behind.
- ``write_dir``: every file is written into a new sibling directory, which is then swapped in
  for ``out`` (one atomic exchange where the kernel has one, else two renames with SIGINT and
  SIGTERM held back): no moment shows files of two runs side by side, and an interrupted or
  failed write leaves the old report whole and no staged file behind.

``LOSSAUDIT_TEST_PAUSE=POINT:DIR`` (tests only) stops a run at ``locked``, ``staged`` or ``swapping``: it
creates ``DIR/reached-POINT`` and waits for ``DIR/go-POINT``, so a test can send a signal or
start a second writer at a known moment instead of racing a timer.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..core.errors import EnvironmentProblem, UsageError

# errors of the machine, not of the user's choice of directory: exit 3
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
PAUSE_ENV = "LOSSAUDIT_TEST_PAUSE"
RENAME_EXCHANGE = 2  # linux/fs.h


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def try_lock(out: Path) -> int | None:
    """An open descriptor holding the lock of ``out``, or None while another run holds it."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # its last holder may have removed the file after we opened it: lock the new one
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def unlock(out: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(out))
    os.close(fd)


@contextlib.contextmanager
def claim(candidates: Iterator[Path], *, skip_busy: bool, taken) -> Iterator[Path]:
    """Lock the first of ``candidates`` that ``taken(path)`` (a problem string, or None) allows.
    A locked one is skipped with ``skip_busy`` (the default --out moves on to the next name),
    else refused naming the lock."""
    for out in candidates:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = try_lock(out)
        except OSError as exc:
            raise write_error(exc, out, "report") from None
        if fd is None:
            if skip_busy:
                continue
            raise UsageError(f"--out {out}: another lossaudit run is writing there (it holds {lock_path(out)}); "
                             "wait for it or choose another --out")
        try:
            problem = taken(out)  # checked again under the lock: a run may have finished meanwhile
            if problem and skip_busy:
                continue
            if problem:
                raise UsageError(problem)
            pause_point("locked")
            yield out
            return
        finally:
            unlock(out, fd)


def write_dir(out: Path, renderers: dict, subject, what: str) -> list[Path]:
    """Every ``name: render(subject)`` as the directory ``out``, replacing what it held as a
    whole. A directory that also holds files of its own (a caller's logs) keeps them: there the
    report's files are renamed in one by one, all under held signals, so an interrupt still
    never leaves files of two runs side by side."""
    if out.is_dir() and any(p.name not in renderers and p.name not in OUTPUT_NAMES for p in out.iterdir()):
        return _write_into(out, renderers, subject, what)
    staged = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes 0700; a report is for others to read
        for name, render in renderers.items():
            (staged / name).write_text(render(subject), encoding="utf-8")
        pause_point("staged")
        with signals_held():
            pause_point("swapping")  # a signal sent now waits until the swap is done
            _swap(staged, out)
    except OSError as exc:
        raise write_error(exc, out, what) from None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)  # the staged files, or the old report after a swap
    return [out / name for name in renderers]


# files lossaudit writes into a report or sweep directory: an earlier run's, never a caller's own
OUTPUTS = (frozenset({"report.json", "cases.csv", "report.md", "report.html"}),
           frozenset({"sweep.json", "sweep.csv", "sweep.md"}))
OUTPUT_NAMES = frozenset().union(*OUTPUTS)


def _write_into(out: Path, renderers: dict, subject, what: str) -> list[Path]:
    """The report's files into ``out`` beside what else it holds (see ``write_dir``); an earlier
    run's file that this one does not write is removed with the same held signals."""
    staged = None
    try:
        staged = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
        for name, render in renderers.items():
            (staged / name).write_text(render(subject), encoding="utf-8")
            os.chmod(staged / name, 0o666 & ~_umask())
        pause_point("staged")
        with signals_held():
            pause_point("swapping")
            for name in renderers:
                os.replace(staged / name, out / name)
            for stale in set().union(*(kind for kind in OUTPUTS if kind & set(renderers))) - set(renderers):
                (out / stale).unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(exc, out, what) from None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    return [out / name for name in renderers]


def _swap(staged: Path, out: Path) -> None:
    """``staged`` becomes ``out``; the old ``out``, if any, ends up at ``staged``."""
    if not out.exists():
        os.rename(staged, out)
        return
    if _exchange(staged, out):
        return
    old = staged.with_name(staged.name.replace(".staging-", ".old-"))
    os.rename(out, old)
    try:
        os.rename(staged, out)
    except OSError:
        os.rename(old, out)  # the old report goes back
        raise
    os.rename(old, staged)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): both names swapped in one step. False where unsupported."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    at_cwd = -100
    if libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then they interrupt as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_error(exc: OSError, out: Path, what: str) -> Exception:
    """A failed write as lossaudit's error: a full disk is the environment (exit 3); a
    directory the user may not write, or a path that cannot be a directory, is usage (exit 2)."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        reason = f"permission denied ({exc.filename or out})"
    message = f"cannot write the {what} to {out}: {reason}"
    if exc.errno in ENVIRONMENT_ERRNOS:
        return EnvironmentProblem(message)
    return UsageError(message)


def pause_point(name: str) -> None:
    """The test hook of the module doc."""
    setting = os.environ.get(PAUSE_ENV, "")
    point, _, folder = setting.partition(":")
    if point != name or not folder:
        return
    Path(folder, f"reached-{name}").touch()
    deadline = time.monotonic() + 120
    while not Path(folder, f"go-{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask
