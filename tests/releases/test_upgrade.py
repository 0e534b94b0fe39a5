"""upgrade and history end to end: isolated environments, cached, and the current one untouched.

The suite builds at most one environment (transformers at the installed release, in pytest's
cache directory, which CI keeps between runs): ~2 minutes the first time on 2 cores, nothing after.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_baseline import BASE, case, report
from test_cli import assert_usage_error

from lossaudit.releases.check_runs import Side
from lossaudit.cli.app import main
from lossaudit.cli.commands.upgrade import finish
from lossaudit.report.environment import _version
from lossaudit.releases.environments import MANIFEST, Spec, ensure
from lossaudit.gate.thresholds import Gate
from lossaudit.releases.history_table import path_row
from lossaudit.core.errors import UsageError
from lossaudit.report.report import Report

ROOT = Path(__file__).parents[2]
INSTALLED = _version("transformers")
AUDIT = ("--path", "model", "--microbatches", "2")  # a few seconds per audit


def lossaudit(*args):
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run([sys.executable, "-m", "lossaudit", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=900)


@pytest.fixture
def cli(capsys):
    def run(*args):
        status = main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=status, stdout=out, stderr=err)
    return run


def freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout


@pytest.mark.heavy  # builds an environment: ~5 min the first time on a loaded 2-core machine
def test_an_upgrade_preview_audits_both_sides_and_the_environment_is_cached(env_cache, tmp_path):
    out = tmp_path / "preview"
    result = lossaudit("upgrade", "llama", "--to", f"transformers=={INSTALLED}", "--env-cache", str(env_cache),
                       "--out", str(out), *AUDIT)
    assert result.returncode == 0, result.stderr
    assert "no regressions" in result.stdout and f"to transformers=={INSTALLED}" in result.stdout
    for name in ("old/report.json", "new/report.json", "comparison.txt", "comparison.csv", "upgrade.json"):
        assert (out / name).is_file(), name
    old, new = Report.load(out / "old" / "report.json"), Report.load(out / "new" / "report.json")
    assert new.environment["transformers"] == INSTALLED and len(new.cases) == len(old.cases) > 0
    summary = json.loads((out / "upgrade.json").read_text())
    env = Path(summary["new"]["environment"])
    assert env.parent == env_cache and summary["old"]["environment"] is None and summary["exit_status"] == 0
    # the candidate ran with the environment's own interpreter and this checkout's lossaudit
    probe = subprocess.run([str(env / "bin" / "python"), "-c", "import sys, lossaudit; print(sys.prefix); "
                            "print(lossaudit.__file__)"], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    prefix, module = probe.stdout.split()
    assert Path(prefix) == env and Path(module).is_relative_to(ROOT)
    # a second preview of the same pins starts at once: the environment is found, not built
    started = time.monotonic()
    again = ensure(Spec.make({"transformers": INSTALLED}), env_cache)
    assert again.path == env and not again.created and time.monotonic() - started < 10
    assert len([p for p in env_cache.glob(f"transformers-{INSTALLED}-*") if (p / MANIFEST).exists()]) == 1


@pytest.mark.heavy  # a virtual environment and pip's resolution against the package index
def test_a_failed_install_is_one_line_exit_3_and_leaves_this_environment_alone(tmp_path):
    before = freeze()
    cache = tmp_path / "envs"
    result = lossaudit("upgrade", "llama", "--to", "transformers==99.0.0", "--env-cache", str(cache),
                       "--out", str(tmp_path / "preview"), *AUDIT)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("lossaudit: error:") and "Traceback" not in result.stderr
    assert "No matching distribution found for transformers==99.0.0" in lines[-1]
    assert len([line for line in lines if line.startswith("lossaudit: error")]) == 1
    assert freeze() == before
    assert [p for p in cache.iterdir() if p.is_dir()] == []  # the half-built environment is gone
    assert not (tmp_path / "preview" / "comparison.txt").exists()


@pytest.mark.parametrize("args, needle", [
    ((), "--to"),
    (("--to", "transformers>=5"), "exact pin"),
    (("--to", f"transformers=={INSTALLED}", "--microbatches", "x"), "--microbatches"),
    (("--to", f"transformers=={INSTALLED}", "--baseline", "r.json"), "--baseline"),
])
def test_bad_usage_is_one_line_exit_2_before_any_environment(cli, tmp_path, args, needle):
    assert_usage_error(cli("upgrade", "llama", *args, "--env-cache", str(tmp_path / "envs")), needle)
    assert not (tmp_path / "envs").exists()


def _side(tmp_path, name, *cases, **env):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report(*cases, **env).to_dict()))
    return Side(name, folder)


def test_the_preview_fails_on_a_regression_and_passes_its_clean_twin(tmp_path, capsys):
    clean = [case(2), case(4), case(2, padding="left"), case(2, path="reduction", reduction="mean_of_means",
                                                             verdict="diverge", grad=0.4, expected=True)]
    regressed = list(clean)
    regressed[1] = case(4, verdict="diverge", grad=0.3, loss=0.02)
    old, new = _side(tmp_path, "old", *clean), _side(tmp_path, "new", *regressed, transformers="4.46.0")
    assert finish(old, new, Gate(), tmp_path / "bad", {"transformers": "4.46.0"}) == 1
    assert "REGRESSION: matched, now diverges" in (tmp_path / "bad" / "comparison.txt").read_text()
    twin = _side(tmp_path, "twin", *clean, transformers="4.46.0")
    assert finish(old, twin, Gate(), tmp_path / "good", {"transformers": "4.46.0"}) == 0
    assert "no regressions" in capsys.readouterr().out
    # check --baseline's rule: a finding of the candidate fails it even when the current one has it too
    assert finish(_side(tmp_path, "base", *BASE), _side(tmp_path, "same", *BASE), Gate(), tmp_path / "f", {}) == 1


def test_the_preview_prints_what_changed_and_writes_every_case(tmp_path, capsys):
    cases = [case(k, padding=p) for k in (1, 2, 4, 8) for p in ("left", "right")]
    moved = list(cases)
    moved[2] = case(2, padding="left", grad=2e-4)  # 20x over the floor: a regression
    old, new = _side(tmp_path, "old", *cases), _side(tmp_path, "new", *moved, transformers="4.46.0")
    assert finish(old, new, Gate(), tmp_path / "out", {"transformers": "4.46.0"}) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "1 REGRESSION(S) (8 case(s) in both, 0 only in OLD, 0 only in NEW)"
    assert "  environment changes: transformers 4.45.2 -> 4.46.0" in printed
    assert f"every case: {tmp_path / 'out'}/comparison.txt" in "\n".join(printed)
    assert sum(line.startswith("model k=") for line in printed) == 1  # only the case that moved
    written = (tmp_path / "out" / "comparison.txt").read_text()
    assert sum(line.startswith("model k=") for line in written.splitlines()) == 8  # every case
    assert len((tmp_path / "out" / "comparison.csv").read_text().splitlines()) == 1 + 8


def test_the_preview_refuses_sides_that_audited_different_batches_unless_allowed(tmp_path):
    old, new = _side(tmp_path, "old", *BASE), _side(tmp_path, "new", *BASE, seed=1)
    with pytest.raises(UsageError, match="seed: 0 in OLD, 1 in NEW"):
        finish(old, new, Gate(), tmp_path / "refused", {"transformers": "4.46.0"})
    assert not (tmp_path / "refused").exists()  # both reports stay where they are, nothing else written
    finish(old, new, Gate.parse(allow_different_batch=True), tmp_path / "allowed", {"transformers": "4.46.0"})
    summary = json.loads((tmp_path / "allowed" / "upgrade.json").read_text())
    assert summary["not_like_for_like"] == ["seed: 0 in OLD, 1 in NEW"]
    assert (tmp_path / "allowed" / "comparison.txt").read_text().splitlines()[1].startswith("NOT LIKE FOR LIKE")


def test_a_history_row_is_the_worst_audited_case_of_its_path(tmp_path):
    cases = report(case(2), case(4, verdict="diverge", grad=0.2, loss=0.01),
                   case(4, verdict="diverge", grad=0.9, path="reduction", reduction="mean_of_means",
                        expected=True)).cases
    cases.loc[1, "detail"] = "k-fold scale: 4x"
    model = path_row("4.46.0", "model", cases[cases["path"] == "model"], "env")
    assert (model["verdict"], model["findings"], model["grad_rel_err"], model["cause"]) == ("diverge", 1, 0.2,
                                                                                             "k-fold scale: 4x")
    assert model["worst_layout"].startswith("k=4")
    harness = path_row("4.46.0", "reduction", cases[cases["path"] == "reduction"], "env")
    assert harness["verdict"] == "expected" and harness["findings"] == 0  # known to differ: not a finding


@pytest.mark.heavy  # an audit and a dry run over every distribution: ~1 min
def test_history_tables_every_release_and_names_one_that_cannot_be_installed(cli, tmp_path):
    out = tmp_path / "history"
    result = cli("history", "llama", "--transformers", f"{INSTALLED},99.0.0", "--env-cache", str(tmp_path / "envs"),
                 "--out", str(out), *AUDIT)
    assert result.returncode == 3, result.stderr
    data = json.loads((out / "history.json").read_text())
    assert data["schema"] == "lossaudit.history/1" and "--transformers" in data["command"]
    rows = {(r["release"], r["path"]): r for r in data["rows"]}
    assert rows[(INSTALLED, "model")]["verdict"] == "match" and rows[(INSTALLED, "model")]["environment"] == "current"
    assert "No matching distribution" in rows[("99.0.0", "-")]["cause"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lossaudit: error:")]
    assert len(errors) == 1 and "1 release(s) could not be audited: 99.0.0 (" in errors[0]
    assert f"| {INSTALLED} | model | match |" in (out / "history.md").read_text()
    assert (out / "history.csv").read_text().startswith("release,path,verdict")
