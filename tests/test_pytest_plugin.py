"""The pytest plugin, tested the way a user meets it: pytest in a subprocess, its exit status."""

import ast
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
from test_baseline import case, report

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "lossaudit.pytest_plugin"


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def installed_from_this_checkout() -> bool:
    """Whether an installed lossaudit is an editable install of this checkout (CI's
    `pip install -e '.[test]'`): then pytest must find the plugin through its entry point."""
    for dist in metadata.distributions(name="lossaudit"):
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        if url.removeprefix("file://").rstrip("/") == str(ROOT):
            return True
    return False


@functools.cache
def entry_points_seen_by_pytest() -> list[str]:
    """The ``lossaudit`` pytest11 entry points a child pytest would load, asked of a child
    with the same environment (an egg-info on PYTHONPATH counts as installed too)."""
    code = ("from importlib.metadata import entry_points; "
            "print(sorted({e.value for e in entry_points(group='pytest11') if e.name == 'lossaudit'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                            cwd=tempfile.gettempdir(), timeout=60, check=True)
    return ast.literal_eval(result.stdout.strip())


def run_pytest(suite: Path, *args):
    """pytest on ``suite`` in a fresh process; ``-p`` loads the plugin where no entry point does."""
    plugin = [] if entry_points_seen_by_pytest() else ["-p", ENTRY_POINT]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, str(suite), *args],
                          capture_output=True, text=True, cwd=suite.parent, env=child_env(), timeout=300)


def write_suite(tmp_path: Path, body: str) -> Path:
    suite = tmp_path / "test_stack.py"
    suite.write_text("import pytest\n\n" + body)
    return suite


CLEAN = '''
def test_my_stack(lossaudit):
    lossaudit.check("llama", path=["model"], microbatches=[2]).assert_clean()

@pytest.mark.lossaudit(path=["model"], microbatches=[2], groupings=["imbalanced"])
def test_declared_audit_on_the_suites_model():
    pass  # the marker declares the audit, --lossaudit-model names the model
'''

PLANTED = '''
def test_nanogpt_loop(lossaudit):
    lossaudit.check("llama", path=["reduction"], reductions=["planted:nanogpt"], microbatches=[4]).assert_clean()

@pytest.mark.lossaudit("llama", path=["reduction"], reductions=["planted:nanogpt"], microbatches=[2])
def test_declared_nanogpt_loop():
    pass
'''


def test_the_entry_point_is_declared_and_installed_where_this_checkout_is():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[project\.entry-points\.pytest11\]\s*\nlossaudit = "lossaudit\.pytest_plugin"', text)
    assert entry_points_seen_by_pytest() in ([], [ENTRY_POINT])  # never another module
    if installed_from_this_checkout():
        assert entry_points_seen_by_pytest() == [ENTRY_POINT]


def test_loading_the_plugin_imports_no_heavy_library():
    code = ("import sys, pytest, lossaudit.pytest_plugin; "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.heavy  # a child pytest with an audit
def test_a_clean_suite_passes(tmp_path):
    result = run_pytest(write_suite(tmp_path, CLEAN), "--lossaudit-model", "llama")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_a_planted_divergence_fails_with_the_findings_table(tmp_path):
    result = run_pytest(write_suite(tmp_path, PLANTED))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 failed" in result.stdout
    assert "DivergenceError" in result.stdout and "finding(s):" in result.stdout
    assert "| reduction | planted:nanogpt | 4 |" in result.stdout  # the table, with k=4
    assert "| reduction | planted:nanogpt | 2 |" in result.stdout  # the marker's audit, k=2


def test_a_suite_without_a_model_is_told_how_to_name_one(tmp_path):
    result = run_pytest(write_suite(tmp_path, CLEAN))
    assert result.returncode == 1
    assert "no model to audit" in result.stdout and "--lossaudit-model" in result.stdout


@pytest.mark.heavy  # a child pytest with an audit and a baseline
def test_a_regression_against_the_baseline_fails_the_test(tmp_path):
    """A baseline whose model-path errors were 1e-12: today's audit is clean, but its errors
    passed --lossaudit-max-grad-rel-err, so the comparison alone fails the test."""
    cases = [case(2, grad=1e-12, loss=1e-12, padding=p, grouping=g)
             for p in ("right", "left") for g in ("contiguous", "length_sorted", "imbalanced")]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(report(*cases).to_dict()))
    suite = write_suite(tmp_path, CLEAN.split("@pytest")[0])
    clean = run_pytest(suite, "--lossaudit-baseline", str(baseline))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    gated = run_pytest(suite, "--lossaudit-baseline", str(baseline), "--lossaudit-max-grad-rel-err", "1e-9")
    assert gated.returncode == 1, gated.stdout + gated.stderr
    assert "6 REGRESSION(S)" in gated.stdout and "passed --max-grad-rel-err 1e-09" in gated.stdout


@pytest.mark.parametrize("args, needle", [
    (["--lossaudit-baseline", "missing.json"], "--lossaudit-baseline: missing.json: no such report"),
    (["--lossaudit-max-grad-growth", "fast"], "--lossaudit-max-grad-growth"),
])
def test_a_bad_option_stops_the_session_before_any_test(tmp_path, args, needle):
    result = run_pytest(write_suite(tmp_path, CLEAN), *args)
    assert result.returncode == 4, result.stdout + result.stderr  # pytest's usage error
    assert needle in result.stderr and "passed" not in result.stdout
