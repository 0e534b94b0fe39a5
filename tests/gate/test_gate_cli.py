"""The regression gate as a user meets it: `compare OLD NEW` and `check --baseline FILE`."""

import json

import pytest
from test_baseline import BASE, case, report
from test_cli import assert_usage_error, run

AUDIT = ("llama", "--microbatches", "2", "--path", "model")  # a few seconds


def write(path, rep):
    path.write_text(json.dumps(rep.to_dict()))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """OLD, and a NEW where k=4 pad-right matched before and diverges now."""
    new = list(BASE)
    new[1] = case(4, verdict="diverge", grad=0.3, loss=0.02)
    return write(tmp_path / "old.json", report(*BASE)), write(tmp_path / "new.json", report(*new, transformers="4.46.0"))


def test_compare_exits_1_on_a_regression_with_the_environment_diff_first(pair):
    result = run("compare", *pair)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert out.index("transformers") < out.index("REGRESSION: matched, now diverges")
    assert "model k=4 contiguous pad-right" in out and "1 REGRESSION(S)" in out


def test_compare_exits_0_without_a_regression(pair):
    result = run("compare", pair[0], pair[0])
    assert result.returncode == 0, result.stderr
    assert "no regressions (5 case(s) in both, 0 only in OLD, 0 only in NEW)" in result.stdout


def test_cases_in_one_report_only_are_listed_and_fail_under_strict(tmp_path):
    old = write(tmp_path / "old.json", report(*BASE, case(8)))
    new = write(tmp_path / "new.json", report(*BASE))
    lenient = run("compare", old, new)
    assert lenient.returncode == 0 and "only in OLD" in lenient.stdout
    strict = run("compare", old, new, "--strict")
    assert strict.returncode == 1 and "FAILED under --strict" in strict.stdout


@pytest.mark.parametrize("args, needle", [
    (["--max-grad-growth", "0.5x"], "--max-grad-growth"),
    (["--max-loss-rel-err", "abc"], "--max-loss-rel-err"),
    (["--max-grad-rel-err", "nan"], "--max-grad-rel-err"),
])
def test_a_bad_threshold_is_one_line_exit_2(pair, args, needle):
    assert_usage_error(run("compare", *pair, *args), needle)


def test_a_missing_or_corrupt_report_is_exit_2(pair, tmp_path):
    (tmp_path / "corrupt.json").write_text('{"schema": "lossaudit.report/1", "cases": [')
    (tmp_path / "other.json").write_text('{"schema": "something else"}')
    assert_usage_error(run("compare", str(tmp_path / "nope.json"), pair[1]), "no such report")
    assert_usage_error(run("compare", pair[0], str(tmp_path / "corrupt.json")), "cannot read report")
    assert_usage_error(run("compare", pair[0], str(tmp_path / "other.json")), "not a lossaudit report")
    assert_usage_error(run("check", *AUDIT, "--baseline", str(tmp_path / "corrupt.json")), "cannot read report")


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    """`check --out before`, run once for the tests below (none of them writes into it)."""
    out = tmp_path_factory.mktemp("gate") / "before"
    first = run("check", *AUDIT, "--out", str(out))
    assert first.returncode == 0, first.stderr
    return out / "report.json"


def test_check_then_check_against_that_baseline_passes(before, tmp_path):
    baseline = before
    second = run("check", *AUDIT, "--baseline", str(baseline), "--out", str(tmp_path / "after"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "no regressions (6 case(s) in both" in second.stdout
    assert second.stdout.index("no findings") < second.stdout.index("environment")


def test_the_baseline_is_never_overwritten_unless_asked(before, tmp_path):
    out = tmp_path / "before"
    out.mkdir()
    baseline = out / "report.json"
    baseline.write_bytes(before.read_bytes())
    before = baseline.read_bytes()
    refused = run("check", *AUDIT, "--baseline", str(baseline), "--out", str(out), "--overwrite")
    assert_usage_error(refused, "would write over the baseline", "--replace-baseline")
    assert baseline.read_bytes() == before
    replaced = run("check", *AUDIT, "--baseline", str(baseline), "--out", str(out), "--replace-baseline")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "no regressions" in replaced.stdout  # compared with the old content, then replaced it
    assert json.loads(baseline.read_text())["cases"]


def test_check_exits_1_on_a_regression_without_a_finding(before, tmp_path):
    """A baseline whose model-path errors were tiny: today's are within tolerance (no finding),
    but past --max-grad-rel-err, so the gate alone fails the run."""
    data = json.loads(before.read_text())
    for c in data["cases"]:
        c["grad_rel_err"] = 1e-12
    (tmp_path / "tiny.json").write_text(json.dumps(data))
    result = run("check", *AUDIT, "--baseline", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "after"),
                 "--max-grad-rel-err", "1e-9")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no findings" in result.stdout and "passed --max-grad-rel-err 1e-09" in result.stdout
    assert "exit 1: 6 regression(s) against the baseline, 0 finding(s) in this audit" in result.stdout


def test_gate_options_without_a_baseline_are_a_usage_error():
    assert_usage_error(run("check", "llama", "--strict"), "--strict: only with --baseline")
