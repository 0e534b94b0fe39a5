"""Preference pairs (issue 22): a batch of (chosen, rejected) completions of one prompt each,
drawn from the seed, and how a window of pairs is cut into microbatches.

A pair batch is an ordinary ``Batch`` of 2P causal-lm sequences, the P chosen ones first and the P
rejected ones after them (``Batch.pairs`` = ((0, P), (1, P + 1), ...)), as TRL's preference
collator concatenates them. Each sequence is the shared prompt and its completion, which ends with
EOS; its labels are -100 on the prompt, so after the shift (``core/tokens.py``) its targets are
exactly the completion tokens whose log-probabilities a DPO loss sums. The chosen and rejected
completions of a pair have different lengths.

A microbatch of pairs holds whole pairs, chosen rows first: ``pair_layouts``.
"""

from __future__ import annotations

import torch

from .batch import FIRST_TOKEN_ID, Batch, BatchSpec, Sample
from .layouts import Layout
from .tokens import IGNORE_INDEX

MIN_PAIR_LENGTH = 4  # a prompt token, and two completions of different lengths ending with EOS


def make_pair_batch(spec: BatchSpec, *, vocab_size: int, pad_id: int, eos_id: int) -> Batch:
    """``spec.batch_size`` pairs from ``spec.seed``, each sequence at most ``spec.max_length`` tokens."""
    g = torch.Generator().manual_seed(spec.seed)
    avoid = {pad_id, eos_id}
    allowed = torch.tensor([i for i in range(FIRST_TOKEN_ID, max(vocab_size, FIRST_TOKEN_ID + 3)) if i not in avoid])

    def tokens(n: int) -> torch.Tensor:
        return allowed[torch.randint(0, len(allowed), (n,), generator=g)]

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=g))

    chosen, rejected = [], []
    for _ in range(spec.batch_size):
        prompt = tokens(draw(1, max(1, (spec.max_length - 2) // 2)))
        room = spec.max_length - len(prompt)  # >= 2: two different completion lengths fit
        a = draw(1, room)
        b = draw(1, room - 1)
        b += b >= a  # any length but a
        chosen.append(_sample(prompt, tokens(a - 1), eos_id))
        rejected.append(_sample(prompt, tokens(b - 1), eos_id))
    p = spec.batch_size
    return Batch(tuple(chosen + rejected), "causal-lm", pad_id, pairs=tuple((i, p + i) for i in range(p)))


def _sample(prompt: torch.Tensor, body: torch.Tensor, eos_id: int) -> Sample:
    ids = torch.cat([prompt, body, torch.tensor([eos_id])])
    labels = ids.clone()
    labels[: len(prompt)] = IGNORE_INDEX
    return Sample(ids, labels)


def prompt_length(sample: Sample) -> int:
    """The prompt's tokens: the leading ignored labels."""
    return int((sample.labels != IGNORE_INDEX).int().argmax())


def pair_layouts(batch: Batch, ks: tuple[int, ...], paddings: tuple[str, ...] = ("right",)) -> list[Layout]:
    """The window's pairs cut contiguously into k microbatches of whole pairs (sizes differ by at
    most one), each microbatch's chosen rows first, then its rejected ones in the same order."""
    order = torch.arange(len(batch.pairs))
    layouts = []
    for k in ks:
        groups = tuple(tuple(batch.pairs[int(i)][0] for i in part) + tuple(batch.pairs[int(i)][1] for i in part)
                       for part in order.tensor_split(k))
        layouts += [Layout(k, "contiguous", padding, groups) for padding in paddings]
    return layouts


def microbatch_pairs(size: int) -> tuple[tuple[int, int], ...]:
    """The (chosen, rejected) rows of a microbatch of ``size`` rows laid out by ``pair_layouts``."""
    half = size // 2
    return tuple((j, half + j) for j in range(half))


def reference_logps(sequence_losses: list[torch.Tensor], rows) -> torch.Tensor:
    """The frozen reference model's log-probability of each of ``rows`` (float64 (len(rows),)): the
    initial weights', so the reference's own per-sequence token losses, summed and negated."""
    return torch.stack([-sequence_losses[i].sum() for i in rows]).to(torch.float64)
