"""Whether two reports measured the same thing, so that their errors can be compared at all.

Two audits are like for like when they ran the same model and task, judged the same objective
(token cross entropy, or with label smoothing 0.1, ...), on the same batch (seed, sequences,
lengths, target tokens), cut into the same layouts (the target tokens of every microbatch of a
case both reports hold). Anything else (releases, device, dtype, tolerance) is what a
comparison is *for*, and is shown as an environment change.

A field only one report records (a report of an older lossaudit) cannot be checked, and is not
held against the comparison.
"""

from __future__ import annotations

import math

import pandas as pd

from ..report.report import Report

ALLOW = "--allow-different-batch"
SHOWN_LAYOUTS = 2  # layouts named in the line; the rest are counted


def differences(old: Report, new: Report, cases: pd.DataFrame | None = None) -> list[str]:
    """What makes ``old`` and ``new`` not like for like, one phrase each ("seed: 0 in OLD, 1 in
    NEW"); empty when they are. ``cases``: the joined cases (with ``tokens_old`` and
    ``tokens_new``) whose layouts are compared once the batch is the same."""
    found = [d for d in (_model(old, new), _field("objective", _objective(old), _objective(new)),
                         _field("seed", old.environment.get("seed"), new.environment.get("seed"))) if d]
    batch = _batch(old.batch, new.batch)
    found += batch
    if not batch and cases is not None:  # a different batch cuts into different layouts anyway
        found += _layouts(cases)
    return found


def planned_differences(baseline: Report, *, model: str, task: str | None, objective: str, seed: int,
                        sequences: int) -> list[str]:
    """What an audit with these settings would differ from ``baseline`` by, known before it runs
    (``check --baseline`` refuses then, not after the audit)."""
    planned = Report({"seed": seed}, {"name": model, "task": task or baseline.model.get("task")}, pd.DataFrame(),
                     batch={"objective": objective, "sequences": sequences})
    return differences(baseline, planned)


def refusal(found: list[str]) -> str:
    return (f"OLD and NEW did not audit the same thing, so their errors do not compare: {'; '.join(found)} "
            f"(pass {ALLOW} to compare them anyway)")


def note(found: list[str]) -> str:
    """The line every table of an allowed comparison starts with."""
    return f"NOT LIKE FOR LIKE ({ALLOW}): {'; '.join(found)}"


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _field(what: str, old, new) -> str | None:
    if _known(old) and _known(new) and old != new:
        return f"{what}: {old!r} in OLD, {new!r} in NEW" if isinstance(old, str) else f"{what}: {old} in OLD, {new} in NEW"
    return None


def _model(old: Report, new: Report) -> str | None:
    def name(report: Report):
        model = report.model
        return None if model.get("name") is None else f"{model.get('name')} ({model.get('task')})"

    return _field("model", name(old), name(new))


def _objective(report: Report):
    objective = report.batch.get("objective")
    return objective if isinstance(objective, str) else None


def _batch(old: dict, new: dict) -> list[str]:
    found = [d for d in (_field("batch sequences", old.get("sequences"), new.get("sequences")),
                         _field("batch target tokens", old.get("target_tokens"), new.get("target_tokens"))) if d]
    if found:
        return found
    for key, what in (("lengths", "sequence lengths"), ("targets", "target tokens per sequence")):
        a, b = old.get(key), new.get(key)
        if _known(a) and _known(b) and list(a) != list(b):
            return [f"batch: the {what} differ ({_short(a)} in OLD, {_short(b)} in NEW)"]
    return []


def _layouts(cases: pd.DataFrame) -> list[str]:
    if "tokens_old" not in cases or "tokens_new" not in cases:
        return []
    differ = [row for row in cases.to_dict(orient="records")
              if row["side"] == "both" and _tokens(row["tokens_old"]) is not None
              and _tokens(row["tokens_new"]) is not None and _tokens(row["tokens_old"]) != _tokens(row["tokens_new"])]
    if not differ:
        return []
    named = [f"{case_label(r)} holds {_short(r['tokens_old'])} target tokens per microbatch in OLD, "
             f"{_short(r['tokens_new'])} in NEW" for r in differ[:SHOWN_LAYOUTS]]
    more = f" (and {len(differ) - SHOWN_LAYOUTS} more case(s))" if len(differ) > SHOWN_LAYOUTS else ""
    return [f"layouts: {', '.join(named)}{more}"]


def case_label(row: dict) -> str:
    """A joined case as people read it: ``model k=4 contiguous pad-right``."""
    what = row["path"] + (f":{row['reduction']}" if row["reduction"] else "")
    ranks = f" ranks={row['world_size']}" if row["world_size"] != 1 else ""
    return f"{what} k={row['microbatches']} {row['grouping']} pad-{row['padding']}{ranks}"


def _tokens(value) -> tuple | None:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return tuple(value.tolist()) if hasattr(value, "tolist") else None


def _short(values, shown: int = 6) -> str:
    values = list(values)
    return "[" + ", ".join(str(v) for v in values[:shown]) + (", ...]" if len(values) > shown else "]")
