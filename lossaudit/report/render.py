"""One report, several renderings: JSON (the contract), CSV, Markdown, HTML. A report directory
is written as one unit (lossaudit.report.outdir); other files are written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import html_report
from .outdir import write_dir, write_error
from .report import SUMMARY_COLUMNS, Report, describe, findings_table, markdown_table, summary_frame


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    os.replace(_stage(path, text), path)


def write_files(out: Path, renderers: dict, subject, what: str) -> list[Path]:
    """Every ``name: render(subject)`` into ``out``, all or none: each is rendered and staged
    in a temporary file in ``out`` first, then all are renamed into place, the first (the JSON
    others read) last. A failure before the renames leaves what ``out`` held untouched."""
    staged: dict[Path, Path] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        texts = {out / name: render(subject) for name, render in renderers.items()}
        for path, text in texts.items():
            staged[path] = _stage(path, text)
        for path in [*list(staged)[1:], *list(staged)[:1]]:
            os.replace(staged.pop(path), path)
    except OSError as exc:
        raise write_error(exc, out, what) from None
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return [out / name for name in renderers]


def _stage(path: Path, text: str) -> Path:
    """``text`` in a new temporary file beside ``path``, with the permissions open() would give
    (mkstemp makes 0600; a report is for others to read too)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def render_markdown(report: Report) -> str:
    title, environment, reference = describe(report)
    out = [
        f"# {title}",
        "",
        environment,
        "",
        reference,
        "",
        "## Worst gradient relative error per path and k",
        "",
        markdown_table(summary_frame(report).reset_index().rename(columns={"label": "path:reduction"})),
        "",
        "## Findings",
        "",
        findings_table(report) if len(report.findings) else "None: every audited case matches the reference.",
        "",
        "## All cases",
        "",
        markdown_table(report.worst_first()[SUMMARY_COLUMNS + ["expected", "detail"]]),
        "",
    ]
    return "\n".join(out)


def render_html(report: Report) -> str:
    return html_report.render_html(report)


RENDERERS = {
    "report.json": lambda r: json.dumps(r.to_dict(), indent=2, allow_nan=False) + "\n",
    "cases.csv": lambda r: r.cases.to_csv(index=False),
    "report.md": render_markdown,
    "report.html": render_html,
}


def write_report(report: Report, out: Path) -> list[Path]:
    """The report's files as the directory ``out``, replacing an earlier report as a whole."""
    return write_dir(out, RENDERERS, report, "report")
