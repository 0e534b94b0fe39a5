"""Deterministic batches of varied length, with padding and prompt masking in the labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens import IGNORE_INDEX, targets_per_sequence

FIRST_TOKEN_ID = 3  # ids below this are left to pad/bos/eos


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """How the audit batch is drawn."""

    batch_size: int = 8
    max_length: int = 32
    min_length: int = 4
    prompt_masking: bool = True  # every other sequence gets a masked prompt (SFT style)
    empty_sequences: int = 0  # sequences with no target at all, placed last
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX where nothing is predicted


@dataclass(frozen=True)
class Batch:
    samples: tuple[Sample, ...]
    task: str
    pad_id: int

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    @property
    def targets(self) -> list[int]:
        """Target tokens per sequence (what a correct step counts)."""
        return [int(targets_per_sequence(s.labels[None], self.task)) for s in self.samples]


def make_batch(spec: BatchSpec, *, vocab_size: int, pad_id: int, task: str = "causal-lm") -> Batch:
    """Draw ``spec.batch_size`` causal-LM samples from ``spec.seed``.

    The first label of each sequence is always ignored: nothing predicts the first token,
    and keeping it ignored makes the target set the same under left and right padding.
    """
    g = torch.Generator().manual_seed(spec.seed)
    high = max(vocab_size, FIRST_TOKEN_ID + 1)
    samples = []
    for i in range(spec.batch_size):
        length = int(torch.randint(spec.min_length, spec.max_length + 1, (1,), generator=g))
        ids = torch.randint(FIRST_TOKEN_ID, high, (length,), generator=g)
        labels = ids.clone()
        prompt = 1
        if i >= spec.batch_size - spec.empty_sequences:
            prompt = length  # all prompt: zero targets
        elif spec.prompt_masking and i % 2 == 1:
            prompt = int(torch.randint(1, length, (1,), generator=g))
        labels[:prompt] = IGNORE_INDEX
        samples.append(Sample(ids, labels))
    return Batch(tuple(samples), task, pad_id)
