"""A sweep rendered: ``sweep.json`` (schema ``lossaudit.sweep/1``), ``sweep.csv``, ``sweep.md``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..report.render import markdown_table, write_files
from ..report.report import _json_value
from .run import FINDING, PASS, ROW_COLUMNS, SKIP, Sweep

FILES = ("sweep.json", "sweep.csv", "sweep.md")
TASK_NOUN = {"causal-lm": "causal-LM", "seq2seq": "seq2seq", "token-classification": "token-classification",
             "sequence-classification": "sequence-classification"}


def frame(sweep: Sweep) -> pd.DataFrame:
    return pd.DataFrame(sweep.rows, columns=ROW_COLUMNS)


def headline(sweep: Sweep, task: str) -> str:
    c = sweep.counts(task)
    audited = c[PASS] + c[FINDING]
    share = f"{100 * audited / c['types']:.1f}" if c["types"] else "0"
    findings = sorted({r["model_type"] for r in sweep.findings if r["task"] == task})
    return (f"{TASK_NOUN[task]}: {c['types']} model types, {audited} audited ({share}%): "
            f"{c[PASS]} pass, {c[FINDING]} with findings, {c[SKIP]} skipped"
            + (f". Findings: {', '.join(findings)}" if findings else ""))


def render_json(sweep: Sweep) -> str:
    data = sweep.to_dict()
    data["rows"] = [{k: _json_value(v) for k, v in row.items()} for row in data["rows"]]
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def render_markdown(sweep: Sweep) -> str:
    env, rows = sweep.environment, frame(sweep)
    s = sweep.settings
    out = [
        f"# lossaudit sweep: transformers {env.get('transformers')}",
        "",
        f"torch {env.get('torch')}, python {env.get('python')}, {env.get('device')} {env.get('dtype')}, "
        f"seed {env.get('seed')}. Every model type of each task's auto mapping, built tiny from its default "
        f"config; layouts k={','.join(map(str, s['microbatches']))}, {'/'.join(s['groupings'])} grouping, "
        f"padded {'/'.join(s['paddings'])}; paths {', '.join(s['paths'])}. {s['jobs']} worker(s), "
        f"{s['timeout_s']:.0f} s and {s['memory_mib']} MiB per model; wall time {s.get('wall_s', 0):.0f} s.",
        "",
        *[f"- {headline(sweep, task)}" for task in sweep.to_dict()["summary"]],
        "",
        "A finding's `cause`: `padding-sensitive` when lossaudit's own correct reduction of the model's logits",
        "diverges as well (the model's outputs depend on padding or grouping, so no loss can match);",
        "`loss-definition` when the path's step differs from the token mean already on the full batch (the",
        "model's loss on the model path; on the trainer path the reason names what the Trainer did);",
        "`loss-reduction` when it matches on the full batch but not when accumulated over microbatches.",
        "",
    ]
    for title, status, columns in (
        ("Findings", FINDING, ["model_type", "task", "path", "cause", "grad_rel_err", "reason", "note"]),
        ("Skipped", SKIP, ["model_type", "task", "path", "reason"]),
        ("Passed", PASS, ["model_type", "task", "path", "grad_rel_err", "rtol", "parameters", "seconds"]),
    ):
        chosen = rows[rows["status"] == status].astype(object).where(lambda f: f.notna(), None)
        out += [f"## {title} ({len(chosen)})", "", markdown_table(chosen[columns]) if len(chosen) else "None.", ""]
    return "\n".join(out)


RENDERERS = {
    "sweep.json": render_json,
    "sweep.csv": lambda sweep: frame(sweep).to_csv(index=False),
    "sweep.md": render_markdown,
}


def write_sweep(sweep: Sweep, out: Path) -> list[Path]:
    return write_files(out, RENDERERS, sweep, "sweep")
