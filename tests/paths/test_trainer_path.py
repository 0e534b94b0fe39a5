"""The trainer path: a real transformers.Trainer step, on whatever transformers is installed.

Tests that depend on the release assert what is right for the installed one: the Trainer
before the Oct-2024 fix (4.46.0) must be found diverging, the Trainer after it must match.
"""

import pytest
import torch

import lossaudit
from lossaudit.core.batch import BatchSpec
from lossaudit.models.compat import (GA_FIX_RELEASE, release_has_ga_fix, trainer_accumulates_right, trainer_counts_unshifted,
                              trainer_takes)
from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import audit, batch_for
from lossaudit.models.loading import LoadedModel, load_model

import planted

FIXED = release_has_ga_fix()
RIGHT = trainer_accumulates_right()  # after the fix and not one of the measured k-fold releases
OVERCOUNTS = trainer_counts_unshifted()  # 4.46.2 .. 5.10.0: num_items_in_batch counts first labels
HAS_LOSS_FUNC = trainer_takes("compute_loss_func")
ONE_LAYOUT = dict(microbatches=[4], groupings=["imbalanced"], paddings=["right"])  # the widest token spread


def cases_of(report, path, k, reduction=None):
    cases = report.cases[(report.cases["path"] == path) & (report.cases["microbatches"] == k)]
    if reduction is None:
        return cases[cases["reduction"].isna()]
    return cases[cases["reduction"] == reduction]


def only(frame):
    assert len(frame) == 1, frame
    return frame.iloc[0]


def _loaded(model_class) -> LoadedModel:
    tiny = load_model("llama")
    model = model_class(tiny.model.config)
    model.load_state_dict(tiny.model.state_dict())
    return LoadedModel(model, "llama", "causal-lm", "tiny")


def first_labels() -> int:
    """Rows of the default batch whose first token is a label (collator rows, right padding):
    what a count over the unshifted labels adds."""
    batch = batch_for(load_model("llama"), BatchSpec())
    return sum(int(s.labels[0]) != -100 for s in batch.samples)


def test_release_comparison():
    assert release_has_ga_fix("4.45.2") is False
    assert release_has_ga_fix(GA_FIX_RELEASE) is True
    assert release_has_ga_fix("4.46.0.dev0") is True and release_has_ga_fix("5.23.0") is True
    assert trainer_accumulates_right("4.47.0") is False and trainer_accumulates_right("4.47.1") is True
    assert [trainer_counts_unshifted(v) for v in ("4.46.1", "4.46.2", "4.47.0", "4.57.6", "5.10.0", "5.10.1")] == \
        [False, True, False, True, True, False]


def test_trainer_step_on_the_installed_transformers():
    report = lossaudit.check("llama", path=["trainer"], **ONE_LAYOUT)
    full, accumulated = only(cases_of(report, "trainer", 1)), only(cases_of(report, "trainer", 4))
    total = report.batch["target_tokens"]
    if OVERCOUNTS:  # every k, GA off too: the collator rows' first labels are counted
        for case in (full, accumulated):
            assert case["verdict"] == "diverge", case["detail"]
            assert case["trainer_num_items"] == [total + first_labels()] * case["microbatches"]
            assert case["grad_scale"] == pytest.approx(total / (total + first_labels()), rel=1e-4)
        return
    assert full["verdict"] == "match", full["detail"]  # GA off: every other release is right
    assert full["logged_loss"] == pytest.approx(report.batch["reference_loss"], rel=1e-5)
    if RIGHT:
        assert accumulated["verdict"] == "match", accumulated["detail"]
        assert accumulated["logged_loss_rel_err"] < 1e-5
        assert accumulated["trainer_num_items"] == [report.batch["target_tokens"]] * 4
    elif FIXED:  # 4.47.0, 4.48.0: no num_items_in_batch and no division by k either
        assert accumulated["verdict"] == "diverge" and "summed over k microbatches" in accumulated["detail"]
        assert "passed no num_items_in_batch" in accumulated["detail"]
        assert accumulated["logged_loss"] / report.batch["reference_loss"] == pytest.approx(4, rel=0.05)
    else:
        assert accumulated["verdict"] == "diverge"
        assert accumulated["grad_rel_err"] > 0.1
        assert "predates the Oct-2024" in accumulated["detail"]
        assert "token mean divided by k" in accumulated["detail"]


def test_update_is_the_gradient_and_the_weights_come_back():
    loaded = _loaded(__import__("transformers").LlamaForCausalLM)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    config = CheckConfig(model="llama", paths=("trainer",), microbatches=(1,), paddings=("left",))
    case = only(cases_of(audit(config, loaded=loaded), "trainer", 1))
    assert case["grad_rel_err"] < 1e-5 and case["grad_cosine"] > 1 - 1e-9
    assert case["grad_scale"] == pytest.approx(1.0, abs=1e-5)  # lr 1, no decay or clipping
    after = dict(loaded.model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in before)
    assert all(p.grad is None for p in after.values())


def test_a_batch_that_k_does_not_split_evenly_is_an_error_case_not_a_crash():
    report = lossaudit.check("llama", path=["trainer"], batch_size=6, microbatches=[4],
                             groupings=["contiguous"], paddings=["right"])
    case = only(cases_of(report, "trainer", 4))
    assert case["verdict"] == "error" and "equal microbatches" in case["detail"]
    assert only(cases_of(report, "trainer", 1))["verdict"] == ("diverge" if OVERCOUNTS else "match")


def test_compute_loss_func_ignoring_num_items_is_found_on_its_own_and_in_the_trainer():
    name = "planted:loss_ignoring_num_items"
    report = lossaudit.check("llama", path=["loss-fn", "trainer"], loss_fn=name, **ONE_LAYOUT)
    alone = only(cases_of(report, "loss-fn", 4, name))
    assert alone["verdict"] == "diverge" and "num_items_in_batch ignored" in alone["detail"]
    assert alone["loss"] / report.batch["reference_loss"] == pytest.approx(4, rel=0.05)  # k-fold
    trained = only(cases_of(report, "trainer", 4, name))
    if HAS_LOSS_FUNC:
        assert trained["verdict"] == "diverge" and trained["grad_rel_err"] > 1
    else:
        assert trained["verdict"] == "error" and "compute_loss_func" in trained["detail"]
    assert report.exit_status == 1


def test_correct_compute_loss_func_passes_on_its_own_and_in_the_trainer():
    name = "planted:loss_with_num_items"
    report = lossaudit.check("llama", path=["loss-fn", "trainer"], loss_fn=name, **ONE_LAYOUT)
    assert only(cases_of(report, "loss-fn", 4, name))["verdict"] == "match"
    for k in (1, 4):
        trained = only(cases_of(report, "trainer", k, name))
        expected = "error" if not HAS_LOSS_FUNC else "diverge" if OVERCOUNTS else "match" if RIGHT or k == 1 else "diverge"
        assert trained["verdict"] == expected, trained["detail"]


def test_model_ignoring_num_items_is_found_through_the_trainer():
    config = CheckConfig(model="llama", paths=("trainer",), microbatches=(4,), groupings=("imbalanced",),
                         paddings=("right",))
    case = only(cases_of(audit(config, loaded=_loaded(planted.llama_ignoring_num_items())), "trainer", 4))
    assert case["verdict"] == "diverge"
    if FIXED:  # the Trainer no longer divides by k, trusting the model with num_items_in_batch
        assert RIGHT == (None not in case["trainer_num_items"])
        assert "summed over k microbatches" in case["detail"]
        assert case["loss"] / case["reference_loss"] == pytest.approx(4, rel=0.05)
    else:
        assert "token mean divided by k" in case["detail"]


def test_the_same_route_with_the_stock_model_passes_where_the_trainer_is_right():
    from transformers import LlamaForCausalLM

    config = CheckConfig(model="llama", paths=("trainer",), microbatches=(4,), groupings=("imbalanced",),
                         paddings=("right",))
    case = only(cases_of(audit(config, loaded=_loaded(LlamaForCausalLM)), "trainer", 4))
    assert case["verdict"] == ("match" if RIGHT and not OVERCOUNTS else "diverge"), case["detail"]


def test_the_update_is_read_exactly_not_by_subtraction():
    """params_before - params_after rounds by ulp(param): with large weights and small
    gradients it misses the gradient by far more than the float32 tolerance. The probe the
    Trainer and accelerate paths use reads the applied update exactly."""
    import torch

    from lossaudit.paths.probe import UpdateProbe

    model = torch.nn.Linear(1000, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1000.0)
    grad = torch.rand(1, 1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    probe = UpdateProbe(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    probe.watch(optimizer)
    model.weight.grad = grad.clone()
    optimizer.step()
    assert torch.equal(dict(probe.gradient())["weight"], grad)
    subtracted = 1000.0 - (torch.full_like(grad, 1000.0) - grad)  # what before - after would give
    assert not torch.allclose(subtracted, grad, rtol=1e-3, atol=0)
    probe.restore()
    assert torch.equal(model.weight, torch.full_like(grad, 1000.0)) and model.weight.grad is None
