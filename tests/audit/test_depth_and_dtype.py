"""--num-layers (a fast audit of a deep model) and the per-dtype tolerances."""

import pytest
import torch

import lossaudit
from lossaudit.core.errors import UsageError
from lossaudit.models.loading import load_model
from lossaudit.audit.tolerance import CAP, FLOOR, NOISE_FACTOR, Tolerance

from test_cli import assert_usage_error, run

SMALL = dict(batch_size=4, max_length=12, microbatches=(1, 2))


def test_num_layers_sets_a_tiny_model_depth():
    assert load_model("llama", num_layers=3).model.config.num_hidden_layers == 3


def test_num_layers_repeats_a_layer_pattern_to_the_depth_asked():
    config = load_model("gemma3_text", num_layers=5).model.config
    assert config.num_hidden_layers == 5
    assert len(config.layer_types) == 5 and set(config.layer_types) == {"sliding_attention", "full_attention"}


def test_num_layers_cuts_a_checkpoint_to_its_first_layers(tmp_path):
    full = load_model("llama", num_layers=3, seed=1).model
    full.save_pretrained(tmp_path / "m")
    cut = load_model(str(tmp_path / "m"), num_layers=1).model
    assert len(cut.model.layers) == 1
    kept, original = cut.state_dict(), full.state_dict()
    assert all(torch.equal(kept[name], original[name]) for name in kept)  # loaded, not re-initialised


def test_a_checkpoint_cannot_grow(tmp_path):
    load_model("llama").model.save_pretrained(tmp_path / "m")
    with pytest.raises(UsageError, match="cut, not grown"):
        load_model(str(tmp_path / "m"), num_layers=9)


def test_num_layers_below_one_is_a_usage_error():
    assert_usage_error(run("check", "llama", "--num-layers", "0"), "--num-layers")


@pytest.mark.parametrize("dtype", sorted(FLOOR))
def test_tolerance_sits_between_the_dtype_floor_and_cap(dtype):
    assert FLOOR[dtype] < CAP[dtype]
    assert Tolerance.measure(dtype, []).rtol == FLOOR[dtype]


def test_a_float64_model_passes_under_its_tolerance():
    """transformers keeps RMSNorm's variance in float32: the float64 cap must allow it, and no more."""
    report = lossaudit.check("llama", dtype="float64", paths=("reduction", "model"), **SMALL)
    tol = report.tolerance
    assert tol["floor"] <= tol["rtol"] <= CAP["float64"]
    assert tol["rtol"] >= min(NOISE_FACTOR * tol["noise_floor"], CAP["float64"])
    assert report.exit_status == 0, report.findings


def test_a_bfloat16_audit_still_finds_mean_of_means():
    report = lossaudit.check("llama", dtype="bfloat16", paths=("reduction",), reductions=("mean_of_means", "num_items"),
                             batch_size=8, max_length=24, microbatches=(4,))
    verdicts = report.cases.groupby("reduction")["verdict"].agg(set)
    assert verdicts["num_items"] == {"match"}
    assert "diverge" in verdicts["mean_of_means"]  # rounding at bfloat16 does not hide it
