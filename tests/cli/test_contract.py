"""The CLI's contract, case by case through ``python -m lossaudit`` in a subprocess: each bad
input, hostile or broken file, signal, concurrent writer and environment fault gives the exit
status it must, exactly one stderr line and no traceback, and leaves the files that were there
before as they were (issue 16).

Signals and concurrent writers are placed by the test hook of ``lossaudit.report.outdir``
(``LOSSAUDIT_TEST_PAUSE=POINT:DIR``): a run stops at a named point and says so with a file, so
each test acts at a known moment, never after a guessed sleep. Most cases fail before any model
is built; the others run a tiny audit (one layout, two sequences of at most 8 tokens).
"""

from __future__ import annotations

import json
import os
import pty
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ("--microbatches", "1", "--batch-size", "2", "--max-length", "8")
TINY = (*SMALL, "--path", "reduction", "--paddings", "right", "--groupings", "contiguous")
OLD_REPORT = {"report.json": "old json", "cases.csv": "old csv", "report.md": "old md", "report.html": "old html"}


def env(**extra) -> dict:
    base = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}
    base.pop("LOSSAUDIT_DEBUG", None)
    base.pop("LOSSAUDIT_TEST_PAUSE", None)
    return {**base, **extra}


def run(*args, cwd=None, extra_env=None, preexec=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lossaudit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env(**(extra_env or {})), preexec_fn=preexec, timeout=timeout)


def start(*args, cwd=None, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lossaudit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env(**(extra_env or {})))


def assert_contract(result, status: int, *needles: str) -> str:
    """Exit ``status``, one stderr line naming ``needles``, no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("lossaudit: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def prior(tmp_path):
    """An earlier report in ``tmp_path/r``: a failed run with ``--out r --overwrite`` leaves it whole."""
    out = tmp_path / "r"
    out.mkdir()
    for name, text in OLD_REPORT.items():
        (out / name).write_text(text)
    return out


def assert_untouched(folder: Path, before: dict) -> None:
    assert snapshot(folder) == before  # nothing changed, nothing staged or locked left behind


# --- models on disk --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama saved with save_pretrained, and its safetensors bytes."""
    from lossaudit.models.loading import load_model

    folder = tmp_path_factory.mktemp("saved") / "llama"
    load_model("llama").model.save_pretrained(folder)
    return folder


def model_variant(saved: Path, where: Path, name: str, weights: bytes | None = None, **files) -> Path:
    folder = where / name
    folder.mkdir()
    (folder / "config.json").write_bytes((saved / "config.json").read_bytes())
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    for file, data in files.items():
        (folder / file.replace("__", ".")).write_bytes(data)
    return folder


def header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(meta: dict, data: bytes) -> bytes:
    text = json.dumps(meta).encode()
    return struct.pack("<Q", len(text)) + text + data


def broken_safetensors(raw: bytes) -> dict[str, bytes]:
    meta, data = header(raw)
    name = next(k for k in meta if k != "__metadata__" and k.endswith("norm.weight"))
    misshapen = {**meta, name: {**meta[name], "shape": [meta[name]["shape"][0] * 2]}}  # offsets no longer fit
    return {
        "empty": b"",
        "short_header": raw[:4],
        "truncated": raw[: len(raw) // 2],
        "header_longer_than_file": struct.pack("<Q", 10**12) + raw[8:],
        "header_not_json": struct.pack("<Q", 5) + b"{nope" + data,
        "shape_does_not_fit_offsets": with_header(misshapen, data),
        "data_cut_short": raw[:-16],
    }


BROKEN = ["empty", "short_header", "truncated", "header_longer_than_file", "header_not_json",
          "shape_does_not_fit_offsets", "data_cut_short"]


@pytest.mark.parametrize("variant", BROKEN)
def test_a_broken_safetensors_file_is_refused_by_name(saved, tmp_path, prior, variant):
    raw = (saved / "model.safetensors").read_bytes()
    folder = model_variant(saved, tmp_path, variant, broken_safetensors(raw)[variant])
    before = snapshot(tmp_path)
    line = assert_contract(run("check", folder, *TINY, "--out", prior, "--overwrite"), 2, "model.safetensors")
    assert "look at the above report" not in line
    assert_untouched(tmp_path, before)


def test_a_safetensors_checkpoint_missing_a_layer_is_refused_with_the_count_and_first_keys(saved, tmp_path, prior):
    from safetensors.torch import load_file, save_file

    state = load_file(saved / "model.safetensors")
    kept = {k: v for k, v in state.items() if ".layers.1." not in k}
    gone = sorted(set(state) - set(kept))
    folder = model_variant(saved, tmp_path, "missing")
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(tmp_path)
    assert_contract(run("check", folder, *TINY, "--out", prior, "--overwrite"), 2,
                    f"{len(gone)} missing keys", gone[0])
    assert_untouched(tmp_path, before)


def test_a_pickle_shard_index_pointing_outside_the_model_is_refused(saved, tmp_path, prior):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere/pytorch_model.bin"}}
    folder = model_variant(saved, tmp_path, "pickled", pytorch_model__bin__index__json=json.dumps(index).encode())
    before = snapshot(tmp_path)
    assert_contract(run("check", folder, *TINY, "--allow-pickle", "--out", prior, "--overwrite"), 2,
                    "outside the model directory")
    assert_untouched(tmp_path, before)


def test_a_pickle_refusal_is_one_line_without_torch_warnings(saved, tmp_path, prior):
    import argparse

    import torch

    folder = model_variant(saved, tmp_path, "hostile")
    torch.save({"lm_head.weight": argparse.Namespace(x=1)}, folder / "pytorch_model.bin")
    before = snapshot(tmp_path)
    assert_contract(run("check", folder, *TINY, "--allow-pickle", "--out", prior, "--overwrite"), 2,
                    "weights_only", "argparse.Namespace")
    assert_untouched(tmp_path, before)


REMOTE_CONFIG = "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tinyremote'\n"
REMOTE_MODEL = ("from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
                "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")


def test_trust_remote_code_audits_a_remote_code_model(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    folder = model_variant(saved, tmp_path, "remote", (saved / "model.safetensors").read_bytes(),
                           config__json=json.dumps(config).encode(), configuration_tiny__py=REMOTE_CONFIG.encode(),
                           modeling_tiny__py=REMOTE_MODEL.encode())
    refused = run("check", folder, *TINY, "--out", tmp_path / "refused")
    assert_contract(refused, 2, "--trust-remote-code", "modeling_tiny.py")
    result = run("check", folder, *TINY, "--trust-remote-code", "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["model"]["class"] == "TinyForCausalLM" and report["model"]["task"] == "causal-lm"
    assert {c["reduction"] for c in report["cases"]} >= {"num_items", "mean_of_means"}


# --- bad input: exit 2 before any model is built -----------------------------------------------

BAD_MODULE = "def f(:\n"  # a SyntaxError when imported
EXITS = "import sys\n\n\ndef exits(*args, **kwargs):\n    sys.exit(0)\n\n\ndef raises(step):\n    raise ValueError('mine')\n"

USAGE = [
    (("--microbatches", ""), "--microbatches: is empty"),
    (("--paddings", ""), "--paddings: is empty"),
    (("--groupings", ","), "--groupings: is empty"),
    (("--reductions", ""), "--reductions: is empty"),
    (("--path", ""), "--path: is empty"),
    (("--path", "bogus"), "unknown path 'bogus'"),
    (("--seed", str(2**64)), "--seed"),
    (("--seed", "-1"), "--seed"),
    (("--reductions", "broken_mod:f"), "SyntaxError"),
    (("--loss-fn", "broken_mod:f"), "SyntaxError"),
    (("--trainer-arg", "seed=3"), "the audit sets these TrainingArguments itself"),
    (("--trainer-arg", "dataloader_num_workers=2"), "--trainer-arg dataloader_num_workers"),
    (("--trainer-arg", "save_strategy=steps"), "--trainer-arg save_strategy"),
    (("--trainer-arg", "eval_strategy=steps"), "--trainer-arg eval_strategy"),
    (("--trainer-arg", "bf16=banana"), "bf16=banana"),
    (("--trainer-arg", "label_smoothing_factor=high"), "label_smoothing_factor"),
    (("--out", ""), "--out"),
]


@pytest.mark.parametrize("args, needle", USAGE, ids=[" ".join(a) or "empty" for a, _ in USAGE])
def test_bad_input_is_exit_2_before_the_model_is_built(tmp_path, prior, args, needle):
    (tmp_path / "broken_mod.py").write_text(BAD_MODULE)
    before = snapshot(tmp_path)
    out = () if "--out" in args else ("--out", prior, "--overwrite")
    started = time.monotonic()
    assert_contract(run("check", "llama", *SMALL, *args, *out, cwd=tmp_path,
                        extra_env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}), 2, needle)
    assert_untouched(tmp_path, before)
    assert time.monotonic() - started < 60  # refused when read, not after an audit


def test_every_argument_the_trainer_step_sets_is_refused():
    from types import SimpleNamespace

    from lossaudit.audit.config import AUDIT_SETS
    from lossaudit.paths.trainer_step import _settings

    ctx = SimpleNamespace(config=SimpleNamespace(seed=0), device=SimpleNamespace(type="cpu"))
    for world_size in (1, 2):
        layout = SimpleNamespace(world_size=world_size, microbatches=1, groups=[[0, 1]])
        try:
            settings = _settings(ctx, layout, "out")
        except (AttributeError, TypeError):  # the layout helper needs more: the keys are what counts
            pytest.skip("trainer_step._settings needs a real layout")
        assert set(settings) <= set(AUDIT_SETS), sorted(set(settings) - set(AUDIT_SETS))


def test_explain_refuses_a_seed_out_of_range():
    assert_contract(run("explain", "--model", "llama", "--seed", str(2**64)), 2, "--seed")


def test_sweep_types_empty_is_refused(tmp_path):
    assert_contract(run("sweep", "--types", "", "--out", tmp_path / "s"), 2, "--types")
    assert not (tmp_path / "s").exists()


def test_an_out_holding_other_files_keeps_them_and_gets_the_report(tmp_path):
    """A tool that logs into the directory it hands to --out (as the DESIGN contract's own check
    does) keeps its files; the report's files land beside them, and nothing staged is left."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    result = run("check", "llama", *TINY, "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == sorted(["notes.txt", *OLD_REPORT]), names
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "r" / "report.json").read_text())["cases"]


def test_debug_adds_the_traceback_but_keeps_the_exit_status(tmp_path):
    result = run("check", "llama", "--microbatches", "", extra_env={"LOSSAUDIT_DEBUG": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lossaudit: error: --microbatches")


# --- reports given to compare and check --baseline ----------------------------------------------

@pytest.fixture(scope="module")
def good_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "r"
    result = run("check", "llama", *TINY, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


BAD_FIELDS = [("path", 5), ("microbatches", "four"), ("verdict", "fine"), ("grad_rel_err", "small"),
              ("expected", "no")]


@pytest.mark.parametrize("key, value", BAD_FIELDS)
def test_compare_refuses_a_report_with_a_bad_field(tmp_path, good_report, key, value):
    (tmp_path / "old.json").write_text(json.dumps(good_report))
    bad = json.loads(json.dumps(good_report))
    bad["cases"][0][key] = value
    (tmp_path / "new.json").write_text(json.dumps(bad))
    before = snapshot(tmp_path)
    assert_contract(run("compare", tmp_path / "old.json", tmp_path / "new.json"), 2, "new.json", repr(key))
    assert_untouched(tmp_path, before)


def test_check_refuses_a_bad_baseline_before_the_audit(tmp_path, good_report):
    bad = json.loads(json.dumps(good_report))
    bad["cases"][0]["path"] = 5
    (tmp_path / "base.json").write_text(json.dumps(bad))
    before = snapshot(tmp_path)
    started = time.monotonic()
    # an unknown model would be refused too, but only after the baseline: the audit never starts
    assert_contract(run("check", "llama", *TINY, "--baseline", tmp_path / "base.json", "--out", tmp_path / "r"),
                    2, "base.json", "'path'")
    assert time.monotonic() - started < 60
    assert_untouched(tmp_path, before)


def test_compare_with_an_endless_file_stops_reading(tmp_path, good_report):
    (tmp_path / "old.json").write_text(json.dumps(good_report))
    resource_limit = 2 << 30  # a read until MemoryError would pass this; a bounded one does not

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (resource_limit, resource_limit))

    assert_contract(run("compare", tmp_path / "old.json", "/dev/zero", preexec=limit), 2, "/dev/zero", "larger than")


# --- the report directory: one unit, one writer ------------------------------------------------

def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.02)


def paused(point: str, tmp_path: Path) -> tuple[Path, dict]:
    hook = tmp_path / f"hook-{point}"
    hook.mkdir()
    return hook, {"LOSSAUDIT_TEST_PAUSE": f"{point}:{hook}"}


@pytest.mark.parametrize("sig, word", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_signal_before_the_swap_leaves_the_old_report_whole_and_nothing_staged(tmp_path, prior, sig, word):
    hook, pause = paused("staged", tmp_path)
    before = snapshot(prior)
    proc = start("check", "llama", *TINY, "--out", prior, "--overwrite", extra_env=pause)
    wait_for(hook / "reached-staged", proc)
    assert any(p.name.startswith(".r.staging-") for p in tmp_path.iterdir())  # the new report sits staged
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert_contract(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 3, word)
    assert snapshot(prior) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook-staged", "r"]  # no staged files, no lock


def test_a_signal_during_the_swap_waits_for_it_the_new_report_is_whole(tmp_path, prior):
    hook, pause = paused("swapping", tmp_path)
    proc = start("check", "llama", *TINY, "--out", prior, "--overwrite", extra_env=pause)
    wait_for(hook / "reached-swapping", proc)
    proc.send_signal(signal.SIGTERM)  # held back until the swap is done
    (hook / "go-swapping").touch()
    _, stderr = proc.communicate(timeout=60)
    assert_contract(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 3, "terminated")
    files = {p.name: p.read_text() for p in prior.iterdir()}
    assert set(files) == set(OLD_REPORT) and not set(files.values()) & set(OLD_REPORT.values())
    assert json.loads(files["report.json"])["schema"] == "lossaudit.report/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook-swapping", "r"]


def test_a_second_writer_of_the_same_out_is_refused_naming_the_lock(tmp_path):
    hook, pause = paused("locked", tmp_path)
    out = tmp_path / "r"
    first = start("check", "llama", *TINY, "--out", out, extra_env=pause)
    wait_for(hook / "reached-locked", first)
    second = run("check", "llama", *TINY, "--out", out)
    assert_contract(second, 2, f"--out {out}", ".r.lock")
    (hook / "go-locked").touch()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["cases"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook-locked", "r"]


@pytest.mark.heavy  # two concurrent runs
def test_two_runs_with_the_default_out_write_two_reports(tmp_path):
    hook, pause = paused("locked", tmp_path)
    first = start("check", "llama", *TINY, cwd=tmp_path, extra_env=pause)
    wait_for(hook / "reached-locked", first)
    second = run("check", "llama", *TINY, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    (hook / "go-locked").touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    reports = tmp_path / "reports"
    assert sorted(p.name for p in reports.iterdir()) == ["llama-causal-lm", "llama-causal-lm-2"]
    assert all((reports / name / "report.json").is_file() for name in ("llama-causal-lm", "llama-causal-lm-2"))


def test_the_lock_is_exclusive_and_dropped_with_its_holder(tmp_path):
    from lossaudit.report.outdir import lock_path, try_lock, unlock

    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from lossaudit.report.outdir import try_lock; assert try_lock(Path(sys.argv[1])) is not None; "
                               "print('held', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
    assert holder.stdout.readline().strip() == "held"
    assert try_lock(out) is None  # held by the other process
    holder.kill()  # a killed holder leaves the file, not the lock
    holder.wait()
    fd = try_lock(out)
    assert fd is not None
    unlock(out, fd)
    assert not lock_path(out).exists()


# --- the environment: exit 3 ---------------------------------------------------------------------

def test_cpu_out_of_memory_names_the_knobs(tmp_path, prior):
    def limit():  # a bound of our own, so that no machine setting lets the allocation through
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    before = snapshot(tmp_path)
    result = run("check", "llama", *SMALL, "--max-length", str(10**12), *TINY[len(SMALL):], "--out", prior,
                 "--overwrite", preexec=limit)
    assert_contract(result, 3, "out of memory on cpu", "--batch-size", "--max-length")
    assert_untouched(tmp_path, before)


def test_a_full_disk_is_exit_3_and_the_old_report_stays_whole(tmp_path, prior):
    def limit():  # writes past 64 KiB fail with EFBIG, as on a full disk (the HTML report is larger)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    before = snapshot(tmp_path)
    assert_contract(run("check", "llama", *TINY, "--out", prior, "--overwrite", preexec=limit), 3,
                    "cannot write the report", "File too large")
    assert_untouched(tmp_path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_permission_error_is_named_as_such(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_contract(run("check", "llama", *TINY, "--out", locked / "r"), 2, "permission denied")
    finally:
        locked.chmod(0o700)


def test_term_dumb_progress_writes_no_escape_codes(tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lossaudit", "check", "llama", *TINY, "--out", str(tmp_path / "r")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            env=env(TERM="dumb"))
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0, seen[-2000:]
    assert b"[1/1]" in seen and b"\x1b" not in seen


# --- user code: the lead's guard ------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--reductions", "--loss-fn"])
def test_user_code_calling_sys_exit_never_passes_for_a_clean_run(tmp_path, option):
    (tmp_path / "exits_mod.py").write_text(EXITS)
    spec = "exits_mod:exits" if option == "--loss-fn" else "exits_mod:exits,num_items"
    path = ("--path", "loss-fn") if option == "--loss-fn" else ()
    result = run("check", "llama", *TINY, *path, option, spec, "--out", tmp_path / "r", cwd=tmp_path,
                 extra_env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert result.returncode != 0 and result.stderr.strip()
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("option", ["--reductions", "--loss-fn"])
def test_user_code_calling_sys_exit_ends_the_run_naming_it_and_keeps_the_old_report(tmp_path, option):
    """SystemExit is never swallowed into a case: the run stops, says whose code exited, and
    writes nothing over what --out held."""
    (tmp_path / "exits_mod.py").write_text(EXITS)
    out = tmp_path / "r"
    out.mkdir()
    for name, text in OLD_REPORT.items():
        (out / name).write_text(text)
    spec = "exits_mod:exits" if option == "--loss-fn" else "exits_mod:exits,num_items"
    path = ("--path", "loss-fn") if option == "--loss-fn" else ()
    result = run("check", "llama", *TINY, *path, option, spec, "--out", out, "--overwrite", cwd=tmp_path,
                 extra_env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert "called sys.exit(0)" in line and ("loss-fn" in line or "reduction" in line), line
    assert {p.name: p.read_text() for p in out.iterdir()} == OLD_REPORT


def test_a_failing_custom_reduction_keeps_the_built_in_cases_of_its_layout(tmp_path):
    (tmp_path / "exits_mod.py").write_text(EXITS)
    result = run("check", "llama", *TINY, "--reductions", "exits_mod:raises,num_items", "--out",
                 tmp_path / "r", cwd=tmp_path, extra_env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert result.returncode == 1, result.stderr[-3000:]
    cases = json.loads((tmp_path / "r" / "report.json").read_text())["cases"]
    by_reduction = {c["reduction"]: c["verdict"] for c in cases}
    assert by_reduction == {"exits_mod:raises": "error", "num_items": "match"}


# --- the new surfaces: steps, trainer classes, adapters, PEFT, launchers (issue 26) ------------------

HOSTILE = '''import os
import sys

import torch
import transformers

from lossaudit.core.errors import DivergenceError, UsageError


def _targets(mb):
    return int((mb["labels"][:, 1:] != -100).sum())


def sgd(model, microbatches):
    """A right step that then applies its update, as real loops do."""
    total = sum(_targets(mb) for mb in microbatches)
    loss = 0.0
    for mb in microbatches:
        logits = model(**{k: v for k, v in mb.items() if k != "labels"}).logits[:, :-1].float()
        part = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum") / total
        part.backward()
        loss += float(part.detach())
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return loss


def chdir(model, microbatches):
    os.chdir("/")
    return sgd(model, microbatches)


def exit0(model, microbatches):
    os._exit(0)


def exit7(model, microbatches):
    os._exit(7)


def sys_exit(model, microbatches):
    sys.exit(0)


def usage(model, microbatches):
    raise UsageError("mine, not lossaudit's")


def divergence(model, microbatches):
    raise DivergenceError("mine, not lossaudit's")


def factory(model):
    os._exit(0)


def words(step):
    return ["heavy"] * step.k


class ExitingTrainer(transformers.Trainer):
    def __init__(self, *args, **kwargs):
        os._exit(0)
'''
EXITS_ON_IMPORT = "import os\n\nos._exit(0)\n\n\ndef step(model, microbatches):\n    return 0.0\n"


@pytest.fixture
def hostile(tmp_path):
    """(cwd, environment) with the hostile modules importable."""
    (tmp_path / "hostile.py").write_text(HOSTILE)
    (tmp_path / "exits_on_import.py").write_text(EXITS_ON_IMPORT)
    return tmp_path, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}


def has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


# item 5: a hard exit in user code is never clean, whatever its status; the line says so
HARD_EXITS = [
    (("--path", "step", "--step", "hostile:exit0"), "without an answer (exit status 0)"),
    (("--path", "step", "--step", "hostile:exit7"), "without an answer (exit status 7)"),
    (("--path", "step", "--step", "exits_on_import:step"), "without an answer (exit status 0)"),
    (("--path", "step", "--step", "hostile:sys_exit"), "called sys.exit(0)"),
    (("--path", "trainer", "--trainer-class", "hostile:ExitingTrainer"), "without an answer (exit status 0)"),
    pytest.param(("--path", "lightning", "--lightning-module", "hostile:factory"), "without an answer",
                 marks=pytest.mark.skipif(not has("lightning"), reason="needs lightning")),
]


def ids(table) -> list[str]:
    return [" ".join(map(str, (row.values if hasattr(row, "values") else row)[0])) for row in table]


@pytest.mark.parametrize("args, needle", HARD_EXITS, ids=ids(HARD_EXITS))
def test_user_code_that_hard_exits_is_exit_3_and_keeps_the_old_report(hostile, prior, args, needle):
    cwd, extra = hostile
    before = snapshot(prior)
    result = run("check", "llama", *SMALL, *args, "--out", prior, "--overwrite", cwd=cwd, extra_env=extra)
    assert_contract(result, 3, needle)
    assert snapshot(prior) == before


@pytest.mark.parametrize("fn", ["usage", "divergence"])
def test_lossaudits_own_errors_raised_by_user_code_are_its_error_cases(hostile, fn):
    """A UsageError or DivergenceError from the step is the step's failure (error cases, exit 1),
    not lossaudit's verdict on the command line (2) or on the audit."""
    cwd, extra = hostile
    result = run("check", "llama", *TINY[:-6], "--path", "step", "--step", f"hostile:{fn}", "--paddings", "right",
                 "--groupings", "contiguous", "--out", cwd / "r", cwd=cwd, extra_env=extra)
    assert result.returncode == 1, result.stderr[-3000:]
    cases = json.loads((cwd / "r" / "report.json").read_text())["cases"]
    assert cases and all(c["verdict"] == "error" and "mine, not lossaudit's" in c["detail"] for c in cases)


# item 2: a step that applies its update leaves every later layout and path the model it found
def test_a_step_that_updates_the_model_leaves_later_layouts_and_the_trainer_as_they_were(hostile):
    cwd, extra = hostile
    result = run("check", "llama", "--batch-size", "4", "--max-length", "8", "--microbatches", "1,2", "--paddings",
                 "right", "--groupings", "contiguous", "--path", "step,trainer", "--step", "hostile:sgd",
                 "--out", cwd / "r", cwd=cwd, extra_env=extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = json.loads((cwd / "r" / "report.json").read_text())["cases"]
    assert {c["path"] for c in cases} == {"step", "trainer"} and len(cases) >= 4
    assert all(c["verdict"] == "match" for c in cases), [(c["path"], c["detail"]) for c in cases]


# item 9: the report goes where --out said when the run started, and its lock goes too
def test_a_step_that_changes_directory_writes_the_report_where_out_said(hostile):
    cwd, extra = hostile
    result = run("check", "llama", *TINY[:-6], "--paddings", "right", "--groupings", "contiguous", "--path", "step",
                 "--step", "hostile:chdir", "--out", "r", cwd=cwd, extra_env=extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((cwd / "r" / "report.json").read_text())["cases"]
    assert not [p.name for p in cwd.iterdir() if p.name.endswith(".lock")]


# item 6: a user's reduction whose weights are not numbers is its error case, the others stay
def test_a_reduction_whose_weights_are_not_numbers_is_an_error_case(hostile):
    cwd, extra = hostile
    result = run("check", "llama", *TINY, "--reductions", "hostile:words,num_items", "--out", cwd / "r",
                 cwd=cwd, extra_env=extra)
    assert result.returncode == 1, result.stderr[-3000:]
    cases = {c["reduction"]: c for c in json.loads((cwd / "r" / "report.json").read_text())["cases"]}
    assert cases["hostile:words"]["verdict"] == "error" and "str" in cases["hostile:words"]["detail"]
    assert cases["num_items"]["verdict"] == "match"


# items 6, 7 and 10: the stack options refused before any model is built, each with exit 2
STACK_USAGE = [
    (("--max-memory", "1e308"), "--max-memory"),
    (("--peft", "lora", "--peft-arg", "inference_mode=true"), "--peft-arg inference_mode"),
    (("--peft", "lora", "--peft-arg", "lora_alpha=nan"), "lora_alpha=nan"),
    (("--peft", "xlora"), "--peft xlora"),
    (("--peft", "no_such_method"), "--peft no_such_method"),
    (("--step", "hostile:sgd", "--data-parallel", "fsdp2"), "--data-parallel fsdp2: shards over ranks"),
    (("--step", "hostile:sgd", "--data-parallel", "fsdp2", "--world-size", "2"), "not --path lightning"),
    (("--step", "hostile:sgd", "--data-parallel", "zero3"), "--data-parallel zero3: DeepSpeed runs on ranks here"),
    (("--step", "hostile:sgd", "--data-parallel", "zero4"), "--data-parallel: must be one of ddp, fsdp2, zero1, zero2, zero3"),
    (("--trainer-class", "hostile:ExitingTrainer", "--world-size", "2"), "--world-size 2"),
    (("--step", "hostile:sgd", "--path", "reduction"), "--step: drives --path step"),
    (("--trainer-class", "hostile:ExitingTrainer", "--path", "reduction"), "--trainer-class: drives --path trainer"),
    (("--lightning-module", "hostile:factory", "--path", "reduction"), "--lightning-module: drives --path lightning"),
    (("--step", "no_such_module:f"), "step function 'no_such_module:f'"),
    (("--step", "hostile:nothing"), "hostile:nothing"),
    (("--trainer-class", "hostile:sgd"), "not a subclass of transformers.Trainer"),
    (("--adapter", "no/such/folder"), "--adapter no/such/folder"),
    pytest.param(("--path", "trainer", "--trainer-class", "trl:SFTTrainer", "--trainer-arg", "packing=banana"),
                 "packing=banana", marks=pytest.mark.skipif(not has("trl"), reason="needs trl")),
]


@pytest.mark.parametrize("args, needle", STACK_USAGE, ids=ids(STACK_USAGE))
def test_stack_options_are_refused_before_the_model_is_built(hostile, prior, args, needle):
    cwd, extra = hostile
    before = snapshot(cwd)
    started = time.monotonic()
    assert_contract(run("check", "llama", *SMALL, *args, "--out", prior, "--overwrite", cwd=cwd, extra_env=extra),
                    2, needle)
    assert_untouched(cwd, before)
    assert time.monotonic() - started < 60


def test_every_stack_problem_is_named_at_once(hostile, prior):
    cwd, extra = hostile
    line = assert_contract(run("check", "llama", *SMALL, "--path", "reduction", "--step", "no_such_module:f",
                               "--trainer-class", "hostile:sgd", "--peft", "lora", "--peft-arg", "lora_alpha=inf",
                               "--max-memory", "1e308", "--out", prior, "--overwrite", cwd=cwd, extra_env=extra), 2)
    for needle in ("--step: drives", "no_such_module", "--trainer-class: drives", "not a subclass",
                   "lora_alpha=inf", "--max-memory"):
        assert needle in line, (needle, line)


# item 8: a launcher's environment that cannot be a group is bad input
LAUNCH = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
BAD_LAUNCHES = [({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5"), ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1"),
                ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc'"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
                ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000")]


@pytest.mark.parametrize("launch, needle", BAD_LAUNCHES, ids=[n for _, n in BAD_LAUNCHES])
def test_a_launcher_environment_that_is_no_group_is_refused(tmp_path, prior, launch, needle):
    before = snapshot(tmp_path)
    assert_contract(run("check", "llama", *TINY, "--out", prior, "--overwrite", extra_env={**LAUNCH, **launch}),
                    2, needle)
    assert_untouched(tmp_path, before)


# items 1, 4 and 10: adapters on disk
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter of the tiny llama, saved by peft, and its safetensors' tensors."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from lossaudit.models.loading import load_model

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model = get_peft_model(load_model("llama").model, LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                 target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    return folder, load_file(folder / "adapter_model.safetensors")


def adapter_variant(adapter, where: Path, name: str, weights: bytes | dict | None = None, config: str | None = None):
    from safetensors.torch import save_file

    good, _ = adapter
    folder = where / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config if config is not None else
                                                (good / "adapter_config.json").read_text())
    if isinstance(weights, dict):
        save_file(weights, folder / "adapter_model.safetensors")
    else:
        (folder / "adapter_model.safetensors").write_bytes(
            weights if weights is not None else (good / "adapter_model.safetensors").read_bytes())
    return folder


def broken_adapters(adapter) -> dict:
    good, tensors = adapter
    raw = (good / "adapter_model.safetensors").read_bytes()
    keys = sorted(tensors)
    first = keys[0]
    return {
        "empty": (dict(weights=b""), "adapter_model.safetensors"),
        "cut": (dict(weights=raw[: len(raw) // 2]), "adapter_model.safetensors"),
        "garbled": (dict(weights=struct.pack("<Q", 5) + b"{nope" + raw[64:]), "adapter_model.safetensors"),
        "misshapen": (dict(weights={**tensors, first: tensors[first][:1].contiguous()}), "do not fit"),
        "no_tensors": (dict(weights={}), "holds no tensors"),
        "half_the_tensors": (dict(weights={k: tensors[k] for k in keys[: len(keys) // 2]}),
                             f"lacks {len(keys) - len(keys) // 2} of the adapter's {len(keys)} weights"),
        "config_not_json": (dict(config="{not json"), "adapter_config.json"),
        "config_not_an_object": (dict(config="[1, 2]"), "not a JSON object"),
    }


BROKEN_ADAPTERS = ["empty", "cut", "garbled", "misshapen", "no_tensors", "half_the_tensors", "config_not_json",
                   "config_not_an_object"]


@pytest.mark.parametrize("variant", BROKEN_ADAPTERS)
def test_a_broken_adapter_is_refused_in_one_line(adapter, tmp_path, prior, variant):
    files, needle = broken_adapters(adapter)[variant]
    folder = adapter_variant(adapter, tmp_path, variant, **files)
    before = snapshot(tmp_path)
    assert_contract(run("check", "llama", *TINY, "--adapter", folder, "--out", prior, "--overwrite"), 2, needle)
    assert_untouched(tmp_path, before)


def test_an_adapter_config_linked_to_a_system_file_is_refused(adapter, tmp_path, prior):
    folder = adapter_variant(adapter, tmp_path, "linked")
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to("/etc/passwd")
    assert_contract(run("check", "llama", *TINY, "--adapter", folder, "--out", prior, "--overwrite"), 2,
                    "adapter_config.json")


class Hub:
    """A stand-in for the hub (HF_ENDPOINT) that records every request it gets."""

    def __enter__(self):
        import http.server
        import threading

        seen = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def xlora_config(adapters: dict) -> str:
    return json.dumps({"peft_type": "XLORA", "task_type": "CAUSAL_LM", "hidden_size": 64, "xlora_depth": 1,
                       "adapters": adapters})


def test_an_xlora_adapter_naming_a_hub_id_downloads_nothing(adapter, tmp_path, prior):
    folder = adapter_variant(adapter, tmp_path, "xlora", config=xlora_config({"evil": "someorg/evil-adapter"}))
    with Hub() as hub:
        result = run("check", "llama", *TINY, "--adapter", folder, "--out", prior, "--overwrite", cwd=tmp_path,
                     extra_env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    assert_contract(result, 2, "someorg/evil-adapter", "--allow-download")
    assert hub.requests == []


@pytest.mark.parametrize("where, needle", [("outside", "outside the adapter folder"), ("inside", "--allow-pickle")])
def test_an_xlora_adapter_naming_a_pickle_folder_is_refused(adapter, tmp_path, prior, where, needle):
    import torch

    folder = adapter_variant(adapter, tmp_path, "xlora", config="{}")
    pickled = (tmp_path / "elsewhere") if where == "outside" else (folder / "pickled")
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter[0] / "adapter_config.json").read_text())
    torch.save(dict(adapter[1]), pickled / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(xlora_config({"other": str(pickled)}))
    assert_contract(run("check", "llama", *TINY, "--adapter", folder, "--out", prior, "--overwrite", cwd=tmp_path),
                    2, needle)


@pytest.mark.parametrize("stack", ["adapter", "peft"])
def test_adapter_and_peft_runs_print_no_library_warnings(adapter, tmp_path, stack):
    args = ("--adapter", adapter[0]) if stack == "adapter" else ("--peft", "lora")
    result = run("check", "llama", *TINY, *args, "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == ""
