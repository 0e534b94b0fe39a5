"""``report.html``: one self-contained file (inline CSS, plots as base64 PNG) that a person
opens in a browser. Every string taken from the report goes through ``html.escape``: model
names, reduction names and details come from users and model directories."""

from __future__ import annotations

import base64
import html
import math

import pandas as pd

from . import plots
from .report import SUMMARY_COLUMNS, Report, _fmt, describe, summary_frame

VERDICT_CLASSES = {"match", "diverge", "error"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; }
td.match { color: #116611; } td.diverge { color: #b00000; font-weight: bold; } td.error { color: #8a5a00; font-weight: bold; }
.banner { padding: 0.6em 1em; border-radius: 4px; font-weight: bold; }
.banner.clean { background: #e6f4e6; } .banner.findings { background: #fbe3e3; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; }
"""


def esc(value) -> str:
    return html.escape(_fmt(value), quote=True)


def html_table(frame: pd.DataFrame) -> str:
    """A table with every header and cell escaped; a ``verdict`` column is coloured."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            css = f' class="{value}"' if column == "verdict" and value in VERDICT_CLASSES else ""
            cells.append(f"<td{css}>{esc(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def layouts_frame(report: Report) -> pd.DataFrame:
    """One row per distinct microbatch split: target tokens and token-mean loss per microbatch."""
    cases = report.cases
    if "microbatch_losses" not in cases:
        cases = cases.assign(microbatch_losses=None)
    first = cases.drop_duplicates(["microbatches", "grouping"])
    return pd.DataFrame({
        "microbatches": first["microbatches"],
        "grouping": first["grouping"],
        "tokens": first["tokens"],
        "imbalance": first["tokens"].map(lambda t: plots.imbalance(t) if _is_list(t) else math.nan),
        "token-mean loss per microbatch": first["microbatch_losses"].map(_losses),
    })


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0


def _losses(values) -> str:
    if not _is_list(values):
        return ""
    return "[" + ", ".join("nan" if v is None or not math.isfinite(v) else f"{v:.4f}" for v in values) + "]"


def plot_sections(report: Report) -> list[str]:
    """The plots, each with a heading and a sentence on how to read it."""
    try:
        import matplotlib  # noqa: F401  (a dependency; without it the tables still render)
    except ImportError:
        return ['<p class="note">The plots need matplotlib: pip install matplotlib.</p>']
    cases = report.cases
    out = ["<h2>Gradient error against token-count imbalance</h2>",
           '<p class="note">Each point is a layout; a reduction that weighs every token the same stays at '
           "the noise floor however unevenly the target tokens fall into microbatches.</p>"]
    if cases["tokens"].map(_is_list).all() and len(cases):
        out.append(image(plots.error_vs_imbalance(cases, report.tolerance.get("rtol")),
                         "gradient error against token-count imbalance"))
    for entry in report.tensor_errors:
        kind = "expected difference" if entry.get("expected") else "worst finding"
        out.append(f"<h2>Per-tensor gradient error: {esc(kind)}, {esc(plots.case_title(entry))}</h2>")
        out.append(image(plots.tensor_errors(entry), f"per-tensor error of {plots.case_title(entry)}"))
    out += microbatch_section(report)
    return out


def microbatch_section(report: Report) -> list[str]:
    """Tokens and losses per microbatch for the layout of the worst case (else the most uneven)."""
    cases = report.cases
    if "microbatch_losses" not in cases or not len(cases) or not cases["tokens"].map(_is_list).all():
        return []
    if report.tensor_errors:
        worst = report.tensor_errors[0]
        pick = cases[(cases["microbatches"] == worst["microbatches"]) & (cases["grouping"] == worst["grouping"])]
    else:
        pick = cases.iloc[[cases["tokens"].map(plots.imbalance).fillna(-1).argmax()]]
    row = pick.iloc[0] if len(pick) else cases.iloc[0]
    title = f"k={row['microbatches']} {row['grouping']}"
    png = plots.microbatch_tokens_and_losses(row["tokens"], row["microbatch_losses"],
                                             report.batch.get("reference_loss"), title)
    return [f"<h2>Target tokens and loss per microbatch: {esc(title)}</h2>",
            '<p class="note">mean_of_means averages these per-microbatch losses with equal weight, so a '
            "token in a small microbatch counts more than one in a large microbatch.</p>",
            image(png, f"tokens and losses per microbatch, {title}")]


def render_html(report: Report) -> str:
    title, environment, reference = describe(report)
    findings = report.worst_first(report.findings)
    banner = (f'<p class="banner findings">{len(findings)} finding(s)</p>' if len(findings)
              else '<p class="banner clean">No findings: every audited case matches the reference.</p>')
    summary = summary_frame(report).reset_index().rename(columns={"label": "path:reduction"})
    body = [
        f"<h1>{esc(title)}</h1>", f"<p>{esc(environment)}</p>", f"<p>{esc(reference)}</p>", banner,
        "<h2>Worst gradient relative error per path and k</h2>", html_table(summary),
        "<h2>Findings</h2>",
        html_table(findings[SUMMARY_COLUMNS + ["detail"]]) if len(findings) else "<p>None.</p>",
        *plot_sections(report),
        "<h2>Microbatches of each layout</h2>", html_table(layouts_frame(report)),
        "<h2>All cases</h2>", html_table(report.worst_first()[SUMMARY_COLUMNS + ["expected", "detail"]]),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
