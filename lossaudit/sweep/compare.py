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
from ..report.report import parse_json, read_bounded
from .run import FINDING, PASS, SCHEMA, SKIP

STATUSES = (PASS, FINDING, SKIP)

Key = tuple[str, str]  # (model_type, task)


def read(path: Path) -> dict | None:
    """The JSON in ``path`` (None when it is no JSON object); a missing file is a usage error."""
    try:
        data = parse_json(read_bounded(Path(path)))  # /dev/zero is refused, not read to the end
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
    problem = sweep_problem(data)
    if problem:
        raise UsageError(f"{path}: not a valid lossaudit sweep: {problem}")
    return data


ROW_TEXT = ("model_type", "task", "path")


def sweep_problem(data: dict) -> str | None:
    """The first field of a sweep.json that the comparison could not use, else None."""
    for key in ("environment", "settings"):
        if key in data and not isinstance(data[key], dict):
            return f"{key!r} is {json.dumps(data[key])[:40]}, not an object"
    transformers = data.get("environment", {}).get("transformers")
    if transformers is not None and not isinstance(transformers, str):
        return f"'environment.transformers' is {json.dumps(transformers)[:40]}, not a string"
    types = data.get("settings", {}).get("types")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        return f"'settings.types' is {json.dumps(types)[:40]}, not a list of model types"
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            return f"row {i + 1}: {json.dumps(row)[:40]}, not an object"
        for key in ROW_TEXT:
            if not isinstance(row.get(key), str):
                return f"row {i + 1}: {key!r} is {json.dumps(row.get(key))[:40]}, not a string"
        if row.get("status") not in STATUSES:
            return f"row {i + 1}: 'status' is {json.dumps(row.get('status'))[:40]}, not one of {', '.join(STATUSES)}"
        if row.get("reason") is not None and not isinstance(row["reason"], str):
            return f"row {i + 1}: 'reason' is {json.dumps(row['reason'])[:40]}, not a string"
    return None


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
    added: dict[Key, str]  # key -> status in NEW, for a type OLD's sweep covered and did not hold
    removed: dict[Key, str]  # key -> status in OLD, for a type NEW's sweep covered and did not hold
    unchanged: int
    settings: list[str]  # settings that differ, "paths: [...] -> [...]"
    # types one sweep did not cover (restricted with --types or --task): side -> (why, {key: status})
    uncovered: dict[str, tuple[str, dict[Key, str]]] = field(default_factory=dict)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changed if c.regression]

    @property
    def exit_status(self) -> int:
        return 1 if self.regressions else 0


SETTINGS_COMPARED = ("tasks", "paths", "types", "microbatches", "groupings", "paddings", "diagnostic")
NAMED = 5  # types named in a restriction; the rest are counted


def compare_sweeps(old: dict, new: dict, *, old_name: str = "OLD", new_name: str = "NEW") -> SweepComparison:
    a, b = type_status(old["rows"]), type_status(new["rows"])
    changed, unchanged = [], 0
    for key in (k for k in a if k in b):
        if a[key]["status"] == b[key]["status"]:
            unchanged += 1
            continue
        changed.append(Change(key, a[key]["status"], b[key]["status"], _path_changes(a[key], b[key])))
    changed.sort(key=lambda c: (not c.regression, c.key))
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    settings = [f"{k}: {old_settings.get(k)} -> {new_settings.get(k)}" for k in SETTINGS_COMPARED
                if old_settings.get(k) != new_settings.get(k)]
    added = {k: b[k]["status"] for k in sorted(b) if k not in a}
    removed = {k: a[k]["status"] for k in sorted(a) if k not in b}
    uncovered = {}
    for side, sweep, missing, own, other in (("NEW", new, removed, set(b), set(a)), ("OLD", old, added, set(a), set(b))):
        why, keys = _restriction(sweep.get("settings", {}), missing, own, other)
        if keys:
            uncovered[side] = (why, {k: missing.pop(k) for k in keys})
    return SweepComparison(
        old_name, new_name,
        (old.get("environment", {}).get("transformers"), new.get("environment", {}).get("transformers")),
        changed, added, removed, unchanged, settings, uncovered)


def _restriction(settings: dict, missing: dict[Key, str], own: set[Key], other: set[Key]) -> tuple[str, list[Key]]:
    """Why a sweep lacks the ``missing`` types of the other one when it did not sweep them at all
    (--types, or another --task), and which those are; the rest are types it truly lacks."""
    tasks, types = settings.get("tasks"), settings.get("types")
    if isinstance(types, list):
        shown = ",".join(types[:NAMED]) + (f",... ({len(types)} types)" if len(types) > NAMED else "")
        return f"was restricted with --types {shown}", list(missing)
    unswept = [k for k in missing if isinstance(tasks, list) and k[1] not in tasks]
    if unswept:
        return f"swept only --task {','.join(tasks)}", unswept
    if "types" not in settings and own < other and len(own) <= len(other) / 2:  # a sweep too old to record --types
        return f"holds only {len(own)} of the other sweep's {len(other)} types (restricted with --types?)", list(missing)
    return "", []


def _path_changes(old: dict, new: dict) -> list[str]:
    lines = []
    for path in dict.fromkeys([*old["paths"], *new["paths"]]):
        was, now = old["paths"].get(path, ("-", "")), new["paths"].get(path, ("-", ""))
        if was[0] != now[0]:
            why = now[1] or was[1]
            lines.append(f"{path}: {was[0]} -> {now[0]}" + (f" ({why[:200]})" if why else ""))
    return lines


def summary_line(c: SweepComparison) -> str:
    line = (f"{len(c.regressions)} regression(s) (pass -> finding), {len(c.changed)} status change(s), "
            f"{len(c.added)} new, {len(c.removed)} removed, {c.unchanged} unchanged")
    for side, (_, keys) in c.uncovered.items():
        line += f", {len(keys)} not swept in {side}"
    return line


def render(c: SweepComparison) -> str:
    """Summary first (the counts, what a restricted sweep did not cover, settings that differ),
    then the changes type by type."""
    out = [f"lossaudit compare (sweeps): OLD {c.old_name} (transformers {c.versions[0]}), "
           f"NEW {c.new_name} (transformers {c.versions[1]})", summary_line(c)]
    for side, (why, keys) in c.uncovered.items():
        other, kind = ("OLD", "removed") if side == "NEW" else ("NEW", "new")
        out.append(f"  {side} {why}: {len(keys)} type(s) of {other} were not swept in {side}, "
                   f"so they are not compared (nor counted as {kind})")
    if c.settings:
        out.append("  settings differ: " + "; ".join(c.settings))
    out.append("")
    out.append(f"status changed ({len(c.changed)}):" if c.changed else "status changed: none")
    for change in c.changed:
        flag = "REGRESSION: " if change.regression else ""
        out.append(f"  {flag}{change.key[0]} ({change.key[1]}): {change.old} -> {change.new}")
        out += [f"      {line}" for line in change.paths]
    for title, types in (("new types", c.added), ("removed types", c.removed)):
        out.append(f"{title} ({len(types)}):" if types else f"{title}: none")
        out += [f"  {t} ({task}): {status}" for (t, task), status in types.items()]
    return "\n".join(out)


def run(old_path: Path, new_path: Path) -> int:
    """``compare`` on two sweeps: print the change list, exit 1 on a pass -> finding."""
    comparison = compare_sweeps(load(old_path), load(new_path), old_name=str(old_path), new_name=str(new_path))
    print(render(comparison))
    return comparison.exit_status
