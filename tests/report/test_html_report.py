"""report.html: escaped, self-contained, with its plots, and rendered by a real browser."""

import json
import math
import re
import shutil
import subprocess

import pandas as pd
import pytest
import torch

import lossaudit
from lossaudit.core.grads import compare_grads
from lossaudit.report.html_report import render_html
from lossaudit.core.layouts import Layout, group, microbatches
from lossaudit.report.plots import imbalance
from lossaudit.report.render import write_report
from lossaudit.report.report import CASE_COLUMNS, Report
from lossaudit.core.tokens import count_targets, token_losses

from toy import toy_batch, toy_context

EVIL = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def finding_report():
    """A planted nanoGPT-style bug (a finding) and an empty microbatch at k=8 (NaN losses)."""
    return lossaudit.check("llama", microbatches=[4, 8], paths=["reduction"], empty_sequences=1,
                           reductions=["num_items", "mean_of_means", "planted:nanogpt"], groupings=["imbalanced"])


def _planted_report() -> Report:
    row = {c: None for c in CASE_COLUMNS}
    row.update(path="reduction", reduction=f"evil$<b>{EVIL}", microbatches=2, padding="right",
               grouping="contiguous", world_size=1, tokens=[3, 5], loss=1.0, reference_loss=1.0,
               loss_rel_err=0.5, grad_rel_err=0.5, grad_cosine=0.9, verdict="diverge", expected=False,
               detail=f"detail {EVIL} <img src=x onerror=alert(1)>", microbatch_losses=[1.0, float("nan")])
    tensors = {"path": "reduction", "reduction": EVIL, "microbatches": 2, "grouping": "contiguous",
               "padding": "right", "world_size": 1, "verdict": "diverge", "expected": False,
               "tensors": [[f"layer.{EVIL}$x$", 0.5], ["ok.weight", 0.0]]}
    return Report({"torch": EVIL}, {"name": EVIL, "task": "causal-lm", "parameters": 1}, pd.DataFrame([row]),
                  {"rtol": 1e-5, "noise_floor": 0.0, "floor": 1e-5}, {"reference_loss": 1.0, "target_tokens": 8},
                  [tensors])


def test_everything_taken_from_the_report_is_escaped():
    page = render_html(_planted_report())
    assert "<script" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # the name with "$" went through matplotlib as text: three plots were drawn
    assert page.count('<img alt="') == 3


def test_without_matplotlib_the_tables_still_render(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import raises ImportError
    page = render_html(_planted_report())
    assert "<img" not in page and "need matplotlib" in page and "<table>" in page


def test_the_page_is_self_contained(finding_report):
    page = render_html(finding_report)
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    # error vs imbalance, one per-tensor plot per kept case, tokens and losses per microbatch
    assert len(sources) == 2 + len(finding_report.tensor_errors)


def test_worst_finding_keeps_its_per_tensor_errors(finding_report):
    # the k=8 finding is NaN (an empty microbatch): per-tensor errors would all be NaN, so the
    # worst finding with a finite gradient error is the one kept
    findings = finding_report.findings
    assert findings["grad_rel_err"].isna().any()
    finding = finding_report.worst_first(findings.dropna(subset=["grad_rel_err"])).iloc[0]
    kept = finding_report.tensor_errors[0]
    assert (kept["reduction"], kept["microbatches"]) == (finding["reduction"], finding["microbatches"])
    assert kept["reduction"] == "planted:nanogpt" and not kept["expected"]
    names = [name for name, _ in kept["tensors"]]
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" in names
    worst_name, worst = max(kept["tensors"], key=lambda t: t[1])
    assert worst_name == finding["worst_param"] and worst == pytest.approx(finding["worst_param_rel_err"])
    # only the worst cases carry tensors: the finding and one expected difference
    assert [e["expected"] for e in finding_report.tensor_errors] == [False, True]


def test_report_with_nan_microbatch_losses_round_trips_through_json(finding_report, tmp_path):
    k8 = finding_report.cases.query("microbatches == 8").iloc[0]
    assert 0 in k8["tokens"] and any(math.isnan(v) for v in k8["microbatch_losses"])
    written = write_report(finding_report, tmp_path)
    assert [p.name for p in written] == ["report.json", "cases.csv", "report.md", "report.html"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["tensor_errors"][0]["tensors"][0][0] == "model.embed_tokens.weight"
    again = Report.from_dict(data)
    assert again.tensor_errors == data["tensor_errors"]
    assert "<img" in render_html(again)


def test_per_tensor_errors_are_plain_relative_errors():
    reference = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 2.0]), "c": torch.zeros(2)}
    got = [("a", torch.tensor([3.0, 4.0])), ("b", torch.tensor([1.0, 2.0])), ("c", torch.ones(2))]
    diff = compare_grads(reference, got)
    assert diff.per_tensor == (("a", 0.0), ("b", 0.5), ("c", math.inf))
    assert (diff.worst_param, diff.worst_rel_err) == ("c", math.inf)


def test_microbatch_losses_are_each_microbatch_token_mean():
    batch = toy_batch([9, 3, 7, 2, 5], [1, 2, 4, 1, 5])  # the last sequence has no target
    ctx = toy_context(batch)
    layout = Layout(3, "contiguous", "left", group(batch, 3, "contiguous"))
    want = []
    for mb in microbatches(batch, layout):
        with torch.no_grad():
            losses = token_losses(ctx.model(mb.input_ids).logits, mb.labels, "causal-lm")
        n = count_targets(mb.labels, "causal-lm")
        want.append(float(losses.sum()) / n if n else math.nan)
    got = ctx.reference.microbatch_losses(batch, layout)
    assert got[:2] == pytest.approx(want[:2], rel=1e-12) and math.isnan(got[2]) == math.isnan(want[2])


def test_imbalance_is_std_over_mean():
    assert imbalance([5, 5, 5]) == 0.0
    assert imbalance([1, 3]) == pytest.approx(0.5)  # std 1, mean 2
    assert imbalance([0, 4]) == pytest.approx(1.0)


def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium installed")
def test_headless_chromium_renders_the_tables_and_the_plots(finding_report, tmp_path):
    from PIL import Image

    write_report(finding_report, tmp_path / "r")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,2200", f"--screenshot={shot}"]
    url = (tmp_path / "r" / "report.html").as_uri()
    done = subprocess.run([_browser(), *flags, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    dom = subprocess.run([_browser(), *flags[:-2], "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "planted:nanogpt" in dom.stdout and "Per-tensor gradient error" in dom.stdout
    pixels = Image.open(shot).convert("RGB").getdata()
    # matplotlib's first line colour (#1f77b4) and the finding's bars (#d62728) exist only in
    # the plots: seeing them means the inline PNGs were decoded and painted
    for colour in ((31, 119, 180), (214, 39, 40)):
        assert sum(1 for p in pixels if p == colour) > 200, colour
