"""``history``'s table: release x path -> verdict, worst error and cause, as md/csv/json.

A path's verdict over its audited cases (the harness's known-different reductions left out):
``error`` if any case could not run, else ``diverge`` if any diverges, else ``match``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..report.render import markdown_table, write_files
from ..report.report import Report, _json_value

SCHEMA = "lossaudit.history/1"
COLUMNS = ["release", "path", "verdict", "findings", "cases", "grad_rel_err", "loss_rel_err", "worst_layout",
           "cause", "environment"]
FILES = ("history.json", "history.csv", "history.md")


@dataclass
class History:
    model: str
    command: str
    rows: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, release: str, side, status: int | None, problem: str | None) -> None:
        """One release's rows: one per audited path, or one ``error`` row saying why none ran."""
        if problem is not None:
            self.rows.append(_row(release, "-", "error", cause=problem))
            return
        report = Report.load(side.out / "report.json")
        installed = report.environment.get("transformers")
        if installed != release:  # an environment that is not what it says: never table it as the release
            self.rows.append(_row(release, "-", "error", cause=f"the audit ran on transformers {installed}"))
            return
        where = "current" if side.env is None else side.env.path.name
        for name, version in (side.env.manifest.get("lifted_versions", {}) if side.env else {}).items():
            self.notes.append(f"transformers {release}: {name} {version} (the release requires it)")
        for path in dict.fromkeys(report.cases["path"]):
            self.rows.append(path_row(release, path, report.cases[report.cases["path"] == path], where))

    @property
    def exit_status(self) -> int:
        if any(r["path"] == "-" for r in self.rows):
            return 3
        return 1 if any(r["findings"] for r in self.rows) else 0

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def markdown_table(self) -> str:
        shown = self.frame().drop(columns=["environment"]).astype(object)
        return markdown_table(shown.where(shown.notna(), None))


def path_row(release: str, path: str, cases: pd.DataFrame, environment: str) -> dict:
    audited = cases[~cases["expected"].fillna(False).astype(bool)]
    bad = audited[audited["verdict"] != "match"]
    verdict = ("error" if (audited["verdict"] == "error").any() else "diverge" if len(bad)
               else "match" if len(audited) else "expected")
    grads = pd.to_numeric(audited["grad_rel_err"], errors="coerce")
    worst = (bad if len(bad) else audited).assign(_g=grads.fillna(math.inf)).sort_values("_g", ascending=False)
    case = worst.iloc[0] if len(worst) else None
    return _row(release, path, verdict, findings=len(bad), cases=len(cases),
                grad_rel_err=_num(grads.max()), loss_rel_err=_num(pd.to_numeric(audited["loss_rel_err"],
                                                                                errors="coerce").max()),
                worst_layout=None if case is None else f"k={case['microbatches']} {case['grouping']} pad-{case['padding']}",
                cause=(" ".join(str(case["detail"] or "").split())[:300] or None) if len(bad) else None,
                environment=environment)


def _row(release: str, path: str, verdict: str, **fields) -> dict:
    row = {**dict.fromkeys(COLUMNS), "findings": 0, "cases": 0, **fields}
    row.update(release=release, path=path, verdict=verdict)
    return row


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def render_json(history: History) -> str:
    data = {"schema": SCHEMA, "model": history.model, "command": history.command, "wall_s": history.wall_s,
            "notes": history.notes, "rows": [{k: _json_value(v) for k, v in r.items()} for r in history.rows]}
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def render_markdown(history: History) -> str:
    lines = [f"# lossaudit history: {history.model}", "", f"Made by `{history.command}` "
             f"in {history.wall_s:.0f} s; each release in its own environment (the installed release in the current one).",
             "", history.markdown_table(), ""]
    if history.notes:
        lines += ["Releases that moved other packages too:", "", *[f"- {n}" for n in history.notes], ""]
    return "\n".join(lines)


def write_history(history: History, out: Path) -> list[Path]:
    return write_files(out, {"history.json": render_json, "history.csv": lambda h: h.frame().to_csv(index=False),
                             "history.md": render_markdown}, history, "history")
