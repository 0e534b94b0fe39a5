"""Two sweeps compared (``compare OLD/sweep.json NEW/sweep.json``): the model types whose status
changed, and the types new or removed. A type's status is the sweep's: ``finding`` if any of its
paths has one, else ``skip`` if any was skipped, else ``pass``.

Exit status: 1 when a type went pass -> finding (a regression of the library under audit);
0 otherwise, whatever else changed; 2 a missing or broken sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UsageError
from ..report.report import read_bounded
from .run import FINDING, PASS, SCHEMA, SKIP

Key = tuple[str, str]  # (model_type, task)


def read(path: Path) -> dict | None:
    """The JSON in ``path`` (None when it is no JSON object); a missing file is a usage error."""
    try:
        data = json.loads(read_bounded(Path(path)))  # /dev/zero is refused, not read to the end
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read it: {exc}") from None
    return data if isinstance(data, dict) else None


def is_sweep(path: Path) -> bool:
    """Whether ``path`` holds a sweep; an unreadable file is left to the report loader's message."""
    try:
        data = read(path)
    except UsageError:
        return False
    return data is not None and data.get("schema") == SCHEMA


def load(path: Path) -> dict:
    data = read(path)
    if data is None or data.get("schema") != SCHEMA or not isinstance(data.get("rows"), list):
        raise UsageError(f"{path}: not a lossaudit sweep (expected schema {SCHEMA!r}); compare takes two reports "
                         "or two sweeps")
    return data


def type_status(rows: list[dict]) -> dict[Key, dict]:
    """(model_type, task) -> {"status": ..., "paths": {path: (status, reason)}}."""
    types: dict[Key, dict] = {}
    for row in rows:
        entry = types.setdefault((row["model_type"], row["task"]), {"paths": {}})
        entry["paths"][row["path"]] = (row["status"], row.get("reason") or "")
    for entry in types.values():
        statuses = {s for s, _ in entry["paths"].values()}
        entry["status"] = FINDING if FINDING in statuses else SKIP if SKIP in statuses else PASS
    return types


@dataclass
class Change:
    key: Key
    old: str
    new: str
    paths: list[str] = field(default_factory=list)  # "trainer: pass -> finding (reason)"

    @property
    def regression(self) -> bool:
        return self.old == PASS and self.new == FINDING


@dataclass
class SweepComparison:
    old_name: str
    new_name: str
    versions: tuple[str | None, str | None]
    changed: list[Change]
    added: dict[Key, str]  # key -> status in NEW
    removed: dict[Key, str]  # key -> status in OLD
    unchanged: int
    settings: list[str]  # settings that differ, "paths: [...] -> [...]"

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changed if c.regression]

    @property
    def exit_status(self) -> int:
        return 1 if self.regressions else 0


SETTINGS_COMPARED = ("tasks", "paths", "microbatches", "groupings", "paddings", "diagnostic")


def compare_sweeps(old: dict, new: dict, *, old_name: str = "OLD", new_name: str = "NEW") -> SweepComparison:
    a, b = type_status(old["rows"]), type_status(new["rows"])
    changed, unchanged = [], 0
    for key in (k for k in a if k in b):
        if a[key]["status"] == b[key]["status"]:
            unchanged += 1
            continue
        changed.append(Change(key, a[key]["status"], b[key]["status"], _path_changes(a[key], b[key])))
    changed.sort(key=lambda c: (not c.regression, c.key))
    settings = [f"{k}: {old['settings'].get(k)} -> {new['settings'].get(k)}" for k in SETTINGS_COMPARED
                if old.get("settings", {}).get(k) != new.get("settings", {}).get(k)]
    return SweepComparison(
        old_name, new_name,
        (old.get("environment", {}).get("transformers"), new.get("environment", {}).get("transformers")),
        changed, {k: b[k]["status"] for k in sorted(b) if k not in a},
        {k: a[k]["status"] for k in sorted(a) if k not in b}, unchanged, settings)


def _path_changes(old: dict, new: dict) -> list[str]:
    lines = []
    for path in dict.fromkeys([*old["paths"], *new["paths"]]):
        was, now = old["paths"].get(path, ("-", "")), new["paths"].get(path, ("-", ""))
        if was[0] != now[0]:
            why = now[1] or was[1]
            lines.append(f"{path}: {was[0]} -> {now[0]}" + (f" ({why[:200]})" if why else ""))
    return lines


def render(c: SweepComparison) -> str:
    out = [f"lossaudit compare (sweeps): OLD {c.old_name} (transformers {c.versions[0]}), "
           f"NEW {c.new_name} (transformers {c.versions[1]})", ""]
    if c.settings:
        out += ["settings differ: " + "; ".join(c.settings), ""]
    out.append(f"status changed ({len(c.changed)}):" if c.changed else "status changed: none")
    for change in c.changed:
        flag = "REGRESSION: " if change.regression else ""
        out.append(f"  {flag}{change.key[0]} ({change.key[1]}): {change.old} -> {change.new}")
        out += [f"      {line}" for line in change.paths]
    for title, types in (("new types", c.added), ("removed types", c.removed)):
        out.append(f"{title} ({len(types)}):" if types else f"{title}: none")
        out += [f"  {t} ({task}): {status}" for (t, task), status in types.items()]
    out += ["", f"{len(c.regressions)} regression(s) (pass -> finding), {len(c.changed)} status change(s), "
                f"{len(c.added)} new, {len(c.removed)} removed, {c.unchanged} unchanged"]
    return "\n".join(out)


def run(old_path: Path, new_path: Path) -> int:
    """``compare`` on two sweeps: print the change list, exit 1 on a pass -> finding."""
    comparison = compare_sweeps(load(old_path), load(new_path), old_name=str(old_path), new_name=str(new_path))
    print(render(comparison))
    return comparison.exit_status
