"""core/backwards.py: each backward of a user's step, cut and projected on the reference,
checked against a plain per-microbatch gradient."""

import pytest
import torch

from lossaudit.core.backwards import Backwards
from lossaudit.core.forward import forward
from lossaudit.core.grads import dots, trainable
from lossaudit.core.layouts import microbatches
from lossaudit.stacks.step import run_step_function

import stack_modules
from stacks_common import CPU, issue_batch, layout_of, reference, tiny_llama


@pytest.fixture(scope="module")
def setup():
    loaded = tiny_llama()
    batch = issue_batch(loaded)
    layout = layout_of(batch, k=4)
    ref = reference(loaded.model, batch)
    params = trainable(loaded.model)
    return loaded.model, params, microbatches(batch, layout), [ref.grads[n] for n, _ in params]


def _run(setup, fn):
    model, params, mbs, r = setup
    watched = []

    def watch(dicts):
        watched.append(Backwards(model, params, r, [d["input_ids"] for d in dicts]))
        return watched[0]

    step = run_step_function(model, mbs, fn, CPU, watch=watch)
    return watched[0].resolve(len(mbs), [g for _, g in step.gradient])


def _plain(setup) -> list[float]:
    """Each microbatch's correct gradient (token sum / N) . the reference, one autograd.grad each."""
    model, params, mbs, r = setup
    total = sum(int((mb.labels[:, 1:] != -100).sum()) for mb in mbs)
    out = []
    for mb in mbs:
        logits = forward(model, mb, CPU)[0].logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb.labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum") / total
        out.append(dots(list(torch.autograd.grad(loss, [p for _, p in params])), r))
    return out


def test_each_backward_is_its_microbatchs_projection(setup):
    projections, why = _run(setup, stack_modules.token_mean_step)
    assert why == ""
    assert projections == pytest.approx(_plain(setup), rel=1e-5)


def test_a_step_visiting_microbatches_out_of_order_is_followed(setup):
    projections, why = _run(setup, lambda model, mbs: stack_modules.token_mean_step(model, mbs[::-1]))
    assert why == "" and projections == pytest.approx(_plain(setup), rel=1e-5)


def test_one_backward_over_all_microbatches_is_not_resolved(setup):
    def one_backward(model, mbs):
        total = sum(stack_modules._targets(b) for b in mbs)
        loss = sum(stack_modules._token_sum(model, b) for b in mbs) / total
        loss.backward()
        return float(loss.detach())

    projections, why = _run(setup, one_backward)
    assert projections is None and "one backward over all 4 microbatches" in why


def test_grad_changed_outside_the_backwards_is_not_resolved(setup):
    def divides_afterwards(model, mbs):  # right in the end, but .grad is not what its backwards added
        total = sum(stack_modules._targets(b) for b in mbs)
        for b in mbs:
            stack_modules._token_sum(model, b).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= total
        return 0.0

    projections, why = _run(setup, divides_afterwards)
    assert projections is None and "changed .grad outside its backwards" in why
