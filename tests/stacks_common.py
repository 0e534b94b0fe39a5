"""Shared by tests/stacks/test_stacks_*.py: the issue's tiny Llama, batch and layout, an exact float64
reference for them, and a plain loop that computes what a reduction's step equals."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lossaudit.core.batch import BatchSpec, make_batch
from lossaudit.core.forward import forward
from lossaudit.core.grads import compare_grads, trainable
from lossaudit.core.layouts import microbatches, plan_layouts
from lossaudit.models.loading import load_model
from lossaudit.core.reference import compute_reference
from lossaudit.core.tokens import IGNORE_INDEX
from lossaudit.stacks import pip_command

CPU = torch.device("cpu")


def needs(package: str):
    """Skip the module when ``package`` is not installed, naming the pip command."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed: {pip_command(package)}", allow_module_level=True)


def tiny_llama():
    loaded = load_model("llama")
    loaded.model.train()
    return loaded


def issue_batch(loaded, **spec):
    """The default audit batch: 8 sequences, prompts masked on every other one."""
    return make_batch(BatchSpec(**spec), vocab_size=loaded.vocab_size, pad_id=loaded.pad_id, task=loaded.task)


def layout_of(batch, k: int = 4, grouping: str = "imbalanced", padding: str = "right"):
    return plan_layouts(batch, (k,), paddings=(padding,), groupings=(grouping,))[0]


def reference(model, batch):
    return compute_reference(model, batch, trainable(model), CPU)


def rel_err(reference_grads: dict, gradient) -> float:
    return compare_grads(reference_grads, gradient).rel_err


def mean_of_means_gradient(model, batch, layout) -> list:
    """What a loop dividing each microbatch's own mean by k produces, computed plainly."""
    params = trainable(model)
    total = None
    for mb in microbatches(batch, layout):
        loss = forward(model, mb, CPU, with_labels=True)[0].loss / len(layout.groups)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
    return [(n, g) for (n, _), g in zip(params, total)]


def plain_count(batch, group) -> int:
    """Targets of one pack: its sequences' own, plus each later sequence's first label when it is one."""
    own = sum(int((batch.samples[i].labels[1:] != IGNORE_INDEX).sum()) for i in group)
    return own + sum(int(batch.samples[i].labels[0] != IGNORE_INDEX) for i in group[1:])


def plain_packed_gradient(model, batch, layout, *, counted: bool, isolated: bool = True) -> dict:
    """A packed step's gradient (each microbatch one pack), computed plainly: each sequence alone
    (``isolated``; else the pack as one causal row, position ids restarting), its own next-token
    targets and, after another in its pack, its first token predicted from the previous sequence's
    last position; float64 log-softmax; divided by the step's packed count (``counted``) or each pack
    by k times its own."""
    params = trainable(model)
    counts = [plain_count(batch, g) for g in layout.groups]
    total = 0
    for group, count in zip(layout.groups, counts):
        terms, previous, start = [], None, 0
        if not isolated:
            ids = torch.cat([batch.samples[i].input_ids for i in group])[None]
            positions = torch.cat([torch.arange(len(batch.samples[i].input_ids)) for i in group])[None]
            row = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits[0]
        for i in group:
            s = batch.samples[i]
            logits = model(input_ids=s.input_ids[None]).logits[0] if isolated else row[start:start + len(s.input_ids)]
            start += len(s.input_ids)
            lp = torch.log_softmax(logits.double(), -1)
            terms += [-lp[t, int(s.labels[t + 1])] for t in range(len(s.labels) - 1) if s.labels[t + 1] != IGNORE_INDEX]
            if previous is not None and s.labels[0] != IGNORE_INDEX:
                terms.append(-previous[-1, int(s.labels[0])])
            previous = lp
        total = total + torch.stack(terms).sum() / (sum(counts) if counted else len(counts) * count)
    grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
    return {n: g for (n, _), g in zip(params, grads)}
