"""The memory model (lossaudit.audit.memory) checked by measurement: the live tensor bytes of a real
audit on the CPU stay within ``audit_extra_bytes`` of a plain training step on the same model
and batch, each extra reduction costs what the formula says, to the byte; and the formula,
evaluated on the 8B Llama shape, against issue 18's targets."""

import dataclasses

import pytest
import torch

from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import audit, batch_for
from lossaudit.core.layouts import full_batch
from lossaudit.audit.memory import (GIB, AuditShape, LiveTensorBytes, audit_extra_bytes, audit_peak_bytes, keeps_correct,
                              model_loss_bytes, shape_of, sums_held)
from lossaudit.models.loading import load_model
from lossaudit.audit.passes import sums_per_pass
from lossaudit.paths import PATHS
from lossaudit.core.forward import forward
from lossaudit.core.tokens import target_mask, token_losses

# A tiny Llama whose parameters (1.4 M, 5.6 MB) outweigh its activations on 8 x 16 tokens, so
# the parameter-sized terms of the formula are what the measurement sees.
WIDE = dict(hidden_size=256, intermediate_size=512, vocab_size=1024, num_attention_heads=4, num_key_value_heads=2)
BATCH, LENGTH = 8, 16


def fresh():
    return load_model("llama", seed=0, config_overrides=WIDE)


def config(paths, reductions=None):
    """Two layouts (k=1 and k=4): a peak is one layout's, more layouts only cost time."""
    return CheckConfig(model="llama", paths=paths, microbatches=(1, 4), paddings=("right",), groupings=("contiguous",),
                       batch_size=BATCH, max_length=LENGTH,
                       **({"reductions": tuple(reductions)} if reductions is not None else {}))


def peak_of(run) -> tuple[int, object]:
    """Peak live tensor bytes (weights included) of ``run(loaded)`` on a fresh model."""
    loaded = fresh()
    with LiveTensorBytes() as meter:
        meter.count_existing(loaded.model)
        run(loaded)
    return meter.peak, loaded


def training_step(loaded) -> None:
    """A plain step: the full batch forward, its token-mean loss (as the reference computes
    it), backward into .grad, SGD."""
    batch = full_batch(batch_for(loaded, config(None).batch_spec))
    outputs, _ = forward(loaded.model, batch, torch.device("cpu"))
    losses = token_losses(outputs.logits, batch.labels, loaded.task)
    (losses.sum() / int(target_mask(batch.labels, loaded.task).sum())).backward()
    torch.optim.SGD(loaded.model.parameters(), lr=1e-3).step()


@pytest.fixture(scope="module")
def train_peak() -> int:
    return peak_of(training_step)[0]


# ---- the meter ----------------------------------------------------------------------------

def test_meter_counts_storages_until_they_are_freed():
    with LiveTensorBytes() as meter:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:20]  # the same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)  # 4000
        assert meter.live == 8000 and view.numel() == 10
        del a, view
        assert meter.live == 4000
        c = torch.zeros(3000)  # 12000: the peak is 16000
        del b, c
        assert meter.live == 0 and meter.peak == 16000


def test_meter_sees_the_backward_and_what_it_is_shown():
    x = torch.randn(100, 100, requires_grad=True)
    with LiveTensorBytes() as meter:
        meter.count_existing(x)
        assert meter.live == 40000
        (x * 2).sum().backward()  # x.grad (40000) stays; x * 2 is freed
        assert meter.live == 80000 and meter.peak >= 80000
    del x
    assert meter.live == 0


# ---- the formula against measured audits ---------------------------------------------------

AUDITS = [
    (("reduction",), ["mean_of_means"]),
    (("reduction",), ("mean_of_means", "num_items", "sum")),
    (("accelerate",), ("mean_of_means",)),
    (None, None),  # the default paths and reductions
]


@pytest.mark.parametrize("paths,reductions", AUDITS, ids=["reduction-1", "reduction-3", "accelerate", "default"])
def test_audit_stays_within_the_formula_of_a_training_step(train_peak, paths, reductions):
    cfg = config(paths, reductions)
    peak, loaded = peak_of(lambda loaded: audit(cfg, loaded=loaded))
    names = paths or [n for n in PATHS if PATHS.get(n).unavailable(cfg) is None and not PATHS.get(n).missing()
                      and n != "loss-fn"]
    shape = shape_of(loaded.model, sums=sums_held(names, cfg.reductions), keeps_correct=keeps_correct(names, cfg.reductions),
                     logits_bytes=model_loss_bytes(BATCH, LENGTH, WIDE["vocab_size"]) if "model" in names else 0,
                     step_path=bool({"trainer", "accelerate"} & set(names)))
    extra = peak - train_peak
    assert extra <= audit_extra_bytes(shape), (extra, audit_extra_bytes(shape))
    # not vacuous: the audit really holds the reference and every sum but one beyond the step
    pb = shape.parameters * shape.param_bytes
    assert extra >= pb * shape.sums, (extra / pb, shape)


def test_proportional_reductions_share_one_sum_and_another_costs_one_more():
    """num_items runs on every layout, so --reductions mean_of_means holds two sums; num_items
    and sum beside it add none (sum is num_items times N); sequence_mean adds its sum and the
    kept correct gradient."""
    one, loaded = peak_of(lambda loaded: audit(config(("reduction",), ["mean_of_means"]), loaded=loaded))
    three, _ = peak_of(lambda loaded: audit(config(("reduction",), ("mean_of_means", "num_items", "sum")), loaded=loaded))
    four, _ = peak_of(lambda loaded: audit(config(("reduction",), ("mean_of_means", "num_items", "sum", "sequence_mean")),
                                           loaded=loaded))
    shape = shape_of(loaded.model, sums=1)
    pb = shape.parameters * shape.param_bytes
    assert sums_held(["reduction"], ["mean_of_means", "num_items", "sum"]) == sums_held(["reduction"], ["mean_of_means"])
    # sum's comparison scales a piece of each tensor by N: one piece of the largest, not a sum
    assert abs(three - one) <= shape.largest_tensor * shape.wide_bytes < 0.2 * pb, (three - one) / pb
    assert 1.5 * pb <= four - three <= 2 * pb + shape.largest_tensor * shape.wide_bytes, (four - three) / pb  # its sum, the kept correct gradient


# ---- the 8B Llama shape: issue 18's targets -------------------------------------------------

LLAMA_8B = 8_030_261_248  # Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 8 KV heads, vocab 128256
TRAIN_STEP_PEAK_8B = int(39.4 * GIB)  # bench_audit.py 'train' on one H200, bf16, batch 8 x 512 (issue 18)
DEFAULT_LOGIT_PATHS = ("reduction", "model")
DEFAULT_REDUCTIONS = CheckConfig(model="x").reductions


def llama_8b(paths, reductions) -> AuditShape:
    return AuditShape(parameters=LLAMA_8B, param_bytes=2, sums=sums_held(paths, reductions),
                      keeps_correct=keeps_correct(paths, reductions), largest_tensor=128256 * 4096,
                      logits_bytes=model_loss_bytes(8, 512, 128256) if "model" in paths else 0,
                      step_path=bool({"trainer", "accelerate"} & set(paths)))


def test_8b_default_audit_fits_75_gib_in_passes():
    """The default paths and reductions hold four sums, the kept correct gradient and the model
    path's logits: 118 GiB in one pass. Within an 80 GB card's default budget (74.5 GiB) the
    planner gives one sum a pass, and the largest pass (the model path's) stays under 75 GiB."""
    paths = DEFAULT_LOGIT_PATHS + ("trainer", "accelerate")
    one_pass = llama_8b(paths, DEFAULT_REDUCTIONS)
    pb = LLAMA_8B * 2
    assert one_pass.sums == 4 and one_pass.keeps_correct
    assert audit_peak_bytes(TRAIN_STEP_PEAK_8B, one_pass) > 110 * GIB
    per_pass = sums_per_pass(int(74.5 * GIB), TRAIN_STEP_PEAK_8B, pb, pb + one_pass.logits_bytes)
    assert per_pass == 1
    largest = dataclasses.replace(one_pass, sums=per_pass)
    assert audit_peak_bytes(TRAIN_STEP_PEAK_8B, largest) <= 75 * GIB, audit_peak_bytes(TRAIN_STEP_PEAK_8B, largest) / GIB


def test_8b_one_reduction_within_1_4x_the_training_step():
    shape = llama_8b(["reduction"], ["num_items"])  # the correct reduction: no second one runs beside it
    assert audit_peak_bytes(TRAIN_STEP_PEAK_8B, shape) <= 1.4 * TRAIN_STEP_PEAK_8B
