"""What an isolated environment would hold, learned before anything is installed.

``plan`` asks pip (``pip install --dry-run --ignore-installed --report``, which reads wheel
metadata and installs nothing) for the candidate: every distribution it would install, at which
version. Then:

- a base constraint that a pin's own requirements exclude is lifted, and pip asked again (the
  constraint a conflict names is in pip's explanation);
- the **build flavour** of a pinned distribution is kept: a ``+cpu`` torch stays a CPU build
  (``torch==X+cpu`` from torch's CPU index, https://download.pytorch.org/whl/cpu), a CUDA build
  stays on its CUDA line (its ``+cuXYZ`` label or, for the package index's default CUDA build,
  the line of its ``nvidia-cuda-runtime``). Where that build cannot be had (the index lacks it,
  or cannot be reached), the plan stops before anything is installed and says what the
  candidate would be instead (its flavour, the distributions it adds and their size), unless
  the flavour change is allowed;
- every distribution that changes beyond the pins is named (``Candidate.changes``).

Nothing here touches the current environment: pip runs with ``--dry-run``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.errors import EnvironmentProblem, UsageError
from .flavours import Flavour, flavour
from .pip_text import conflicting_constraints, normalize, reason_line
from .processes import run_group

ALLOW = "--allow-flavour-change"
_MAX_LIFTS = 8  # resolution rounds before giving up
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Resolution:
    """One dry run: pip's exit status, its output, and its report (None when it failed)."""

    returncode: int
    output: str
    report: dict | None

    @property
    def installs(self) -> dict[str, dict]:
        """normalized name -> {"name", "version", "url", "direct"} of every distribution."""
        found = {}
        for item in (self.report or {}).get("install", []):
            meta = item.get("metadata", {})
            requires = [_REQUIREMENT_NAME.match(r) for r in meta.get("requires_dist") or []]
            found[normalize(meta["name"])] = {"name": meta["name"], "version": meta["version"],
                                              "url": item.get("download_info", {}).get("url", ""),
                                              "direct": bool(item.get("is_direct")),
                                              "requires": sorted({normalize(m[0]) for m in requires if m})}
        return found


DryRun = Callable[[list[str], list[str], list[str]], Resolution]  # (requirements, constraints, indexes)


@dataclass
class Candidate:
    """What the environment will hold: exact distributions, from which extra indexes."""

    installs: dict[str, dict]  # normalized name -> {"name", "version", "url", "direct"}
    indexes: list[str] = field(default_factory=list)
    lifted: set[str] = field(default_factory=set)
    changes: list[str] = field(default_factory=list)  # "tokenizers 0.23.3 -> 0.20.3", "adds triton 3.8.0"
    flavours: dict[str, str] = field(default_factory=dict)  # pinned name -> str(Flavour) of the candidate

    def flavour_of(self, name: str) -> Flavour | None:
        """The build of ``name`` here: its label, or the CUDA line of the runtime it requires
        (the environment keeps the current runtime too: only ``name``'s own counts)."""
        item = self.installs.get(name)
        if item is None:
            return None
        own = set(item.get("requires") or self.installs)
        return flavour(name, item["version"], {n: d["version"] for n, d in self.installs.items() if n in own})

    def requirements(self) -> list[str]:
        """One exact line per distribution, installed with --no-deps: nothing is resolved again."""
        return [f"{d['name']} @ {d['url']}" if d["direct"] else f"{d['name']}=={d['version']}"
                for d in self.installs.values()]


def plan(spec, dry_run: DryRun, *, allow_flavour_change: bool = False,
         reachable: Callable[[str], str | None] | None = None, sizes: Callable[[list[dict]], dict] | None = None,
         say=lambda line: None) -> Candidate:
    """The candidate for ``spec`` (an ``environments.Spec``: its pins over its base; see the
    module doc). Raises UsageError when a pinned build's flavour would change and that is not
    allowed, EnvironmentProblem when pip finds no candidate at all."""
    pins, base = dict(spec.pins), dict(spec.base)
    reachable = reachable or unreachable_reason
    sizes = sizes or download_sizes
    keep = {n: f for n, f in ((n, flavour(n, base[n], base)) for n in pins if n in base and "+" not in pins[n]) if f}
    labelled = {n: f for n, f in keep.items() if "+" in base[n]}  # the current build names its flavour
    first = _resolve(spec, dry_run, labelled, reachable)
    if isinstance(first, Candidate) and not _flavour_changes(first, keep, base):
        return _finish(first, pins, base, keep)
    # the package index's default build: what the candidate would be instead
    plain = first if not labelled else _resolve(spec, dry_run, {}, reachable)  # asked already when nothing is labelled
    if isinstance(plain, Candidate) and not _flavour_changes(plain, keep, base):
        return _finish(plain, pins, base, keep)
    unlabelled = {n: f for n, f in keep.items() if n not in labelled}
    if isinstance(plain, Candidate) and unlabelled:  # a default CUDA build whose line moved: its line's own index
        lined = _resolve(spec, dry_run, unlabelled, reachable)
        if isinstance(lined, Candidate) and not _flavour_changes(lined, keep, base):
            return _finish(lined, pins, base, keep)
        first = lined
    if not isinstance(plain, Candidate):
        raise EnvironmentProblem(f"resolving {_describe(pins)}: {plain}")
    checked = _checked(plain, keep, base)
    why = first if isinstance(first, str) else "; ".join(_flavour_changes(plain, keep, base))
    instead = _instead(plain, base, [*pins, *checked], sizes)
    if not allow_flavour_change:
        raise UsageError(f"{_describe(pins)}: {_kept_phrase(checked, base)} cannot be had: {why}. The package index's "
                         f"candidate is {instead}; nothing was installed (pass {ALLOW} to build it)")
    say(f"{ALLOW}: {_kept_phrase(checked, base)} cannot be had ({why}); building {instead}")
    return _finish(plain, pins, base, keep)


def _describe(pins: dict[str, str]) -> str:
    return " ".join(f"{n}=={v}" for n, v in pins.items())


def _kept_phrase(keep: dict[str, Flavour], base: dict[str, str]) -> str:
    return ", ".join(f"{flavour_} of {name} (as {name} {base[name]} here)" for name, flavour_ in keep.items())


def _checked(candidate: Candidate, keep: dict[str, Flavour], base: dict[str, str]) -> dict[str, Flavour]:
    """The builds a candidate must keep: the pins' (``keep``) and those of any base distribution
    whose constraint was lifted (a lifted ``torch`` must not turn into a CUDA build either)."""
    lifted = {n: f for n in sorted(candidate.lifted) if n in base and (f := flavour(n, base[n], base))}
    return {**lifted, **keep}


def _flavour_changes(candidate: Candidate, keep: dict[str, Flavour], base: dict[str, str]) -> list[str]:
    changes = []
    for name, wanted in _checked(candidate, keep, base).items():
        got = candidate.flavour_of(name)
        if got is None or (got.kind, got.line) != (wanted.kind, wanted.line):
            version = candidate.installs.get(name, {}).get("version")
            changes.append(f"{name} {version} is {got or 'a build of another flavour'}, not {wanted}")
    return changes


def _resolve(spec, dry_run: DryRun, flavoured: dict[str, Flavour], reachable) -> Candidate | str:
    """The candidate with ``flavoured`` pins labelled (``torch==X+cpu``) and their indexes, lifting
    conflicting base constraints; or why there is none (one line)."""
    indexes, unreachable = [], []
    for f in dict.fromkeys(flavoured.values()):
        problem = reachable(f.index)
        if problem:  # the build may still lie in a configured index or --find-links folder
            unreachable.append(f"{f.index} cannot be reached ({problem})")
        else:
            indexes.append(f.index)
    requirements = spec.requirements({n: f.label for n, f in flavoured.items()})
    pinned, lifted = {n for n, _ in spec.pins}, set()
    for _ in range(_MAX_LIFTS):
        result = dry_run(requirements, spec.constraints(lifted), indexes)
        if result.returncode == 0 and result.report is not None:
            return Candidate(result.installs, indexes, lifted)
        conflicting = conflicting_constraints(result.output, pinned) - lifted
        if not conflicting:
            return "; ".join([reason_line(result.output), *unreachable])
        lifted |= conflicting
    return f"no resolution after lifting {', '.join(sorted(lifted))}"


def _finish(candidate: Candidate, pins, base, keep) -> Candidate:
    """Name every distribution that changes beyond the pins."""
    for name, item in candidate.installs.items():
        if name in pins:
            continue
        if name not in base:
            candidate.changes.append(f"adds {item['name']} {item['version']}")
        elif item["version"] != base[name]:
            why = " (lifted: a pin requires it)" if name in candidate.lifted else ""
            candidate.changes.append(f"{item['name']} {base[name]} -> {item['version']}{why}")
    candidate.flavours = {n: str(candidate.flavour_of(n)) for n in keep}
    return candidate


def _instead(candidate: Candidate, base: dict[str, str], named: list[str], sizes) -> str:
    """``torch 2.14.0, a CUDA 13.0 build that adds 19 distributions (nvidia-cublas 554 MB, ...; 4.4 GB in all)``."""
    built = [f"{candidate.installs[n]['name']} {candidate.installs[n]['version']}"
             + (f", {candidate.flavour_of(n)}" if candidate.flavour_of(n) else "")
             for n in dict.fromkeys(named) if n in candidate.installs]
    added = [d for n, d in candidate.installs.items() if n not in base and n not in named]
    if not added:
        return ", ".join(built) + " that adds no distribution"
    known = sizes(added)
    listed = sorted(added, key=lambda d: -known.get(d["name"], 0))
    names = ", ".join(f"{d['name']} {_size(known[d['name']])}" if d["name"] in known else d["name"] for d in listed)
    total = f"; {_size(sum(known.values()))} to download" + ("" if len(known) == len(added) else " for those sized")
    return f"{'; '.join(built)} that adds {len(added)} distributions ({names}{total})"


def _size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def pip_dry_run(log, environ: dict[str, str]) -> DryRun:
    """A DryRun with the current interpreter's pip (``--dry-run``: it installs nothing here),
    its output appended to ``log``."""
    def run(requirements: list[str], constraints: list[str], indexes: list[str]) -> Resolution:
        with tempfile.TemporaryDirectory(prefix="lossaudit-resolve-") as tmp:
            folder = Path(tmp)
            (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
            (folder / "constraints.txt").write_text("\n".join(constraints) + "\n")
            command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-input",
                       "--disable-pip-version-check", "--report", str(folder / "report.json"),
                       "-r", str(folder / "requirements.txt"), "-c", str(folder / "constraints.txt")]
            for index in indexes:
                command += ["--extra-index-url", index]
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            result = run_group(command, environ)
            log.write(result.stdout)
            report = None
            if result.returncode == 0:
                try:
                    report = json.loads((folder / "report.json").read_text())
                except (OSError, ValueError):
                    report = None
            return Resolution(result.returncode, result.stdout, report)
    return run


def unreachable_reason(url: str, timeout: float = 10.0) -> str | None:
    """None when ``url`` answers; else why not, in a few words."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(getattr(reason, "strerror", None) or reason)


def download_sizes(items: list[dict], timeout: float = 10.0) -> dict[str, int]:
    """name -> bytes of each distribution's file (a local file's size, else the index's
    Content-Length); one that cannot be sized is left out."""
    sizes = {}
    for item in items:
        url = item.get("url", "")
        try:
            if url.startswith("file://"):
                sizes[item["name"]] = os.stat(urllib.request.url2pathname(url[len("file://"):])).st_size
            elif url.startswith(("https://", "http://")):
                request = urllib.request.Request(url, method="HEAD")
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    length = answer.headers.get("Content-Length")
                    if length and length.isdigit():
                        sizes[item["name"]] = int(length)
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return sizes
