"""stacks/model_state.py: whatever a user's step does to the model, ``restore`` puts it back exactly
(issue 26 item 2): values, tensor objects, dtypes, requires_grad, modules, hooks, train mode."""

import pytest
import torch

from lossaudit.stacks.model_state import ModelState

from stacks_common import tiny_llama


def portrait(model: torch.nn.Module) -> dict:
    """Everything about the model a later layout or path could see."""
    return {
        "tensors": {n: (t.detach().clone(), t.dtype, t.device) for n, t in model.state_dict(keep_vars=True).items()},
        "objects": {n: id(p) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (value, dtype, device) in before["tensors"].items():
        now, now_dtype, now_device = after["tensors"][name]
        assert (now_dtype, now_device) == (dtype, device), name
        assert torch.equal(now, value), name
    for key in ("objects", "requires_grad", "modules", "hooks", "grads"):
        assert after[key] == before[key], key


def sgd_in_place(model):
    loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()


def by_hand(model):
    for p in model.parameters():
        p.data -= 0.1  # no version counter moves: the values must still come back


def cast(model):
    model.half()


def freeze(model):
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)


def grow(model):
    model.extra = torch.nn.Linear(2, 2)
    model.model.layers.append(torch.nn.Identity())


def hook_and_eval(model):
    model.model.register_forward_hook(lambda *args: None)
    model.eval()


def swap_parameter(model):
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    del model.model.norm.weight


@pytest.mark.parametrize("change", [sgd_in_place, by_hand, cast, freeze, grow, hook_and_eval, swap_parameter])
def test_restore_undoes_what_a_step_did(change):
    model = tiny_llama().model
    model.train()
    before = portrait(model)
    state = ModelState(model)
    change(model)
    with pytest.raises(AssertionError):  # the change was real
        assert_same(before, portrait(model))
    state.restore()
    assert_same(before, portrait(model))
    change(model)  # a second layout: the same state restores again
    state.restore()
    assert_same(before, portrait(model))
