"""paths/probe.UpdateProbe: the update an optimizer applied, read exactly, on the model's device,
without a copy of the weights; the weights come back bit for bit, as the very same tensors."""

import contextlib

import pytest
import torch

from lossaudit.audit.config import CheckConfig
from lossaudit.audit.harness import prepare
from lossaudit.core.layouts import plan_layouts
from lossaudit.audit.memory import LiveTensorBytes
import lossaudit.paths.probe as probe_module
from lossaudit.paths.probe import UpdateProbe, plain_sgd
from lossaudit.paths.trainer_step import trainer_step


def model_and_grads(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3, bias=False)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 100)  # large weights: w - g would round
    grads = {n: (torch.randn(p.shape, generator=g) * 1e-3).to(device) for n, p in model.named_parameters()}
    return model, grads


def step(model, grads, probe, times=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    probe.watch(optimizer)
    for i in range(times):
        for n, p in model.named_parameters():
            p.grad = grads[n] * (i + 1)
        optimizer.step()
    return optimizer


def test_the_update_is_the_gradient_exactly_and_the_weights_are_the_same_tensors():
    model, grads = model_and_grads()
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    probe = UpdateProbe(model)
    step(model, grads, probe)
    update = dict(probe.gradient())
    assert update.keys() == grads.keys()
    for n, p in model.named_parameters():
        assert torch.equal(update[n], grads[n])  # exact: no w - g rounding
        assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1])  # the same tensor, unchanged
        assert update[n].data_ptr() != p.data_ptr() and p.grad is None
    probe.restore()  # after gradient(): changes nothing
    assert all(p.data_ptr() == before[n][0] for n, p in model.named_parameters())
    assert all(torch.equal(dict(probe.gradient())[n], grads[n]) for n in grads)  # read twice: the same


def test_no_step_reads_none_and_leaves_the_weights():
    model, grads = model_and_grads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = UpdateProbe(model)
    probe.watch(torch.optim.SGD(model.parameters(), lr=1.0))
    assert dict(probe.gradient()) == {n: None for n in grads}
    probe.restore()
    assert probe.steps == 0 and all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_a_second_step_is_counted_and_the_last_one_read():
    model, grads = model_and_grads()
    probe = UpdateProbe(model)
    step(model, grads, probe, times=2)
    assert probe.steps == 2
    assert all(torch.equal(g, 2 * grads[n]) for n, g in probe.gradient())


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_a_step_that_fails_after_the_probe_acted_leaves_the_weights(momentum):
    """With momentum the weights were parked (zeros stepped) when the step failed: restore puts
    them back. Plain SGD: the gradients were taken and the weights never touched."""
    model, grads = model_and_grads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = UpdateProbe(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=momentum)
    probe.watch(optimizer)
    optimizer.register_step_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("planted")))
    for n, p in model.named_parameters():
        p.grad = grads[n]
    with pytest.raises(RuntimeError, match="planted"):
        optimizer.step()
    parked = not any(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    untouched = all(torch.equal(p.detach(), before[n]) and p.grad is None for n, p in model.named_parameters())
    assert probe.steps == 1 and probe.took_grad == (momentum == 0) and (untouched if momentum == 0 else parked)
    probe.restore()
    assert all(torch.equal(p.detach(), before[n]) and p.grad is None for n, p in model.named_parameters())


def test_restore_unwatches_the_optimizer():
    model, grads = model_and_grads()
    probe = UpdateProbe(model)
    optimizer = step(model, grads, probe)
    probe.gradient()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    optimizer.step()  # a later step of the same optimizer is no longer zeroed first
    assert probe.steps == 1
    assert all(torch.equal(p.detach(), weights[n] - grads[n]) for n, p in model.named_parameters())


@contextlib.contextmanager
def metered(model, grads):
    """A LiveTensorBytes meter counting the model and the gradients made before it."""
    with LiveTensorBytes() as meter:
        meter.count_existing(model)
        for g in grads.values():
            meter.count_existing(g)
        yield meter


def test_the_probe_holds_one_update_beyond_the_weights_and_no_copy_of_them():
    """The old probe cloned the weights before the step and copied the update after it (to the
    host): two weight-sized tensors. This one allocates the update only, at the step."""
    model, grads = model_and_grads()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with metered(model, grads) as meter:
        start = meter.live
        probe = UpdateProbe(model)
        assert meter.live == start  # nothing copied when the probe is made
        step(model, grads, probe)
        update = probe.gradient()
        probe.restore()
        for _, p in model.named_parameters():
            p.grad = None
        held = meter.live - start
    assert held == weight_bytes, (held, weight_bytes)  # the update, nothing else
    assert sum(g.numel() * g.element_size() for _, g in update) == weight_bytes


def test_the_update_stays_on_the_models_device():
    """Never moved to the host: on a GPU that is a transfer of the whole gradient per case."""
    model = torch.nn.Linear(4, 3, device="meta")
    probe = UpdateProbe(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    probe.watch(optimizer)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert {g.device.type for _, g in probe.gradient()} == {"meta"}
    probe.restore()
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_real_trainer_step_leaves_the_very_weight_tensors_and_reads_counts_after_it():
    """Through transformers.Trainer: the weights are the same tensors afterwards (parked, not
    copied back), the update is the model's own dtype and device, and num_items_in_batch
    (a tensor where the release passes one) was read as plain ints after the step."""
    ctx = prepare(CheckConfig(model="llama", microbatches=(4,)))
    layout = plan_layouts(ctx.batch, (4,), paddings=("right",), groupings=("contiguous",))[0]
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in ctx.params}
    step = trainer_step(ctx, layout, user_args={})
    for n, p in ctx.params:
        assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1]) and p.grad is None
        u = step.update[n]
        assert u.device == p.device and u.dtype == p.dtype and u.data_ptr() != p.data_ptr()
    assert len(step.num_items) == 4 and all(n is None or type(n) is int for n in step.num_items)


def zeros_trick(monkeypatch):
    """The probe as it reads any optimizer: the weights parked and zeros stepped."""
    monkeypatch.setattr(probe_module, "plain_sgd", lambda optimizer, params: False)


@pytest.mark.parametrize("optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
    lambda ps: torch.optim.SGD(ps, lr=1.0, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.5),
    lambda ps: torch.optim.SGD(ps, lr=1.0, maximize=True),
    lambda ps: torch.optim.Adam(ps, lr=1.0),
    lambda ps: type("MySGD", (torch.optim.SGD,), {})(ps, lr=1.0),
    lambda ps: torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "nesterov": True, "momentum": 0.5}], lr=1.0),
    lambda ps: torch.optim.SGD(ps[1:], lr=1.0),  # a trainable parameter the optimizer does not hold
], ids=["momentum", "weight_decay", "lr", "maximize", "adam", "subclass", "nesterov_group", "missing_param"])
def test_an_optimizer_that_is_not_plain_sgd_is_stepped_from_zeros(optimizer):
    """Only where the update is -grad by construction is the gradient taken: otherwise the
    update is what the optimizer does from zero weights (Adam's, here, is not -grad)."""
    model, grads = model_and_grads()
    params = list(model.parameters())
    opt = optimizer(params)
    assert not plain_sgd(opt, list(model.named_parameters()))
    probe = UpdateProbe(model)
    probe.watch(opt)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    update = dict(probe.gradient())
    assert not probe.took_grad
    # the same optimizer's step from zero weights, by hand
    zeros = {n: torch.zeros_like(p, requires_grad=True) for n, p in model.named_parameters()}
    by_hand = optimizer(list(zeros.values()))
    for n, z in zeros.items():
        z.grad = grads[n].clone()
    by_hand.step()
    for n, z in zeros.items():
        assert torch.equal(update[n], -z.detach()), n


def test_plain_sgd_takes_the_gradient_and_allocates_nothing():
    model, grads = model_and_grads()
    opt = torch.optim.SGD([{"params": list(model.parameters())[:1]}, {"params": list(model.parameters())[1:]}],
                          lr=torch.tensor(1.0))
    assert plain_sgd(opt, list(model.named_parameters()))
    with metered(model, grads) as meter:
        start = meter.live
        probe = UpdateProbe(model)
        probe.watch(opt)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        opt.step()
        assert meter.peak == start  # no tensor made: the update is the gradient itself
        update = dict(probe.gradient())
    assert probe.took_grad and all(update[n] is grads[n] for n in grads)


def test_the_taken_gradient_is_the_zeros_tricks_update_on_a_real_trainer_step(monkeypatch):
    """Through transformers.Trainer (lossaudit's plain SGD): the gradient taken as the update
    equals, value for value, the update read by stepping zeros (bit for bit but the sign of a
    zero: the zeros trick writes -0 where the gradient is +0), in float32 and bfloat16, and the
    weights are the very same tensors, unchanged, either way."""
    for dtype in ("float32", "bfloat16"):
        ctx = prepare(CheckConfig(model="llama", microbatches=(2,), dtype=dtype))
        layout = plan_layouts(ctx.batch, (2,), paddings=("right",), groupings=("contiguous",))[0]
        before = {n: p.detach().clone() for n, p in ctx.params}
        said = []
        with monkeypatch.context() as patch:
            patch.setattr(probe_module, "plain_sgd", lambda *a: said.append(plain_sgd(*a)) or said[-1])
            taken = trainer_step(ctx, layout, user_args={})
        assert said == [True]  # the Trainer's one step, lossaudit's SGD: the gradient taken
        with monkeypatch.context() as patch:
            zeros_trick(patch)
            stepped = trainer_step(ctx, layout, user_args={})
        assert taken.update.keys() == stepped.update.keys() == before.keys()
        nonzero = 0
        for n, p in ctx.params:
            a, b = taken.update[n], stepped.update[n]
            assert a.dtype == b.dtype == p.dtype and torch.equal(a, b), n
            bits = torch.int16 if a.element_size() == 2 else torch.int32
            assert torch.equal(a.view(bits)[a != 0], b.view(bits)[b != 0]), n  # bit for bit
            assert torch.equal(p.detach(), before[n]) and p.grad is None
            nonzero += int((a != 0).sum())
        assert nonzero > 0 and taken.logged_loss == stepped.logged_loss
