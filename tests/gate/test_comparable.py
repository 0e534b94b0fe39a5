"""Reports that did not audit the same thing are not compared, unless the user says so; then
every table says so on top."""

import io
import json

import pandas as pd
import pytest
from test_baseline import BASE, report
from test_cli import assert_usage_error, run

from lossaudit.core.errors import UsageError
from lossaudit.gate.baseline import compare
from lossaudit.gate.comparable import differences, planned_differences
from lossaudit.gate.text import comparison_csv, failures_text, render_comparison
from lossaudit.gate.thresholds import OPTIONS, Gate
from lossaudit.report.report import Report

BATCH = {"sequences": 8, "lengths": [11, 11, 14, 19, 22, 31, 6, 22], "targets": [10, 6, 13, 5, 21, 11, 5, 10],
         "target_tokens": 81, "objective": "token cross entropy"}


def audited(*cases, batch=BATCH, model="llama", **env):
    """A report like an audit's: with its batch, and the tokens of each case's microbatches."""
    rep = report(*cases, **env)
    rep.batch = dict(batch)
    rep.model["name"] = model
    rep.cases["tokens"] = [[81 // c["microbatches"]] * c["microbatches"] for c in cases]
    return rep


def test_the_issues_example_is_refused_naming_every_difference():
    """check --trainer-arg label_smoothing_factor=0.1 --seed 1 against a plain run: another
    objective, seed and batch (81 vs 99 targets); before, compare said "no regressions"."""
    old = audited(*BASE)
    new = audited(*BASE, batch={**BATCH, "objective": "token cross entropy with label smoothing 0.1",
                                "target_tokens": 99}, seed=1)
    with pytest.raises(UsageError) as info:
        compare(old, new)
    line = str(info.value)
    assert "objective: 'token cross entropy' in OLD, 'token cross entropy with label smoothing 0.1' in NEW" in line
    assert "seed: 0 in OLD, 1 in NEW" in line and "batch target tokens: 81 in OLD, 99 in NEW" in line
    assert line.endswith("(pass --allow-different-batch to compare them anyway)") and "\n" not in line


@pytest.mark.parametrize("change, needle", [
    (dict(batch={**BATCH, "sequences": 4}), "batch sequences: 8 in OLD, 4 in NEW"),
    (dict(batch={**BATCH, "lengths": [12] + BATCH["lengths"][1:]}), "batch: the sequence lengths differ"),
    (dict(batch={**BATCH, "targets": [11, 5] + BATCH["targets"][2:]}), "batch: the target tokens per sequence differ"),
    (dict(model="gpt2"), "model: 'llama (causal-lm)' in OLD, 'gpt2 (causal-lm)' in NEW"),
])
def test_each_kind_of_difference_is_named(change, needle):
    assert any(needle in d for d in differences(audited(*BASE), audited(*BASE, **change)))


def test_the_same_batch_cut_into_other_layouts_is_named_by_case():
    new = audited(*BASE)
    new.cases.at[1, "tokens"] = [30, 51]  # model k=4: another cut of the same 81 targets
    with pytest.raises(UsageError, match="layouts: model k=4"):
        compare(audited(*BASE), new)
    found = compare(audited(*BASE), new, Gate.parse(allow_different_batch=True)).differences
    assert found == ["layouts: model k=4 contiguous pad-right holds [20, 20, 20, 20] target tokens per microbatch "
                     "in OLD, [30, 51] in NEW"]


def test_reports_like_for_like_or_too_old_to_tell_compare_as_before():
    assert differences(audited(*BASE), audited(*BASE, transformers="4.46.0")) == []  # releases are the point
    assert differences(report(*BASE), audited(*BASE, seed=0)) == []  # no batch recorded in OLD: nothing to hold
    assert compare(report(*BASE), audited(*BASE)).differences == []


def test_allowed_the_comparison_runs_and_every_table_says_so_on_top():
    old, new = audited(*BASE), audited(*BASE, seed=1)
    gate = Gate.parse(allow_different_batch=True)
    comparison = compare(old, new, gate)
    assert comparison.differences == ["seed: 0 in OLD, 1 in NEW"]
    top = "NOT LIKE FOR LIKE (--allow-different-batch): seed: 0 in OLD, 1 in NEW"
    for text in (render_comparison(comparison), render_comparison(comparison, full=True)):
        assert text.splitlines()[1] == top  # under the title line
    assert failures_text(comparison).splitlines()[0] == top
    csv = pd.read_csv(io.StringIO(comparison_csv(comparison)))
    assert set(csv["not_like_for_like"]) == {top} and len(csv) == len(BASE)


def test_the_option_is_declared_once_for_the_cli_and_the_pytest_plugin():
    assert [o.name for o in OPTIONS].count("allow-different-batch") == 1
    assert Gate.parse(allow_different_batch=True).allow_different_batch and not Gate().allow_different_batch


def test_check_refuses_a_baseline_of_another_seed_or_objective_before_the_audit(tmp_path):
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(audited(*BASE).to_dict()))
    assert planned_differences(Report.load(baseline), model="llama", task=None, objective="token cross entropy",
                               seed=0, sequences=8) == []
    result = run("check", "llama", "--seed", "1", "--trainer-arg", "label_smoothing_factor=0.1",
                 "--baseline", str(baseline), "--out", str(tmp_path / "out"))
    assert_usage_error(result, "--baseline", "seed: 0 in OLD, 1 in NEW", "label smoothing 0.1",
                       "--allow-different-batch")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_compare_on_the_cli_refuses_with_exit_2_and_runs_when_allowed(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(audited(*BASE).to_dict()))
    new.write_text(json.dumps(audited(*BASE, batch={**BATCH, "target_tokens": 99}).to_dict()))
    assert_usage_error(run("compare", str(old), str(new)), "batch target tokens: 81 in OLD, 99 in NEW")
    allowed = run("compare", str(old), str(new), "--allow-different-batch")
    assert allowed.returncode == 0, allowed.stderr  # the same cases: no regression
    assert allowed.stdout.splitlines()[1].startswith("NOT LIKE FOR LIKE (--allow-different-batch)")
