"""A lean environment layered over the current one, for CI's coverage of a framework whose pins
the main environment cannot hold (axolotl 0.21.0, ms-swift 4.6.0): a venv whose .pth line puts the
current site-packages behind its own, holding only a pins file installed with --no-deps. Built
once per env cache (the ``env_cache`` fixture), kept between runs; half-built ones are rebuilt."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lean_env(cache: Path, pins: Path, *pip_args: str) -> Path:
    """The interpreter of the environment holding ``pins`` (tests/data/NAME.txt) over this one."""
    from lossaudit.releases.environments import isolated_environ

    env = cache / f"{pins.stem}-py{sys.version_info.major}{sys.version_info.minor}"
    python = env / "bin" / "python"
    if not (env / "built").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        (Path(purelib) / "zz_lossaudit_base.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *pip_args, "-r", str(pins)],
                              capture_output=True, text=True, env=isolated_environ(env), timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        (env / "built").write_text("ok\n")
    return python


def run_in(python: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python ARGS`` in its environment, with this checkout's lossaudit first on the path."""
    from lossaudit.releases.environments import isolated_environ

    environ = {**isolated_environ(python.parent.parent), "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT, env=environ, timeout=timeout)
