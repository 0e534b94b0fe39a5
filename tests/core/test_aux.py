"""Router aux losses of MoE models: lossaudit's own float64 load-balancing loss against a plain
loop and the library's, a planted aux summed over microbatches (must be found) and the mean
over microbatches (must pass), and the model path on a tiny Mixtral."""

import math

import pytest
import torch

import lossaudit
from lossaudit.core.moe import AuxSpec, load_balancing_loss
from lossaudit.audit.config import CheckConfig
from lossaudit.core.forward import forward
from lossaudit.core.accumulate import GradientSum
from lossaudit.core.grads import grads_of
from lossaudit.audit.harness import prepare
from lossaudit.core.layouts import Layout, full_batch, group, microbatches
from lossaudit.audit.judge import Guard, Judge
from lossaudit.paths import Label, Outcome, StepPath
from lossaudit.core.tokens import target_mask, token_losses
from lossaudit.audit.tolerance import Tolerance

from judged import judged
from planted import AuxLoop


def plain_loop_aux(layers, mask, spec):
    """Switch Transformer eqs. 4-6 one token at a time: E * sum_e f_e P_e, f_e the share of
    top-k picks of expert e over all layers' real tokens (summing to top_k), P_e its mean
    router probability."""
    picks, probs, rows = [0.0] * spec.num_experts, [0.0] * spec.num_experts, 0
    for layer in layers:
        for row, keep in zip(layer.double().softmax(-1), mask.reshape(-1).tolist()):
            if not keep:
                continue
            rows += 1
            for e in row.topk(spec.top_k).indices.tolist():
                picks[e] += 1
            for e in range(spec.num_experts):
                probs[e] += float(row[e])
    return spec.num_experts * sum(f / rows * p / rows for f, p in zip(picks, probs))


def test_load_balancing_loss_is_the_plain_loop():
    g = torch.Generator().manual_seed(0)
    spec = AuxSpec(0.01, 5, 2)
    layers = [torch.randn(12, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    got = float(load_balancing_loss(layers, mask, spec))
    assert math.isclose(got, plain_loop_aux(layers, mask, spec), rel_tol=1e-12)


@pytest.fixture(scope="module")
def mixtral():
    return prepare(CheckConfig(model="mixtral", microbatches=(4,)))


def test_the_reference_aux_is_the_libraries_on_the_full_batch(mixtral):
    outputs, _ = forward(mixtral.model, full_batch(mixtral.batch), mixtral.device, with_labels=True)
    assert mixtral.reference.aux is not None
    assert math.isclose(mixtral.reference.aux.value, float(outputs.aux_loss.detach()), rel_tol=1e-5)


def _planted_case(ctx, aux_weight):
    layout = Layout(4, "imbalanced", "right", group(ctx.batch, 4, "imbalanced"))
    ((m, verdict, detail),) = judged(ctx, layout, [AuxLoop(aux_weight)])
    return m, verdict, detail


def test_an_aux_loss_summed_over_microbatches_is_found(mixtral):
    m, verdict, detail = _planted_case(mixtral, lambda k: 1.0)
    assert verdict == "diverge"
    assert "aux loss summed over 4 microbatches" in detail
    assert "the cross-entropy part matches the reference" in detail
    assert math.isclose(m.aux, 4 * m.aux_target.mean, rel_tol=1e-5)


def test_the_mean_over_microbatches_passes_and_the_inherent_gap_is_information(mixtral):
    m, verdict, detail = _planted_case(mixtral, lambda k: 1.0 / k)
    assert verdict == "match", detail
    assert m.grads.rel_err < 1e-5
    assert abs(m.aux_target.gap) > 1e-4  # the mean of microbatch aux is not the full batch's...
    assert "information, not a finding" in detail  # ...and that is shown, not failed


def test_mixtral_model_path_sums_its_aux_over_microbatches():
    """transformers adds coef * aux to each microbatch's loss and scales only the cross entropy
    by num_items_in_batch, so a loop (or Trainer) summing the losses carries k times the aux."""
    report = lossaudit.check("mixtral", path=["model"], microbatches=[1, 2], paddings=["right"],
                             groupings=["imbalanced"])
    cases = report.cases.set_index("microbatches")
    k1, k2 = cases.loc[1], cases.loc[2]
    assert k1["verdict"] == "match" and math.isclose(k1["aux_loss"], k1["reference_aux_loss"], rel_tol=1e-5)
    assert math.isclose(k1["reference_loss"], k1["reference_ce_loss"] + k1["aux_coef"] * k1["reference_aux_loss"])
    assert k2["verdict"] == "diverge"
    if "does not accept num_items_in_batch" not in k2["detail"]:  # transformers < 4.46 divides by k itself
        assert "aux loss summed over 2 microbatches" in k2["detail"]
        assert "the cross-entropy part matches the reference" in k2["detail"]
        assert math.isclose(k2["ce_loss"], k2["reference_ce_loss"], rel_tol=1e-5)
    assert report.batch["reference_aux_loss"] == k1["reference_aux_loss"]



def test_mixtral_trainer_step_is_judged_with_its_aux_loss():
    """The Trainer trains the model's own loss, aux included: on the full batch it matches the
    CE + coef * aux target (not a 'loss-definition' finding against cross entropy alone), and
    accumulated it carries the aux of every microbatch in full, as the model path does."""
    report = lossaudit.check("mixtral", path=["trainer"], microbatches=[1, 2], paddings=["right"],
                             groupings=["contiguous"])
    cases = report.cases.set_index("microbatches")
    k1, k2 = cases.loc[1], cases.loc[2]
    assert k1["verdict"] == "match", k1["detail"]
    # the logged loss is float32: the aux read back from it is good to float32's ulp / coef
    assert k1["aux_inferred"] and abs(k1["aux_loss"] - k1["reference_aux_loss"]) * k1["aux_coef"] < 1e-6
    assert k1["grad_rel_err"] < 1e-5
    if k2["trainer_num_items"][0] is not None:  # 4.46+: the Trainer divides the CE by the step's count
        assert k2["verdict"] == "diverge"
        assert "aux loss summed over 2 microbatches" in k2["detail"], k2["detail"]

class MeanAuxStep(StepPath):
    """A hand-written accumulation loop run as a step path: it takes its own forwards, so its
    aux target comes from the judge's own forwards (no shared forward to build it from)."""

    name = "mean-aux-loop"
    label = Label("mean-aux-loop", trains_aux=True)

    def run(self, ctx, layout):
        mbs = microbatches(ctx.batch, layout)
        total = sum(int(target_mask(mb.labels, ctx.batch.task).sum()) for mb in mbs)
        acc, loss_sum, aux_sum = GradientSum(ctx.params), 0.0, 0.0
        for mb in mbs:
            outputs, _ = forward(ctx.model, mb, ctx.device)
            ce = token_losses(outputs.logits, mb.labels, ctx.batch.task).sum() / total
            loss = ce + ctx.reference.aux.spec.coef * outputs.aux_loss / len(mbs)
            for i, g in enumerate(grads_of(loss, ctx.params)):
                if g is not None:
                    acc.add(i, g, 1.0)
            loss_sum, aux_sum = loss_sum + float(loss.detach()), aux_sum + float(outputs.aux_loss.detach()) / len(mbs)
        return [Outcome(self.label, layout, loss_sum, acc.items(), aux=aux_sum)]


def test_a_step_path_gets_its_aux_target_from_the_harness(mixtral):
    layout = Layout(2, "imbalanced", "left", group(mixtral.batch, 2, "imbalanced"))
    guard = Guard(Judge(mixtral))  # nothing learnt about the layout: the target takes its own forwards
    (m,) = guard.step(MeanAuxStep(), mixtral, layout)
    verdict, detail = guard.judge.verdict(m, Tolerance.measure("float32", []))
    assert verdict == "match", (detail, m.grads)
    assert m.aux_target.microbatch and m.grads.rel_err < 1e-5


def test_aux_target_gradients_are_freed_layout_by_layout(mixtral, monkeypatch):
    """A layout's aux target gradient (a whole model's) lives while its cases are measured, not
    until the run ends: at most one layout holds one at a time, a step path after the logit
    paths takes its layout's forwards again, and its verdict is that of a fresh judge."""
    from lossaudit.audit.harness import run_paths
    from lossaudit.paths.model import ModelPath

    live = []
    original = Judge.layout_aux

    def counted(self, layout):
        aux = original(self, layout)
        live.append(sum(f.aux is not None and f.aux.grads is not None for f in self.facts.values()))
        return aux
    monkeypatch.setattr(Judge, "layout_aux", counted)
    layouts = [Layout(k, "imbalanced", "right", group(mixtral.batch, k, "imbalanced")) for k in (2, 4)]
    judged = run_paths(mixtral, layouts, [ModelPath(), MeanAuxStep()])
    assert live and max(live) == 1, live
    cases = [m for m in judged.measured if m.aux_target is not None]
    assert len(cases) == 2 * 2 and all(m.aux_target.grads is None for m in cases)
    assert all(m.aux_target.microbatch for m in cases)
    steps = [m for m in cases if m.label.path == "mean-aux-loop"]
    assert [judged.judge.verdict(m, judged.tolerance)[0] for m in steps] == ["match", "match"]
    fresh = Guard(Judge(mixtral)).step(MeanAuxStep(), mixtral, layouts[1])[0]
    assert math.isclose(fresh.grads.rel_err, steps[1].grads.rel_err, rel_tol=1e-9, abs_tol=1e-15)
