"""Scale out through the launcher: under ``torchrun --nproc-per-node N`` lossaudit joins the
launcher's process group (gloo on CPU here) instead of spawning its own ranks, and the report
is the one a spawned ``--world-size N`` run writes, written once, by rank 0."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lossaudit.audit.distributed import is_leader, joined_world_size, launched
from lossaudit.core.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
KEYS = ["path", "reduction", "microbatches", "padding", "grouping", "world_size"]


def env():
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def started(command) -> subprocess.Popen:
    """Its own process group, so that ``finish`` can end the launcher's workers with it."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stdout, stderr


def launcher_env(monkeypatch, rank=1, world_size=2):
    for name, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, MASTER_ADDR="localhost",
                            MASTER_PORT=29999).items():
        monkeypatch.setenv(name, str(value))


def test_without_a_launcher_the_world_size_is_the_option(monkeypatch):
    for name in ("RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert launched() is None and is_leader()
    assert joined_world_size(3, "cpu") == 3


def test_a_spawned_rank_is_not_launched(monkeypatch):
    """run_ranks's own ranks set RANK and WORLD_SIZE (for the libraries) but no MASTER_ADDR."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched() is None


def test_under_a_launcher_the_world_size_is_the_launchers(monkeypatch):
    launcher_env(monkeypatch)
    assert launched().rank == 1 and not is_leader()
    assert joined_world_size(1, "cpu") == 2  # the default means the launcher's
    assert joined_world_size(2, "cpu") == 2
    with pytest.raises(UsageError, match="--world-size 3: the launcher started 2 processes"):
        joined_world_size(3, "cpu")


def test_runner_joins_the_launchers_group_and_gathers_every_rank():
    code, stdout, stderr = finish(started([*TORCHRUN, str(ROOT / "tests" / "launched.py")]), timeout=120)
    assert code == 0, stderr[-3000:]
    seen = sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
                  key=lambda s: s["rank"])
    assert [s["rank"] for s in seen] == [0, 1] and [s["leader"] for s in seen] == [True, False]
    for s in seen:  # each rank ran its own share in-process: 10 + 11 summed, gathered to both
        assert s["sums"] == [[0, 2, 21.0], [1, 2, 21.0]]
        assert s["failure"] == "rank 1: KeyError: 'planted failure on rank 1'"
        assert s["mismatch"] == "3 ranks asked for in a launched group of 2"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same audit under torchrun (2 processes) and spawned (--world-size 2), at once."""
    out = tmp_path_factory.mktemp("launcher")
    audit = ["check", "llama", "--path", "accelerate", "--microbatches", "1,2", "--batch-size", "4",
             "--max-length", "8", "--paddings", "right", "--groupings", "imbalanced"]
    launched_run = started([*TORCHRUN, "-m", "lossaudit", *audit, "--out", str(out / "launched")])
    spawned = finish(started([sys.executable, "-m", "lossaudit", *audit, "--world-size", "2",
                              "--out", str(out / "spawned")]))
    return out, finish(launched_run), spawned


@pytest.mark.heavy  # two 2-rank runs; joining a launcher's group runs in the default tier
def test_launched_report_is_the_spawned_runs(two_runs):
    import pandas as pd

    out, (code, stdout, stderr), (spawned_code, _, spawned_stderr) = two_runs
    assert spawned_code == 0, spawned_stderr[-3000:]
    assert code == spawned_code, stderr[-3000:]
    assert stdout.count("lossaudit: llama") == 1  # rank 0 alone prints the summary
    got = json.loads((out / "launched" / "report.json").read_text())
    want = json.loads((out / "spawned" / "report.json").read_text())
    a, b = pd.DataFrame(got["cases"]), pd.DataFrame(want["cases"])
    assert len(a) == len(b) == 6  # 3 recipes x 2 layouts (k=1, k=2), on 2 ranks
    assert (a["world_size"] == 2).all() and all(len(set(t)) == 2 for t in a["rank_tokens"])  # uneven ranks
    a, b = a.sort_values(KEYS).reset_index(drop=True), b.sort_values(KEYS).reset_index(drop=True)
    errors = [d for frame in (a, b) for d in frame.loc[frame["verdict"] == "error", "detail"]]
    assert a[KEYS + ["verdict", "expected"]].equals(b[KEYS + ["verdict", "expected"]]), errors
    assert a["grad_rel_err"].tolist() == pytest.approx(b["grad_rel_err"].tolist(), rel=1e-6, abs=1e-12)
    assert a["rank_tokens"].tolist() == b["rank_tokens"].tolist()
