"""Installer processes that end with the run that started them.

``python -m venv`` starts ``ensurepip`` as a child of its own; pip starts build backends. Killing
only the direct child on Ctrl-C or SIGTERM leaves those running, still writing into a folder the
run is removing (it re-appears). So each command runs in a process group of its own, and any
exception while it runs (KeyboardInterrupt included) kills the whole group and waits for it
before the exception goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(command: list[str], environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``command``'s exit status and output (stdout and stderr together); OSError if it cannot start."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = process.communicate()
    except BaseException:
        end_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def end_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process of its group, and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.communicate(timeout=30)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        pass
