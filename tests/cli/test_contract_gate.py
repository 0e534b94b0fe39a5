"""The contract on the gate and the release commands (issue 26, items 6 and 9): hostile reports
and sweeps given to ``compare``, empty directories given to ``history``/``upgrade``, a release
written short, and environment builds that are interrupted or killed.

Each bad input gives exit 2 and one stderr line, never a traceback or exit 3. The reader's
fields were fuzzed (every field of a real report and sweep set to null, a string, a list, an
object, 1e308, -1, true, ...): each case that gave exit 3 is a row below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_contract import assert_contract, env, run

from lossaudit.cli.commands.history import release_name

CASE = {"path": "model", "reduction": None, "microbatches": 2, "padding": "right", "grouping": "contiguous",
        "world_size": 1, "tokens": [40, 41], "loss_rel_err": 1e-8, "grad_rel_err": 1e-7, "verdict": "match",
        "expected": False, "detail": ""}
REPORT = {"schema": "lossaudit.report/1",
          "environment": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.25.0", "device": "cpu",
                          "dtype": "float32", "seed": 0},
          "model": {"name": "llama", "task": "causal-lm", "parameters": 10},
          "tolerance": {"rtol": 1e-5, "floor": 1e-5},
          "batch": {"sequences": 8, "targets": [10, 71], "lengths": [12, 80], "target_tokens": 81,
                    "objective": "token cross entropy"},
          "cases": [CASE]}
SWEEP = {"schema": "lossaudit.sweep/1", "environment": {"transformers": "5.25.0"},
         "settings": {"tasks": ["causal-lm"], "paths": ["model"]},
         "rows": [{"model_type": "llama", "task": "causal-lm", "path": "model", "status": "pass", "reason": ""}]}


def changed(data: dict, dotted: str, value) -> dict:
    data = json.loads(json.dumps(data))
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(REPORT))
    return path


@pytest.mark.parametrize("dotted, value, needle", [
    ("environment", None, "'environment' is null, not an object"),
    ("model", [], "'model' is [], not an object"),
    ("tolerance.floor", "x", "'tolerance.floor' is \"x\", not a number"),
    ("tolerance.floor", [1, "a"], "'tolerance.floor'"),
    ("tolerance.rtol", True, "'tolerance.rtol' is true, not a number"),
    ("batch.lengths", 1e308, "'batch.lengths' is 1e+308, not a list of whole numbers"),
    ("batch.targets", -1, "'batch.targets'"),
    ("batch.objective", {"a": None}, "'batch.objective'"),
    ("environment.seed", "zero", "'environment.seed'"),
    ("cases.0.tokens", "many", "case 1: 'tokens'"),
])
def test_a_malformed_report_is_one_line_exit_2_on_either_side(tmp_path, good, dotted, value, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(changed(REPORT, dotted, value)))
    assert_contract(run("compare", good, bad), 2, str(bad), needle)
    assert_contract(run("compare", bad, good), 2, str(bad), needle)


def test_a_report_nested_100000_deep_is_one_line_exit_2(tmp_path, good):
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema": "lossaudit.report/1", "cases": ' + "[" * 100000 + "]" * 100000 + "}")
    assert_contract(run("compare", good, deep), 2, "nested too deeply")
    assert_contract(run("check", "llama", "--baseline", deep), 2, "nested too deeply")  # before any model


@pytest.mark.parametrize("dotted, value, needle", [
    ("rows.0", "x", "row 1"),
    ("rows.0.model_type", None, "row 1: 'model_type' is null"),
    ("rows.0.status", "great", "row 1: 'status'"),
    ("rows.0.reason", 7, "row 1: 'reason'"),
    ("environment", None, "'environment'"),
    ("environment.transformers", 5.25, "'environment.transformers'"),
    ("settings", [], "'settings'"),
    ("settings.types", "llama", "'settings.types'"),
])
def test_a_malformed_sweep_is_one_line_exit_2(tmp_path, dotted, value, needle):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(SWEEP))
    bad.write_text(json.dumps(changed(SWEEP, dotted, value)))
    assert_contract(run("compare", good, bad), 2, "not a valid lossaudit sweep", needle)


def test_a_sweep_row_missing_its_keys_is_exit_2_not_a_key_error(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(SWEEP))
    bad.write_text(json.dumps({**SWEEP, "rows": [{"model_type": "llama"}]}))
    assert_contract(run("compare", bad, good), 2, "row 1: 'task' is null")


@pytest.mark.parametrize("command", [("history", "llama", "--transformers", "5.25.0"),
                                     ("upgrade", "llama", "--to", "transformers==5.25.0")])
@pytest.mark.parametrize("option", ["--out", "--env-cache"])
def test_an_empty_directory_option_is_refused_not_taken_for_the_working_directory(tmp_path, command, option):
    assert_contract(run(*command, option, "", cwd=tmp_path), 2, option, "is empty")
    assert_contract(run(*command, f"{option}=", cwd=tmp_path), 2, option, "is empty")
    assert list(tmp_path.iterdir()) == []


def test_a_release_written_short_means_the_release():
    assert [release_name(v) for v in ("5.25", "5", "v4.46.0", "4.46.0rc1", "5.25.0.post1", "05.025")] == [
        "5.25.0", "5.0.0", "4.46.0", "4.46.0rc1", "5.25.0.post1", "5.25.0"]


def test_history_runs_a_release_written_short_here_when_it_is_the_installed_one(tmp_path):
    """``--transformers 5.25`` on 5.25.0: the current environment, no build, one row per path."""
    from lossaudit.report.environment import _version

    short = ".".join(_version("transformers").split(".")[:2])
    if release_name(short) != _version("transformers"):
        pytest.skip(f"the installed transformers {_version('transformers')} is no X.Y.0 release")
    out, cache = tmp_path / "history", tmp_path / "envs"
    result = run("history", "llama", "--transformers", f"{short},{_version('transformers')}", "--env-cache", cache,
                 "--out", out, "--path", "model", "--microbatches", "2", "--batch-size", "2", "--max-length", "8")
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "history.json").read_text())["rows"]
    assert [(r["release"], r["path"], r["environment"]) for r in rows] == [(_version("transformers"), "model", "current")]
    assert not cache.exists()


# --- an environment build interrupted or killed -----------------------------------------------

BUILD = textwrap.dedent("""
    import signal, sys
    from pathlib import Path
    from lossaudit.cli.app import _terminate
    from lossaudit.releases import environments as envs
    from lossaudit.releases.candidate import Resolution

    signal.signal(signal.SIGTERM, _terminate)  # as the CLI does
    answer = {"ok": Resolution(0, "", {"install": []}),
              "fail": Resolution(1, "ERROR: No matching distribution found for x==1", None)}[sys.argv[3]]
    spec = envs.Spec.make({"x": sys.argv[2]}, {}, envs.source_directory())
    try:
        envs.ensure(spec, Path(sys.argv[1]), dry_run=lambda *a: answer)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
""")


def build(cache: Path, version: str, answer: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(cache), version, answer], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes that name ``text`` (the environment's folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append(cmdline)
    return found


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ensurepip_running(folder: Path) -> bool:
    return any("ensurepip" in c for c in processes_naming(str(folder)))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_build_leaves_no_installer_running_and_no_folder(tmp_path, signum):
    cache = tmp_path / "envs"
    child = build(cache, "1.0", "ok")
    wait_for(lambda: any(ensurepip_running(p) for p in cache.glob("x-1.0-*")) or child.poll() is not None)
    assert child.poll() is None, child.stderr.read()
    folder = next(cache.glob("x-1.0-*/"))
    child.send_signal(signum)
    child.wait(timeout=60)
    assert child.returncode == 130
    assert processes_naming(str(folder)) == []  # ensurepip died with the run
    time.sleep(2)  # an orphaned ensurepip would have re-created the folder by now
    assert not folder.exists()


def test_a_killed_builds_half_built_folder_is_swept_by_the_next_run(tmp_path):
    cache = tmp_path / "envs"
    child = build(cache, "1.0", "ok")
    wait_for(lambda: any(ensurepip_running(p) for p in cache.glob("x-1.0-*")) or child.poll() is not None)
    folder = next(cache.glob("x-1.0-*/"))
    child.kill()  # SIGKILL: nothing of the run's own clean-up happens
    child.wait(timeout=60)
    wait_for(lambda: not processes_naming(str(folder)))  # its orphans finish on their own
    assert folder.is_dir() and not (folder / "lossaudit-env.json").exists()
    (cache / "unrelated").mkdir()  # not ours: never touched
    other = build(cache, "2.0", "fail")  # the next run, of other pins, whatever becomes of it
    other.wait(timeout=120)
    assert other.returncode == 3 and "No matching distribution found for x==1" in other.stderr.read()
    assert not folder.exists() and (cache / "unrelated").is_dir()


def test_a_reader_that_closes_the_pipe_keeps_the_commands_answer():
    """``compare A B | head``: the reader leaves while lines remain; no 'internal error:
    BrokenPipeError' (exit 3), the rest is dropped and the writer goes on."""
    from lossaudit.cli.app import ReaderGone

    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = ReaderGone(os.fdopen(write_end, "w", buffering=1))
    assert stream.write("x" * 200_000 + "\n") == 200_001  # past any pipe buffer: EPIPE is raised inside
    stream.flush()
    assert stream.write("after\n") == 6
    stream.close()
