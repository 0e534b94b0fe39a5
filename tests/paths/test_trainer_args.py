"""--trainer-arg and --loss-fn as a user meets them, and the label-smoothing objective."""

import pytest
import torch.nn.functional as F

import lossaudit
from lossaudit.models.compat import label_smoothing_accumulates_right, release_has_ga_fix
from lossaudit.audit.config import CheckConfig
from lossaudit.core.forward import forward
from lossaudit.audit.harness import prepare, selected_paths
from lossaudit.core.layouts import full_batch

from test_cli import assert_usage_error, run


def test_an_unknown_trainer_arg_is_a_usage_error_before_any_work():
    result = run("check", "llama", "--trainer-arg", "label_smothing_factor=0.1")
    assert_usage_error(result, "label_smothing_factor", "did you mean 'label_smoothing_factor'")


def test_a_trainer_arg_the_audit_owns_is_a_usage_error():
    result = run("check", "llama", "--trainer-arg", "learning_rate=3e-4")
    assert_usage_error(result, "learning_rate", "update of one SGD step equals the gradient")


def test_bad_label_smoothing_and_an_unloadable_loss_fn_are_reported_together():
    with pytest.raises(lossaudit.UsageError) as caught:
        CheckConfig(model="llama", trainer_args=(("label_smoothing_factor", "2"),), loss_fn="no_such_module:fn")
    assert len(caught.value.problems) == 2
    assert "label_smoothing_factor=2" in str(caught.value) and "no_such_module" in str(caught.value)


def test_the_model_path_cannot_audit_a_label_smoothed_objective():  # decided when the audit is planned
    with pytest.raises(lossaudit.UsageError, match="--path model: the model's own loss is plain cross entropy"):
        selected_paths(CheckConfig(model="llama", paths=("model",), trainer_args=(("label_smoothing_factor", "0.1"),)),
                       "causal-lm")
    with pytest.raises(lossaudit.UsageError, match="--path loss-fn: needs --loss-fn"):
        selected_paths(CheckConfig(model="llama", paths=("loss-fn",)), "causal-lm")


def test_the_reference_computes_the_label_smoothed_objective():
    smoothing = (("label_smoothing_factor", "0.1"),)
    ctx = prepare(CheckConfig(model="llama", trainer_args=smoothing))
    mb = full_batch(ctx.batch)
    logits = forward(ctx.model, mb, ctx.device)[0].logits.detach().double()
    flat, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), mb.labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(flat, targets, ignore_index=-100, label_smoothing=0.1)
    plain = F.cross_entropy(flat, targets, ignore_index=-100)
    assert ctx.reference.loss == pytest.approx(float(expected), rel=1e-12)
    assert abs(ctx.reference.loss - float(plain)) > 1e-4  # the objective really changed


def test_label_smoothing_by_default_drops_the_model_path_and_the_correct_reduction_matches():
    report = lossaudit.check("llama", microbatches=[4], groupings=["imbalanced"], paddings=["right"],
                             path=["reduction", "trainer"], reductions=["num_items"],
                             trainer_args={"label_smoothing_factor": 0.1})
    assert report.batch["objective"] == "token cross entropy with label smoothing 0.1"
    num_items = report.cases[report.cases["reduction"] == "num_items"]
    assert (num_items["verdict"] == "match").all()
    full = report.cases[(report.cases["path"] == "trainer") & (report.cases["microbatches"] == 1)]
    assert (full["verdict"] == "match").all(), full["detail"].tolist()  # the Trainer's LabelSmoother, GA off
    accumulated = report.cases[(report.cases["path"] == "trainer") & (report.cases["microbatches"] == 4)].iloc[0]
    if label_smoothing_accumulates_right():
        assert accumulated["verdict"] == "match", accumulated["detail"]
    elif release_has_ga_fix():  # 4.46.0 .. 5.14: the smoothed microbatch means, summed, not divided by k
        assert accumulated["verdict"] == "diverge" and "summed over k microbatches" in accumulated["detail"]
    else:
        assert accumulated["verdict"] == "diverge" and "divided by k" in accumulated["detail"]
    defaults = lossaudit.check("llama", microbatches=[1], groupings=["contiguous"], paddings=["right"],
                               path=None, trainer_args={"label_smoothing_factor": 0.1}, reductions=["num_items"])
    assert "model" not in set(defaults.cases["path"])
