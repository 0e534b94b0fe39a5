"""The sweep: its report, its exit status, and a crash, a hang or a memory hog that cost one
row each instead of the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lossaudit.sweep.run import NOT_AUDITABLE, Job, audit_model, plan_jobs

ROOT = Path(__file__).resolve().parents[2]


def sweep(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-m", "lossaudit", "sweep", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def rows_by_type(out: Path) -> dict:
    data = json.loads((out / "sweep.json").read_text())
    assert data["schema"] == "lossaudit.sweep/1"
    return {r["model_type"]: r for r in data["rows"]}


def test_a_sweep_writes_its_table_and_exits_1_on_a_finding(tmp_path):
    out = tmp_path / "s"
    result = sweep("--types", "llama,xlnet,musicgen", "--out", str(out), "--jobs", "2", "--path", "model")
    assert result.returncode == 1, result.stderr
    data = json.loads((out / "sweep.json").read_text())
    assert {"python", "torch", "transformers"} <= set(data["environment"])
    assert data["summary"]["causal-lm"] == {"pass": 1, "finding": 1, "skip": 1, "types": 3}
    rows = rows_by_type(out)
    need = {"model_type", "task", "path", "status", "reason", "grad_rel_err"}
    assert all(need <= set(r) for r in rows.values())
    assert rows["llama"]["status"] == "pass" and rows["llama"]["grad_rel_err"] < rows["llama"]["rtol"]
    # XLNet's LM head scores each label where it stands (no shift): not a causal-LM loss
    assert rows["xlnet"]["status"] == "finding" and rows["xlnet"]["cause"] == "loss-definition"
    assert rows["xlnet"]["reason"]
    assert rows["musicgen"]["status"] == "skip" and rows["musicgen"]["reason"] == NOT_AUDITABLE["musicgen"]
    assert "xlnet" in (out / "sweep.md").read_text() and (out / "sweep.csv").read_text().count("\n") == 4
    assert "Findings: xlnet" in result.stdout


@pytest.mark.heavy  # worker processes left to crash, hang and hit their memory cap
def test_a_crash_a_hang_and_a_memory_hog_are_rows_not_the_end(tmp_path):
    out = tmp_path / "s"
    result = sweep("--types", "llama,gpt2,mixtral,opt", "--auditor", "planted:sweep_auditor", "--timeout", "20",
                   "--memory", "1536", "--jobs", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = rows_by_type(out)
    assert rows["llama"]["status"] == "skip" and "crashed" in rows["llama"]["reason"]
    assert "SIGABRT" in rows["llama"]["reason"]
    assert rows["gpt2"]["status"] == "skip" and rows["gpt2"]["reason"].startswith("timed out")
    assert rows["mixtral"]["status"] == "skip" and rows["mixtral"]["reason"].startswith("out of memory")
    assert rows["opt"]["status"] == "pass"  # the workers that replaced the dead ones still audit


def test_audit_model_turns_a_build_failure_into_a_skip_that_names_it():
    (row,) = audit_model(Job("gemma3n", "causal-lm", ("model",)))
    assert row["status"] == "skip" and row["reason"] == "needs optional package timm"



def test_a_path_that_fails_on_every_case_is_a_skip_not_a_finding():
    """GIT's loss cuts the image positions off the logits before scoring the text: text alone
    leaves it none, so nothing is measured and the row says why instead of calling it a loss bug."""
    (row,) = audit_model(Job("git", "causal-lm", ("model",)))
    assert row["status"] == "skip", row
    assert row["reason"].startswith("every case failed:") and "batch_size" in row["reason"]

def test_plan_jobs_follows_the_auto_mapping():
    jobs = plan_jobs(("causal-lm", "sequence-classification"), ("model",), ("llama", "t5", "gpt2"))
    assert [(j.model_type, j.task) for j in jobs] == [
        ("llama", "causal-lm"), ("gpt2", "causal-lm"),
        ("llama", "sequence-classification"), ("t5", "sequence-classification"), ("gpt2", "sequence-classification")]


@pytest.mark.parametrize("args, needle", [
    (["--types", "lama"], "did you mean 'llama'"),
    (["--jobs", "0"], "--jobs"),
    (["--path", "modle"], "did you mean 'model'"),
    (["--task", "vision"], "invalid choice"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(args, needle, tmp_path):
    result = sweep(*args, "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_earlier_sweep_is_never_replaced_silently(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    result = sweep("--types", "llama", "--out", str(tmp_path))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "sweep.json").read_text() == "{}"
