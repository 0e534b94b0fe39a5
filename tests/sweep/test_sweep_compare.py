"""compare on two sweeps: status changes, new and removed types; exit 1 on pass -> finding."""

import json
from types import SimpleNamespace

import pytest
from test_cli import assert_usage_error

from lossaudit.cli.app import main
from lossaudit.sweep.run import SCHEMA
from lossaudit.sweep.compare import compare_sweeps, type_status


@pytest.fixture
def run(capsys):
    """``python -m lossaudit ARGS`` in this process (a sweep comparison needs no fresh interpreter)."""
    def run(*args):
        status = main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=status, stdout=out, stderr=err)
    return run


def row(model_type, path="model", status="pass", task="causal-lm", reason=""):
    return {"model_type": model_type, "task": task, "path": path, "status": status, "reason": reason}


def sweep(*rows, transformers="5.23.0", paths=("model", "trainer")):
    return {"schema": SCHEMA, "environment": {"transformers": transformers},
            "settings": {"tasks": ["causal-lm"], "paths": list(paths)}, "rows": list(rows)}


OLD = sweep(row("llama"), row("llama", "trainer"), row("gpt2"), row("gpt2", "trainer"),
            row("bart", status="finding", reason="no label shift"), row("kolibri1_1", status="skip", reason="index"),
            row("gone"))


def test_a_type_is_a_finding_if_any_path_has_one_else_skip_if_any_skipped():
    types = type_status([row("a"), row("a", "trainer", "finding"), row("b"), row("b", "trainer", "skip"),
                         row("c"), row("c", "trainer")])
    assert {k[0]: v["status"] for k, v in types.items()} == {"a": "finding", "b": "skip", "c": "pass"}


def test_pass_to_finding_is_a_regression_and_every_change_is_listed():
    new = sweep(row("llama"), row("llama", "trainer", "finding", reason="k-fold scale"), row("gpt2"),
                row("gpt2", "trainer"), row("bart"), row("kolibri1_1"), row("lara_mini", status="finding"),
                transformers="5.25.0")
    c = compare_sweeps(OLD, new)
    changes = {ch.key[0]: (ch.old, ch.new, ch.regression) for ch in c.changed}
    assert changes == {"llama": ("pass", "finding", True), "bart": ("finding", "pass", False),
                       "kolibri1_1": ("skip", "pass", False)}
    assert c.changed[0].key[0] == "llama" and c.changed[0].paths == ["trainer: pass -> finding (k-fold scale)"]
    assert c.added == {("lara_mini", "causal-lm"): "finding"} and c.removed == {("gone", "causal-lm"): "pass"}
    assert c.unchanged == 1 and c.exit_status == 1  # gpt2


def test_fixes_and_new_findings_alone_do_not_fail():
    new = sweep(row("llama"), row("llama", "trainer"), row("gpt2"), row("gpt2", "trainer"), row("bart"),
                row("kolibri1_1", status="finding"), row("gone"), row("new_type", status="finding"))
    c = compare_sweeps(OLD, new)
    assert [ch.key[0] for ch in c.changed] == ["bart", "kolibri1_1"] and not c.regressions
    assert c.exit_status == 0


def test_the_command_takes_two_sweeps_and_fails_on_pass_to_finding(tmp_path, run):
    new = sweep(*[r if r["model_type"] != "gpt2" or r["path"] != "model" else row("gpt2", status="finding")
                  for r in OLD["rows"]], transformers="5.25.0", paths=("model",))
    for name, data in (("old", OLD), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps(data))
    result = run("compare", str(tmp_path / "old" / "sweep.json"), str(tmp_path / "new" / "sweep.json"))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "REGRESSION: gpt2 (causal-lm): pass -> finding" in out and "paths: ['model', 'trainer'] -> ['model']" in out
    assert "1 regression(s) (pass -> finding), 1 status change(s), 0 new, 0 removed" in out
    same = run("compare", str(tmp_path / "old" / "sweep.json"), str(tmp_path / "old" / "sweep.json"))
    assert same.returncode == 0 and "status changed: none" in same.stdout


def test_the_committed_sweep_compares_with_itself_cleanly():
    from pathlib import Path

    committed = Path(__file__).parents[2] / "reports" / "sweep-transformers-5.23" / "sweep.json"
    data = json.loads(committed.read_text())
    c = compare_sweeps(data, data)
    assert not c.changed and not c.added and c.unchanged == len(type_status(data["rows"]))


@pytest.mark.parametrize("other", ['{"schema": "lossaudit.report/1", "cases": []}', '{"schema": "x"}'])
def test_a_sweep_against_anything_else_is_one_line_exit_2(tmp_path, other, run):
    (tmp_path / "sweep.json").write_text(json.dumps(OLD))
    (tmp_path / "other.json").write_text(other)
    assert_usage_error(run("compare", str(tmp_path / "sweep.json"), str(tmp_path / "other.json")),
                       "not a lossaudit sweep")
