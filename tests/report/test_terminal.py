"""The terminal summary: colour on a terminal only, the same text either way."""

import io
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lossaudit.report.report import CASE_COLUMNS, Report
from lossaudit.report.terminal import print_summary, summary, use_color

ROOT = Path(__file__).resolve().parents[2]
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _report() -> Report:
    rows = []
    for reduction, err, verdict, expected in (("num_items", 1e-7, "match", False),
                                              ("mean_of_means", 0.4, "diverge", True),
                                              ("[bold]mine[/bold]", 0.2, "diverge", False)):
        row = {c: None for c in CASE_COLUMNS}
        row.update(path="reduction", reduction=reduction, microbatches=4, padding="right", grouping="contiguous",
                   world_size=1, tokens=[1, 3, 5, 7], loss_rel_err=err, grad_rel_err=err, verdict=verdict,
                   expected=expected, worst_param="w", detail="[red]not markup[/red] :smile:")
        rows.append(row)
    return Report({}, {"name": "[m]", "task": "causal-lm", "parameters": 1234}, pd.DataFrame(rows),
                  {"rtol": 1e-5, "noise_floor": 1e-7})


@pytest.mark.parametrize("tty, flag, env, want", [
    (True, True, {}, True),
    (False, True, {}, False),  # piped or redirected
    (True, False, {}, False),  # --no-color
    (True, True, {"NO_COLOR": "1"}, False),
    (True, True, {"TERM": "dumb"}, False),
])
def test_colour_only_on_a_terminal_and_never_when_asked_not_to(monkeypatch, tty, flag, env, want):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert use_color(Stream(tty), flag) is want


def test_coloured_summary_is_the_plain_summary_plus_colour():
    report = _report()
    coloured, plain = Stream(True), Stream(False)
    print_summary(report, [], color=True, stream=coloured)
    print_summary(report, [], color=False, stream=plain)
    assert plain.getvalue() == summary(report, []) + "\n"
    assert COLOUR.search(coloured.getvalue())
    assert COLOUR.sub("", coloured.getvalue()) == plain.getvalue()
    # names and details are text, never rich markup or emoji codes
    assert "[bold]mine[/bold]" in plain.getvalue() and "[red]not markup[/red] :smile:" in plain.getvalue()
    assert "1 FINDING(S)" in plain.getvalue()


SHOW = """
import sys
from lossaudit.report.report import Report
from lossaudit.report.terminal import print_summary, progress, use_color

report = Report.load(sys.argv[1])
with progress(color=use_color(sys.stderr), stream=sys.stderr) as say:
    say("building"); say("[1/2] k=2 contiguous pad-right"); say("[2/2] k=4 contiguous pad-right")
print_summary(report, [], color=use_color(sys.stdout))
"""


def _on_a_pty(tmp_path, **env) -> str:
    """Show a report with stdout and stderr on a pseudo-terminal, as a person's shell would."""
    (tmp_path / "report.json").write_text(json.dumps(_report().to_dict()))
    master, slave = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    environ.update(PYTHONPATH=str(ROOT), TERM="xterm", **env)
    proc = subprocess.Popen([sys.executable, "-c", SHOW, str(tmp_path / "report.json")],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=environ, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    output = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=120) == 0, output
    return output


def test_a_terminal_gets_colour_and_no_color_gets_plain_text(tmp_path):
    coloured = _on_a_pty(tmp_path)
    assert COLOUR.search(coloured) and "1 FINDING(S)" in COLOUR.sub("", coloured)
    plain = _on_a_pty(tmp_path, NO_COLOR="1")
    assert not COLOUR.search(plain)
    assert summary(_report(), []).splitlines()[-1] in plain


def test_check_takes_no_color():
    from lossaudit.cli.app import build_parser

    assert build_parser().parse_args(["check", "llama", "--no-color"]).color is False
    assert build_parser().parse_args(["check", "llama"]).color is True


def test_every_path_and_k_keeps_a_line_k1_included():
    """Twelve findings at k=4 outrank the k=1 ones: each (path, k) still gets its line, with how
    many of its layouts diverge, and nothing is cut ("... and N more" hid k=1's evidence)."""
    rows = []
    for path, k, grouping, err in ([("step", 4, g, 0.5 + i / 100) for i, g in enumerate(["a", "b", "c"] * 4)]
                                   + [("step", 1, "contiguous", 0.003), ("loss-fn", 1, "contiguous", 0.002),
                                      ("loss-fn", 2, "contiguous", 1e-9)]):
        row = {c: None for c in CASE_COLUMNS}
        row.update(path=path, reduction=None, microbatches=k, padding="right", grouping=grouping, world_size=1,
                   tokens=[1], loss_rel_err=err, grad_rel_err=err, verdict="diverge" if err > 1e-5 else "match",
                   expected=False, worst_param="w", detail=f"detail {path} k={k}")
        rows.append(row)
    text = summary(Report({}, {"name": "m", "task": "causal-lm", "parameters": 1}, pd.DataFrame(rows),
                          {"rtol": 1e-5, "noise_floor": 1e-7}), [])
    lines = [line for line in text.splitlines() if line.startswith("  DIVERGE")]
    assert "14 FINDING(S)" in text and "more in the report" not in text
    assert [line.split(" (")[0].split()[-2:] for line in lines] == [["step", "k=1"], ["step", "k=4"], ["loss-fn", "k=1"]]
    assert "12 of 12 layouts; worst c pad-right" in lines[1] and "detail step k=1" in lines[0]
