"""The CLI as a user meets it: exit statuses, one-line errors, report files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run([sys.executable, "-m", "lossaudit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def assert_usage_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lossaudit: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_check_writes_the_report_and_exits_0(tmp_path):
    result = run("check", "llama", "--microbatches", "2", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["schema"] == "lossaudit.report/1" and report["cases"]
    assert (tmp_path / "r" / "cases.csv").exists() and (tmp_path / "r" / "report.md").exists()
    assert (tmp_path / "r" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "no findings" in result.stdout and "k=2" in result.stdout


def test_a_finding_exits_1_and_is_printed_first(tmp_path):
    result = run("check", "llama", "--microbatches", "4", "--reductions", "num_items,planted:nanogpt",
                 "--path", "reduction", "--out", str(tmp_path / "r"))
    assert result.returncode == 1, result.stderr
    assert "FINDING" in result.stdout and "planted:nanogpt" in result.stdout


def test_existing_report_is_never_replaced_silently(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert_usage_error(run("check", "llama", "--out", str(out)), "--overwrite")
    assert (out / "report.json").read_text() == "{}"


def test_default_out_goes_beside_an_earlier_report(tmp_path):
    for expected in ("llama-causal-lm", "llama-causal-lm-2"):
        result = run("check", "llama", "--microbatches", "2", "--path", "model", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "reports" / expected / "report.json").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["check", "lama"], "did you mean 'llama'"),
        (["check", "llama", "--microbatches", "0"], "--microbatches 0"),
        (["check", "llama", "--microbatches", "9"], "batch size"),
        (["check", "llama", "--dtype", "f32"], "--dtype"),
        (["check", "llama", "--path", "modle"], "did you mean 'model'"),
        (["check", "llama", "--task", "vision"], "--task"),
        (["check", "llama", "--groupings", "sorted"], "unknown grouping 'sorted'"),
        (["check", "llama", "--paddings", "middle"], "unknown padding 'middle'"),
        (["check", "llama", "--reductions", "mean_of_mean"], "did you mean 'mean_of_means'"),
        (["check", "llama", "--world-size", "0"], "--world-size"),
        (["frobnicate"], "invalid choice"),
        ([], "missing command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    assert_usage_error(run(*args), needle)


def test_all_argument_problems_are_reported_at_once():
    result = run("check", "llama", "--microbatches", "0", "--dtype", "f32", "--world-size", "0")
    assert_usage_error(result, "--microbatches 0", "--dtype", "--world-size")


def test_a_save_pretrained_directory_is_audited(tmp_path):
    from lossaudit.models import load_model

    load_model("gpt2").model.save_pretrained(tmp_path / "m")
    result = run("check", str(tmp_path / "m"), "--microbatches", "2", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["model"]["task"] == "causal-lm"


def test_a_directory_without_config_is_a_usage_error(tmp_path):
    assert_usage_error(run("check", str(tmp_path)), "no config.json")


def test_paddings_and_groupings_choose_the_layouts(tmp_path):
    result = run("check", "llama", "--microbatches", "2", "--path", "reduction", "--paddings", "left",
                 "--groupings", "imbalanced,contiguous", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    cases = json.loads((tmp_path / "r" / "report.json").read_text())["cases"]
    assert {c["padding"] for c in cases} == {"left"}
    assert {c["grouping"] for c in cases} == {"imbalanced", "contiguous"}
