"""Faults during a run: NaN/Inf, a path that raises, out of memory. One bad case never
loses the others; running out of memory is one message that names the knobs (exit 3)."""

import json

import pytest
import torch

from lossaudit.audit import harness
from lossaudit.cli import app as cli
from lossaudit.audit.config import CheckConfig
from lossaudit.core.grads import trainable
from lossaudit.paths.base import PATHS, AuditContext, Label, PathSpec, StepPath
from lossaudit.paths.model import ModelPath
from lossaudit.core.reference import compute_reference

from toy import ToyLM, toy_batch

pytestmark = pytest.mark.filterwarnings("ignore:std.*degrees of freedom")
CPU = torch.device("cpu")
LENGTHS, PROMPTS = [9, 3, 7, 2, 5], [1, 1, 4, 1, 2]


class BatchStatsLM(ToyLM):
    """Scales logits by a statistic over the batch dimension, as a batch normaliser does:
    one sequence has no spread, so a one-sequence microbatch gets NaN logits (0/0)."""

    def scores(self, input_ids):
        spread = torch.arange(input_ids.shape[0], dtype=torch.float64).std()  # NaN for one row
        return super().scores(input_ids) * (spread / spread)


class GateLM(ToyLM):
    """Finite forward, but sqrt(0) in the backward of ``gate`` on one-sequence microbatches."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))

    def scores(self, input_ids):
        return super().scores(input_ids) + 0.0 * torch.sqrt(self.gate * (input_ids.shape[0] - 1))


class LossCrashLM(ToyLM):
    """The model's own loss code raises on one-sequence microbatches; its logits are fine."""

    def forward(self, input_ids, labels=None, **kwargs):
        if labels is not None and input_ids.shape[0] == 1:
            raise ValueError("cannot compute a loss\nfor one sequence")
        return super().forward(input_ids, labels=labels, **kwargs)


class ForwardCrashLM(ToyLM):
    def forward(self, input_ids, **kwargs):
        if input_ids.shape[0] == 1:
            raise RuntimeError("shape mismatch in attention")
        return super().forward(input_ids, **kwargs)


def run_toy(model, lengths=LENGTHS, prompts=PROMPTS, ks=(2, 5), paths=("model", "reduction")):
    """The harness's run on a float64 toy model: k=2 holds several sequences per
    microbatch, k=5 one each."""
    batch = toy_batch(lengths, prompts)
    config = CheckConfig(model="toy", batch_size=len(batch), microbatches=ks, paths=paths,
                         paddings=("right",), groupings=("contiguous",), dtype="float64")
    params = trainable(model)
    ctx = AuditContext(model, batch, compute_reference(model, batch, params, CPU), params, CPU, config)
    return harness.run_cases(ctx).cases


def case(cases, k, path, reduction=None):
    rows = cases[(cases["microbatches"] == k) & (cases["path"] == path)]
    rows = rows[rows["reduction"] == reduction] if reduction else rows
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_nan_logits_make_the_case_an_error_naming_the_tensor_and_the_run_goes_on():
    cases = run_toy(BatchStatsLM())
    for path, reduction in (("model", None), ("reduction", "num_items"), ("reduction", "mean_of_means")):
        bad = case(cases, 5, path, reduction)
        assert bad["verdict"] == "error", bad["detail"]
        assert "logits of microbatch 1 of 5" in bad["detail"]
        assert bad["first_nonfinite"] == "NaN/Inf in the logits of microbatch 1 of 5"
    for path, reduction in (("model", None), ("reduction", "num_items")):
        assert case(cases, 2, path, reduction)["verdict"] == "match"
    assert len(cases) == 2 * 5  # two layouts x (model + four reductions): none lost


def test_a_nan_only_in_one_gradient_names_that_parameter():
    cases = run_toy(GateLM())
    bad = case(cases, 5, "reduction", "num_items")
    assert bad["verdict"] == "error"
    assert bad["first_nonfinite"] == "gate" and "first non-finite gradient in gate" in bad["detail"]
    assert case(cases, 5, "model")["verdict"] == "error"
    assert case(cases, 2, "reduction", "num_items")["verdict"] == "match"


def test_an_empty_microbatch_under_mean_of_means_stays_a_named_diverge():
    prompts = PROMPTS[:-1] + [LENGTHS[-1]]  # the last sequence has no target
    cases = run_toy(ToyLM(), prompts=prompts)
    mom = case(cases, 5, "reduction", "mean_of_means")
    assert mom["verdict"] == "diverge" and "microbatch 5 of 5 holds zero target tokens" in mom["detail"]
    assert case(cases, 5, "reduction", "num_items")["verdict"] == "match"


def test_an_empty_microbatch_does_not_excuse_an_unrelated_nan():
    prompts = PROMPTS[:-1] + [LENGTHS[-1]]
    cases = run_toy(GateLM(), prompts=prompts)
    assert case(cases, 5, "reduction", "mean_of_means")["verdict"] == "diverge"  # 0/0 is still the cause
    num_items = case(cases, 5, "reduction", "num_items")
    assert num_items["verdict"] == "error" and "gate" in num_items["detail"]


def test_the_models_loss_code_raising_fails_only_the_model_path():
    cases = run_toy(LossCrashLM())
    model = case(cases, 5, "model")
    assert model["verdict"] == "error"
    assert "ValueError: cannot compute a loss for one sequence" in model["detail"]
    assert "\n" not in model["detail"]
    assert case(cases, 5, "reduction", "num_items")["verdict"] == "match"  # forward retried without labels
    assert case(cases, 2, "model")["verdict"] == "match"


def test_a_forward_that_raises_on_one_layout_fails_that_layout_only():
    cases = run_toy(ForwardCrashLM())
    k5 = cases[cases["microbatches"] == 5]
    assert (k5["verdict"] == "error").all() and len(k5) == 5  # model + each reduction: none lost
    assert k5["detail"].str.contains("RuntimeError: shape mismatch in attention").all()
    k2 = cases[cases["microbatches"] == 2]
    assert len(k2) == 5 and (k2[~k2["expected"]]["verdict"] == "match").all()


class BoomPath(StepPath):
    name = "boom"
    label = Label("boom")

    def run(self, ctx, layout):
        raise KeyError("no such parameter group")


def test_a_step_path_that_raises_is_an_error_case(monkeypatch):
    monkeypatch.setitem(PATHS._items, "boom", PathSpec("boom", lambda config: [BoomPath()], ("causal-lm",)))
    cases = run_toy(ToyLM(), paths=("boom", "reduction"))
    boom = cases[cases["path"] == "boom"]
    assert len(boom) == 2 and (boom["verdict"] == "error").all()
    assert boom["detail"].str.contains("KeyError: 'no such parameter group'").all()
    assert (cases[cases["reduction"] == "num_items"]["verdict"] == "match").all()


def test_the_cli_writes_the_report_with_the_failed_path_as_an_error(tmp_path, monkeypatch, capsys):
    original = ModelPath.microbatch

    def crash_on_k2(self, view):
        if view.step.k == 2:
            raise RuntimeError("planted")
        return original(self, view)

    monkeypatch.setattr(ModelPath, "microbatch", crash_on_k2)
    status = cli.main(["check", "llama", "--microbatches", "1,2", "--batch-size", "4", "--max-length", "12",
                       "--out", str(tmp_path / "r")])
    assert status == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    errors = [c for c in report["cases"] if c["verdict"] == "error"]
    assert errors and all(c["path"] == "model" and c["microbatches"] == 2 for c in errors)
    assert all("RuntimeError: planted" in c["detail"] for c in errors)
    assert any(c["path"] == "model" and c["microbatches"] == 1 and c["verdict"] == "match" for c in report["cases"])
    assert "FINDING" in capsys.readouterr().out


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
])
@pytest.mark.parametrize("where", ["path", "reference", "trainer", "accelerate"])
def test_out_of_memory_is_one_line_naming_the_knobs_and_exit_3(exc, where, monkeypatch, capsys, tmp_path):
    """Out of memory ends the run wherever it happens, a step path's own loop included (the
    guard never turns it into an error case)."""
    from lossaudit.paths import accelerate, trainer

    def boom(*args, **kwargs):
        raise exc

    path = where if where in ("trainer", "accelerate") else "model"
    if where == "path":  # inside a path: must not be swallowed into an error case
        monkeypatch.setattr(ModelPath, "microbatch", boom)
    elif where == "reference":
        monkeypatch.setattr(harness, "compute_reference", boom)
    elif where == "trainer":
        monkeypatch.setattr(trainer, "trainer_step", boom)
    else:
        monkeypatch.setattr(accelerate, "run_step", boom)
    status = cli.main(["check", "llama", "--microbatches", "1", "--path", path, "--batch-size", "2",
                       "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "out of memory" in lines[0] and "--batch-size (now 2)" in lines[0] and "--max-length (now 32)" in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("values, dtype, want", [
    ([1.0, 2.0], torch.float32, False),
    ([1.0, float("nan")], torch.float32, True),
    ([float("inf"), float("-inf")], torch.float32, True),  # the sum is NaN, so is the answer
    ([3e38, 3e38], torch.float32, False),  # the sum overflows; every value is finite
    ([3e38, float("inf")], torch.float32, True),
    ([1.0, float("nan")], torch.bfloat16, True),
    ([1, 2], torch.int64, False),
])
def test_has_nonfinite(values, dtype, want):
    from lossaudit.core.finite import has_nonfinite

    assert has_nonfinite(torch.tensor(values, dtype=dtype)) is want
