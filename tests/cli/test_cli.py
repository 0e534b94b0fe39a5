"""The CLI as a user meets it: exit statuses, one-line errors, report files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
        (["check", "llama", "--mask-every-prompt", "--no-prompt-masking"], "contradict each other"),
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
    from lossaudit.models.loading import load_model

    # llama: GPT2LMHeadModel maps to no loss_type, so transformers 5.10.1+ still counts its
    # num_items_in_batch over unshifted labels and the Trainer step is rightly a finding
    load_model("llama").model.save_pretrained(tmp_path / "m")
    result = run("check", str(tmp_path / "m"), "--microbatches", "2", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["model"]["task"] == "causal-lm"


def test_a_bare_model_type_means_the_folder_only_when_it_holds_a_saved_model(tmp_path, monkeypatch):
    """`check gpt2` beside a folder gpt2/ of something else audits the tiny model type; a
    folder written by save_pretrained wins, as in from_pretrained; ./gpt2 is always the folder."""
    from lossaudit.core.errors import UsageError
    from lossaudit.models.loading import load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "notes.txt").write_text("not a model")
    assert load_model("gpt2").source == "tiny"
    with pytest.raises(UsageError, match="no config.json"):
        load_model("./gpt2")
    load_model("gpt2", config_overrides={"n_layer": 1}).model.save_pretrained(tmp_path / "gpt2")
    saved = load_model("gpt2")
    assert saved.source == "directory" and saved.model.config.n_layer == 1

def test_a_directory_without_config_is_a_usage_error(tmp_path):
    assert_usage_error(run("check", str(tmp_path)), "no config.json")


def test_paddings_and_groupings_choose_the_layouts(tmp_path):
    result = run("check", "llama", "--microbatches", "2", "--path", "reduction,model", "--paddings", "left",
                 "--groupings", "imbalanced,contiguous", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    cases = json.loads((tmp_path / "r" / "report.json").read_text())["cases"]
    assert {c["padding"] for c in cases} == {"left"}
    assert {c["grouping"] for c in cases} == {"imbalanced", "contiguous"}
    assert {c["path"] for c in cases} == {"reduction", "model"}  # --path takes a comma list, as sweep's does


@pytest.mark.parametrize(
    "args, needle",
    [
        (["check", "gpt2", "--task", "seq2seq"], "has no seq2seq head"),
        (["check", "llama", "--config-arg", "num_hiden_layers=1"], "did you mean 'num_hidden_layers'"),
        (["check", "llama", "--config-arg", "hidden_size=wide"], "--config-arg hidden_size='wide'"),
        (["check", "llama", "--config-arg", "num_attention_heads=3"], "not a multiple of the number of attention heads"),
        (["check", "llama", "--config-arg", "hidden_act=nope"], "--config-arg hidden_act='nope'"),
        (["check", "llama", "--config-arg", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_model_input_is_one_line_and_exit_2(args, needle):
    assert_usage_error(run(*args), needle)


def test_config_args_the_config_takes_are_applied():
    from lossaudit.models.loading import load_model

    loaded = load_model("llama", config_overrides={"num_hidden_layers": 1, "pad_token_id": 5, "num_labels": 4,
                                                   "classifier_dropout": 0.1})
    config = loaded.model.config
    assert (config.num_hidden_layers, config.pad_token_id, config.num_labels) == (1, 5, 4)
    assert len(loaded.model.model.layers) == 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "t5", "mixtral", "bert"])
def test_every_key_the_tinyfier_sets_is_a_valid_config_arg(model_type):
    from lossaudit.models.loading import load_model
    from lossaudit.models.tiny import tiny_config, tiny_keys

    config = tiny_config(model_type)
    keys = sorted(k for k in tiny_keys(model_type) if not isinstance(getattr(config, k, None), (dict, list)))
    assert keys
    load_model(model_type, config_overrides={k: getattr(config, k) for k in keys})  # no unknown key refused


@pytest.mark.parametrize("where", ["under_a_file", "an_existing_file", "proc"])
def test_an_out_that_cannot_be_written_is_refused_before_the_audit(tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = {"under_a_file": blocker / "r", "an_existing_file": blocker, "proc": Path("/proc/lossaudit-report")}[where]
    if where == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    result = run("check", "lama-typo-to-fail-if-the-audit-ran", "--out", str(out))
    assert_usage_error(result, f"--out {out}")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a read-only directory")
def test_an_out_in_a_read_only_directory_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        assert_usage_error(run("check", "llama", "--out", str(tmp_path / "r")), "cannot create files")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.heavy  # two whole default audits
def test_the_same_check_twice_writes_the_same_report(tmp_path):
    tiny = ("--microbatches", "1,2", "--path", "reduction", "--path", "model", "--batch-size", "4",
            "--max-length", "12")
    for name in ("a", "b"):
        result = run("check", "llama", *tiny, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    first, second = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("a", "b"))
    assert first["cases"] and first == second  # the report holds no timestamps or durations
    assert (tmp_path / "a" / "cases.csv").read_text() == (tmp_path / "b" / "cases.csv").read_text()
