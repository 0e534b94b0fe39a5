"""A toy causal LM for exact (float64) tests: each position's logits depend only on its
own token, so padding and grouping cannot change them and every identity holds to ~1e-15."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lossaudit.core.batch import Batch, Sample
from lossaudit.core.grads import trainable
from lossaudit.paths.base import AuditContext
from lossaudit.core.reference import compute_reference
from lossaudit.core.tokens import IGNORE_INDEX

VOCAB = 11


class ToyLM(torch.nn.Module):
    def __init__(self, *, honour_num_items: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 6, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(6, VOCAB, generator=g, dtype=torch.float64))
        self.honour_num_items = honour_num_items

    def scores(self, input_ids):
        """Logits (B, T, V); tests override this to plant faults before the loss."""
        return self.embed[input_ids] @ self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None):
        logits = self.scores(input_ids)  # (B, T, V)
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
    """Sequences of the given lengths; the first ``prompts[i]`` labels are ignored (0: none, a
    collator's row, whose first label the shift drops)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for length, prompt in zip(lengths, prompts):
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        samples.append(Sample(ids, labels))
    return Batch(tuple(samples), "causal-lm", pad_id=0)


def toy_context(batch: Batch, model: ToyLM | None = None) -> AuditContext:
    model = model or ToyLM()
    params = trainable(model)
    reference = compute_reference(model, batch, params, torch.device("cpu"))
    return AuditContext(model, batch, reference, params, torch.device("cpu"), config=None)


CLASSES = 3


class ToyHeads(torch.nn.Module):
    """Float64 toys for the other heads, exact under any padding: a position's logits depend on
    its own token, plus (seq2seq) the masked mean of the encoder's embeddings; a sequence
    classifier scores the masked mean of its sequence."""

    def __init__(self, task: str, *, honour_num_items: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        outputs = VOCAB if task == "seq2seq" else CLASSES
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 6, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(6, outputs, generator=g, dtype=torch.float64))
        self.task, self.honour_num_items = task, honour_num_items

    def _masked_mean(self, ids, mask):
        mask = torch.ones_like(ids) if mask is None else mask
        return (self.embed[ids] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 6)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, num_items_in_batch=None):
        if self.task == "seq2seq":
            hidden = self.embed[decoder_input_ids] + self._masked_mean(input_ids, attention_mask)[:, None]
        elif self.task == "sequence-classification":
            hidden = self._masked_mean(input_ids, attention_mask)
        else:
            hidden = self.embed[input_ids]
        logits = hidden @ self.head
        loss = None
        if labels is not None:
            flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            if num_items_in_batch is not None and self.honour_num_items:
                loss = F.cross_entropy(flat, targets, reduction="sum") / num_items_in_batch
            else:
                loss = F.cross_entropy(flat, targets)
        return SimpleNamespace(logits=logits, loss=loss)


def toy_task_batch(task: str, batch_size: int, *, max_length: int = 12, seed: int = 0, empty: int = 0) -> Batch:
    from lossaudit.core.batch import BatchSpec, make_batch

    spec = BatchSpec(batch_size, max_length, 2, True, empty, seed)
    return make_batch(spec, vocab_size=VOCAB, pad_id=0, task=task, num_labels=CLASSES, decoder_start_id=1)


class ToyLMOutputs(ToyLM):
    """ToyLM returning transformers' ModelOutput, as a transformers model does: FSDP2 finds the
    backward through a module's outputs, and ToyLM's SimpleNamespace hides them (no pytree)."""

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        out = super().forward(*args, **kwargs)
        return CausalLMOutput(loss=out.loss, logits=out.logits)
