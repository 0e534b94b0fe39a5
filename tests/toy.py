"""A toy causal LM for exact (float64) tests: each position's logits depend only on its
own token, so padding and grouping cannot change them and every identity holds to ~1e-15."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lossaudit.batch import Batch, Sample
from lossaudit.grads import trainable
from lossaudit.paths.base import AuditContext
from lossaudit.reference import compute_reference
from lossaudit.tokens import IGNORE_INDEX

VOCAB = 11


class ToyLM(torch.nn.Module):
    def __init__(self, *, honour_num_items: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 6, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(6, VOCAB, generator=g, dtype=torch.float64))
        self.honour_num_items = honour_num_items

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None):
        logits = self.embed[input_ids] @ self.head  # (B, T, V)
        loss = None
        if labels is not None:
            flat = logits[:, :-1].reshape(-1, VOCAB)
            targets = labels[:, 1:].reshape(-1)
            if num_items_in_batch is not None and self.honour_num_items:
                loss = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch
            else:
                loss = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)
        return SimpleNamespace(logits=logits, loss=loss)


def toy_batch(lengths, prompts, seed: int = 0) -> Batch:
    """Sequences of the given lengths; the first ``prompts[i]`` labels are ignored (min 1)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for length, prompt in zip(lengths, prompts):
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: max(prompt, 1)] = IGNORE_INDEX
        samples.append(Sample(ids, labels))
    return Batch(tuple(samples), "causal-lm", pad_id=0)


def toy_context(batch: Batch, model: ToyLM | None = None) -> AuditContext:
    model = model or ToyLM()
    params = trainable(model)
    reference = compute_reference(model, batch, params, torch.device("cpu"))
    return AuditContext(model, batch, reference, params, torch.device("cpu"), config=None)
