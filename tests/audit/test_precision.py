"""audit/precision.py: the reference in the model's own precision, against a plain computation."""

import pytest
import torch
import torch.nn.functional as F

from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import prepare
from lossaudit.audit.precision import fits, precision_reference
from lossaudit.audit.tolerance import Tolerance
from lossaudit.core.forward import forward
from lossaudit.core.grads import GradDiff, dots
from lossaudit.core.layouts import full_batch


@pytest.fixture(scope="module")
def bf16():
    return prepare(CheckConfig(model="llama", dtype="bfloat16", batch_size=8, max_length=16))


def test_bf16_cross_entropy_on_bf16_logits_as_a_plain_loop_computes_it(bf16):
    p = precision_reference(bf16)
    mb = full_batch(bf16.batch)
    logits = forward(bf16.model, mb, bf16.device)[0].logits
    assert logits.dtype == torch.bfloat16
    targets = mb.labels[:, 1:].flatten()
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, ignore_index=-100, reduction="none")
    loss = per_token.double().sum() / int((targets != -100).sum())
    g = list(torch.autograd.grad(loss, [q for _, q in bf16.params]))
    r = [bf16.reference.grads[n] for n, _ in bf16.params]
    assert p.scale == pytest.approx(dots(g, r) / dots(r, r), rel=1e-9)
    assert p.loss_ratio == pytest.approx(float(loss.detach()) / bf16.reference.loss, rel=1e-9)
    # what makes it worth telling apart: more than bf16's scale floor (2e-3) below float32's
    assert 1 - p.scale > 2e-3 and p.dtype == "bfloat16"
    assert "upcast the logits" in p.describe() and "below float32" in p.describe()


def _measured(scale, one_minus_cos, weights=None):
    from lossaudit.audit.judge import Measured

    grads = GradDiff(rel_err=0.0, cosine=1 - one_minus_cos, max_abs=0.0, scale=scale, worst_param=None,
                     worst_rel_err=0.0)
    return Measured(label=None, layout=None, counts=[1], grads=grads, weights=weights)


def test_fits_only_what_the_precision_gives(bf16):
    p = precision_reference(bf16)
    tol = Tolerance.measure("bfloat16", [])  # the floors: scale 2e-3, direction 5e-5, weights 4e-3
    assert fits(_measured(p.scale, p.direction, [p.scale, p.scale * 1.001]), p, tol)
    assert not fits(_measured(0.99 * p.scale, p.direction), p, tol)  # a 1 % rescale on top
    assert not fits(_measured(p.scale, p.direction, [p.scale * 1.01, p.scale * 0.99]), p, tol)  # a reweighting
    assert not fits(_measured(p.scale, 0.1), p, tol)  # bent: another objective


def test_no_precision_reference_for_a_float32_model():
    assert precision_reference(prepare(CheckConfig(model="llama", batch_size=4, max_length=8))) is None
