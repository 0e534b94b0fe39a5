"""Isolated, cached Python environments that differ from the current one only by named pins.

An environment for ``transformers==4.46.0`` holds every distribution the current environment
holds, at the same version (the current versions are pip *constraints*), except the pins, and
lossaudit itself installed (editable) from its source directory. When a pin's own requirements
exclude a current version (transformers 4.46 wants tokenizers<0.21), that constraint is lifted
and the environment's manifest says so: the environment differs by exactly the pins and the
lifted constraints.

Environments live under a cache directory, one folder per key of the pins (and of what they
are built on), created with ``uv`` where it is installed, else ``venv`` + ``pip``. A folder
counts as built only once its manifest (``lossaudit-env.json``) is written, last; a half-built
one is removed and built again. Nothing here ever installs into the current environment: every
installer runs with the new environment's own interpreter, or ``uv --python`` naming it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..core.errors import EnvironmentProblem, UsageError
from .candidate import Candidate, DryRun, pip_dry_run, plan
from .pip_text import normalize, reason_line
from .processes import run_group

MANIFEST = "lossaudit-env.json"
NEVER_PINNED = {"pip", "lossaudit"}  # pip runs the install; lossaudit comes from its source directory
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
# variables that would make an installer or interpreter reach outside the new environment
_LEAKS = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "PIP_TARGET", "PIP_PREFIX", "PIP_USER",
          "PIP_ROOT", "UV_PROJECT_ENVIRONMENT", "CONDA_PREFIX", "__PYVENV_LAUNCHER__")


def parse_pin(text: str) -> tuple[str, str]:
    """``'transformers==4.46.0'`` -> ``('transformers', '4.46.0')``; anything but an exact pin
    is a usage error (an environment's key must name what it holds)."""
    name, sep, version = text.strip().partition("==")
    if not sep or not _NAME.match(name.strip()) or not _VERSION.match(version.strip()):
        raise UsageError(f"expected an exact pin like transformers==4.46.0, got {text!r}")
    return normalize(name.strip()), version.strip()


def current_distributions() -> dict[str, str]:
    """name -> version of every distribution the running interpreter sees that an index can
    provide again (editable and local-directory installs cannot; nor pip and lossaudit)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or normalize(name) in found or normalize(name) in NEVER_PINNED:
            continue
        if _is_local(dist):
            continue
        found[normalize(name)] = dist.version
    return dict(sorted(found.items()))


def _is_local(dist) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return "dir_info" in json.loads(text)
    except ValueError:
        return False


def source_directory() -> Path:
    """The directory lossaudit is installed from: the checkout holding its pyproject.toml."""
    here = Path(__file__).resolve().parents[2]
    project = here / "pyproject.toml"
    if not project.is_file() or 'name = "lossaudit"' not in project.read_text():
        raise EnvironmentProblem(f"lossaudit is not running from its source directory ({here} has no lossaudit "
                                 "pyproject.toml): an isolated environment installs it from there")
    return here


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lossaudit" / "envs"


def installer() -> str:
    """``uv`` where it is on PATH, else ``pip`` (venv + pip)."""
    return "uv" if shutil.which("uv") else "pip"


@dataclass(frozen=True)
class Spec:
    """What one environment holds: the pins over the base distributions."""

    pins: tuple[tuple[str, str], ...]  # sorted (name, version)
    base: tuple[tuple[str, str], ...]  # sorted (name, version), the current environment's
    python: str
    source: str
    flavour_change: bool = False  # a pinned torch may come in another build (CPU -> CUDA): --allow-flavour-change

    @classmethod
    def make(cls, pins: dict[str, str], base: dict[str, str] | None = None, source: Path | None = None,
             *, flavour_change: bool = False) -> "Spec":
        base = current_distributions() if base is None else base
        python = f"{platform.python_implementation()}-{platform.python_version()}-{sys.base_prefix}"
        return cls(tuple(sorted((normalize(k), v) for k, v in pins.items())), tuple(sorted(base.items())),
                   python, str(source or source_directory()), flavour_change)

    @property
    def key(self) -> str:
        """Same pins on the same base, interpreter and source: the same key (16 hex digits). An
        environment whose flavour was allowed to change is another one."""
        fields = {"pins": self.pins, "base": self.base, "python": self.python, "source": self.source}
        if self.flavour_change:
            fields["flavour_change"] = True
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The folder: the pins, readable, then the key."""
        pins = "_".join(f"{n}-{v}" for n, v in self.pins) or "current"
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', pins)[:80]}-{self.key}"

    def constraints(self, lifted: set[str] = frozenset()) -> list[str]:
        """Every base distribution at its current version, unless lifted or pinned."""
        pinned = dict(self.pins)
        return [f"{n}=={v}" for n, v in self.base if n not in pinned and n not in lifted]

    def requirements(self, labels: dict[str, str] | None = None) -> list[str]:
        """The pins (first: an unknown release fails before the rest is collected), then the
        rest of the base by name, its version from the constraints. ``labels``: a build's local
        label for some pins (``torch==2.14.0+cpu``)."""
        pinned, labels = dict(self.pins), labels or {}
        return ([f"{n}=={v}" + (f"+{labels[n]}" if n in labels else "") for n, v in self.pins]
                + [n for n, _ in self.base if n not in pinned])

    def describe(self) -> str:
        return " ".join(f"{n}=={v}" for n, v in self.pins) or "the current versions"


@dataclass
class Env:
    """A built environment: its folder, interpreter and manifest."""

    path: Path
    manifest: dict = field(default_factory=dict)
    created: bool = False  # built by this call (False: found in the cache)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def isolated_environ(env_path: Path | None = None) -> dict[str, str]:
    """os.environ without what would reach outside an environment, its bin/ first on PATH."""
    environ = {k: v for k, v in os.environ.items() if k not in _LEAKS}
    environ["PYTHONNOUSERSITE"] = "1"
    if env_path is not None:
        environ["PATH"] = f"{env_path / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
        environ["VIRTUAL_ENV"] = str(env_path)
    return environ


def cached(spec: Spec, cache: Path) -> Env | None:
    """The built environment of ``spec`` in ``cache``, or None (absent or half-built)."""
    path = cache / spec.name
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != spec.key or not (path / "bin" / "python").exists():
        return None
    return Env(path, manifest)


def ensure(spec: Spec, cache: Path, say=lambda line: None, *, dry_run: DryRun | None = None) -> Env:
    """The environment of ``spec``: from the cache, or built now (under a lock, so two
    previews of the same pins build it once). What it will hold is learned first, by a dry run
    (``candidate.plan``), and named; a build flavour that would change stops it there (UsageError)
    unless ``spec.flavour_change``. Raises EnvironmentProblem if it cannot be built."""
    found = cached(spec, cache)
    if found is not None:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"--env-cache {cache}: cannot create it: {exc.strerror}") from None
    sweep_stale(cache, say)
    with open(cache / f"{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = cached(spec, cache)  # built by another process while we waited
        if found is not None:
            return found
        return _build(spec, cache, say, dry_run)


_FOLDER = re.compile(r"-[0-9a-f]{16}$")  # Spec.name's end: the key


def sweep_stale(cache: Path, say=lambda line: None) -> list[Path]:
    """Remove the half-built environments of runs that died (SIGKILL, a power cut): a folder of
    ours (named for a key, its lock file beside it) with no manifest whose lock nobody holds.
    A build in progress holds its lock, so it is never touched."""
    removed = []
    for folder in sorted(cache.iterdir()):
        lock_file = cache / f"{folder.name}.lock"
        if not (_FOLDER.search(folder.name) and folder.is_dir() and not folder.is_symlink() and lock_file.is_file()):
            continue
        if (folder / MANIFEST).exists():
            continue
        with open(lock_file, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built now
            if not (folder / MANIFEST).exists():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        say(f"removed {len(removed)} half-built environment(s) left by runs that were killed: "
            + ", ".join(p.name for p in removed))
    return removed


def _build(spec: Spec, cache: Path, say, dry_run: DryRun | None) -> Env:
    path, log = cache / spec.name, cache / f"{spec.name}.log"
    shutil.rmtree(path, ignore_errors=True)  # a half-built folder never counts
    started = time.monotonic()
    tool = installer()
    try:
        with open(log, "w") as out:
            say(f"resolving {spec.describe()} with pip --dry-run (nothing is installed yet)")
            candidate = plan(spec, dry_run or pip_dry_run(out, isolated_environ()),
                             allow_flavour_change=spec.flavour_change, say=say)
            if candidate.changes:
                say(f"{spec.describe()} also changes {len(candidate.changes)} other distribution(s): "
                    + "; ".join(candidate.changes))
            say(f"building an environment for {spec.describe()} in {path} (the first time takes minutes)")
            _create(tool, path, out)
            _install(tool, candidate, path, out)
            # the environment's own setuptools builds it, offline, when there is one
            offline = ["--no-build-isolation"] if "setuptools" in candidate.installs else []
            _run(_install_command(tool, path) + ["--no-deps", *offline, "-e", spec.source], out,
                 "installing lossaudit from its source directory")
        installed = _installed(path)
    except EnvironmentProblem as exc:  # the installer's whole output stays in the log
        shutil.rmtree(path, ignore_errors=True)
        raise EnvironmentProblem(f"{exc} (log: {log})") from None
    except UsageError:  # a refused flavour: nothing was built, the line says why
        shutil.rmtree(path, ignore_errors=True)
        log.unlink(missing_ok=True)
        raise
    except BaseException:  # an interrupt: its processes are gone (run_group), so the folder stays gone
        shutil.rmtree(path, ignore_errors=True)
        raise
    lifted = sorted(candidate.lifted)
    manifest = {"key": spec.key, "pins": dict(spec.pins), "lifted": lifted,
                "lifted_versions": {n: installed.get(n) for n in lifted}, "changes": candidate.changes,
                "flavours": candidate.flavours, "indexes": candidate.indexes, "python": spec.python,
                "source": spec.source, "installer": tool, "seconds": round(time.monotonic() - started, 1),
                "installed": installed}
    staged = path / f".{MANIFEST}.tmp"
    staged.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staged, path / MANIFEST)  # the commit point: now it counts as built
    log.unlink(missing_ok=True)
    return Env(path, manifest, created=True)


def _create(tool: str, path: Path, out) -> None:
    if tool == "uv":
        command = ["uv", "venv", "--quiet", "--seed", "--python", sys.executable, str(path)]
    else:
        command = [sys.executable, "-m", "venv", str(path)]
    _run(command, out, "creating the environment")
    if not (path / "bin" / "python").exists():
        raise EnvironmentProblem(f"creating the environment: {path}/bin/python was not made")


def _install_command(tool: str, path: Path) -> list[str]:
    python = str(path / "bin" / "python")  # never the current interpreter
    if tool == "uv":
        return ["uv", "pip", "install", "--python", python]
    # no bytecode: compiling every module of torch costs more than the few a run imports
    return [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--no-compile"]


def _install(tool: str, candidate: Candidate, path: Path, out) -> None:
    """Exactly the planned distributions, nothing resolved again (--no-deps)."""
    requirements = path / "requirements.txt"
    requirements.write_text("\n".join(candidate.requirements()) + "\n")
    indexes = [option for index in candidate.indexes for option in ("--extra-index-url", index)]
    _run(_install_command(tool, path) + ["--no-deps", *indexes, "-r", str(requirements)], out,
         f"installing {len(candidate.installs)} distributions")


def _run(command: list[str], out, what: str) -> subprocess.CompletedProcess:
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    try:
        result = run_group(command, isolated_environ())
    except OSError as exc:
        raise EnvironmentProblem(f"{what}: cannot run {command[0]}: {exc.strerror}") from None
    out.write(result.stdout)
    if result.returncode != 0:
        raise EnvironmentProblem(f"{what}: {reason_line(result.stdout)}")
    return result


def _installed(path: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    result = subprocess.run([str(path / "bin" / "python"), "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=isolated_environ(path))
    if result.returncode != 0:
        raise EnvironmentProblem(f"the new environment's python does not run: {reason_line(result.stderr)}")
    return dict(sorted((normalize(k), v) for k, v in json.loads(result.stdout).items()))
