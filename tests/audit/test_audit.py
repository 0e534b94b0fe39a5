"""The audit end to end on tiny real transformers models and on planted bugs."""

import math

import pytest

import lossaudit
from lossaudit.core.layouts import Layout, group
from lossaudit.paths.model import ModelPath

from judged import judged
from toy import ToyLM, toy_batch, toy_context


@pytest.fixture(scope="module")
def llama_report():
    return lossaudit.check("llama", microbatches=[1, 4, 8], empty_sequences=1)


def test_llama_model_path_and_num_items_match(llama_report):
    cases = llama_report.cases
    audited = cases[~cases["expected"]]
    assert set(audited["path"]) == {"model", "reduction", "accelerate", "trainer"}
    assert (audited["verdict"] == "match").all(), audited[["path", "reduction", "detail"]]
    assert llama_report.exit_status == 0
    assert llama_report.tolerance["noise_floor"] < llama_report.tolerance["rtol"]


def test_mean_of_means_diverges_on_uneven_layouts_and_is_expected(llama_report):
    mom = llama_report.cases.query("reduction == 'mean_of_means' and microbatches == 4")
    assert (mom["verdict"] == "diverge").all()
    assert mom["expected"].all()
    assert (mom["grad_rel_err"] > 1e-2).all()


def test_zero_target_microbatch_is_named_not_nan_or_crash(llama_report):
    k8 = llama_report.cases.query("microbatches == 8")
    mom = k8[k8["reduction"] == "mean_of_means"].iloc[0]
    assert mom["verdict"] == "diverge"
    assert "microbatch 8 of 8 holds zero target tokens" in mom["detail"]
    num_items = k8[k8["reduction"] == "num_items"].iloc[0]
    assert num_items["verdict"] == "match" and math.isfinite(num_items["loss"])
    assert 0 in num_items["tokens"]


def test_report_has_the_contract_fields(llama_report):
    data = llama_report.to_dict()
    assert data["schema"] == "lossaudit.report/1"
    assert {"python", "torch", "transformers", "device", "dtype"} <= set(data["environment"])
    assert {"name", "task", "parameters"} <= set(data["model"])
    need = {"path", "reduction", "microbatches", "padding", "world_size", "loss_rel_err",
            "grad_rel_err", "grad_cosine", "verdict", "expected", "detail"}
    assert all(need <= set(case) for case in data["cases"])


def _model_case(model):
    batch = toy_batch([9, 3, 7, 2], [1, 1, 4, 1])
    ctx = toy_context(batch, model)
    layout = Layout(2, "imbalanced", "right", group(batch, 2, "imbalanced"))
    ((m, verdict, detail),) = judged(ctx, layout, [ModelPath()])
    return m, (verdict, detail)


def test_model_path_finds_a_forward_that_ignores_num_items_in_batch():
    m, (verdict, detail) = _model_case(ToyLM(honour_num_items=False))
    assert verdict == "diverge"
    assert "num_items_in_batch ignored" in detail
    assert m.counts[0] != m.counts[1]


def test_model_path_passes_a_forward_that_honours_num_items_in_batch():
    m, (verdict, _) = _model_case(ToyLM(honour_num_items=True))
    assert verdict == "match"
    assert m.grads.rel_err < 1e-12


def test_paths_whose_package_is_missing_are_left_out_or_named(monkeypatch):
    """transformers.Trainer needs accelerate: without it neither path runs by default, and
    asking for one names the package (exit 3), instead of one error case per layout."""
    import importlib.util

    from lossaudit.audit.config import CheckConfig
    from lossaudit.core.errors import EnvironmentProblem
    from lossaudit.audit.harness import selected_paths

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert {"model", "reduction"} <= set(selected_paths(CheckConfig(model="llama"), "causal-lm"))
    assert not {"trainer", "accelerate"} & set(selected_paths(CheckConfig(model="llama"), "causal-lm"))
    for name in ("trainer", "accelerate"):
        with pytest.raises(EnvironmentProblem, match="pip install accelerate"):
            selected_paths(CheckConfig(model="llama", paths=(name,)), "causal-lm")
