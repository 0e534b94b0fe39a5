"""Layouts: how one optimizer step's batch is cut into microbatches and padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import Batch
from .tokens import IGNORE_INDEX, drop_after_padding

GROUPINGS = ("contiguous", "length_sorted", "imbalanced")
PADDINGS = ("right", "left")


@dataclass(frozen=True, slots=True)
class Layout:
    microbatches: int
    grouping: str
    padding: str
    groups: tuple[tuple[int, ...], ...]  # sequence indices of each microbatch, rank-major
    world_size: int = 1  # data-parallel ranks; len(groups) == world_size * microbatches

    @property
    def name(self) -> str:
        ranks = f" x{self.world_size} ranks" if self.world_size > 1 else ""
        return f"k={self.microbatches}{ranks} {self.grouping} pad-{self.padding}"

    def rank_groups(self, rank: int) -> tuple[tuple[int, ...], ...]:
        """The k microbatches rank ``rank`` accumulates: rank r holds groups[r*k:(r+1)*k]."""
        k = self.microbatches
        return self.groups[rank * k : (rank + 1) * k]

    def per_rank(self, per_microbatch: list[int]) -> list[int]:
        """Per-microbatch numbers (target tokens), summed over each rank's k microbatches."""
        k = self.microbatches
        return [sum(per_microbatch[r * k : (r + 1) * k]) for r in range(self.world_size)]


@dataclass(frozen=True, slots=True)
class Microbatch:
    input_ids: torch.Tensor  # (B_m, T_m); the encoder's input for seq2seq
    attention_mask: torch.Tensor  # (B_m, T_m)
    position_ids: torch.Tensor  # (B_m, T_m), counted over real tokens only
    labels: torch.Tensor  # (B_m, T_m); seq2seq (B_m, T_dec); sequence classification (B_m,)
    decoder_input_ids: torch.Tensor | None = None  # (B_m, T_dec), seq2seq only
    decoder_attention_mask: torch.Tensor | None = None  # (B_m, T_dec), seq2seq only


def _chunks(order: list[int], k: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(i) for i in c) for c in torch.tensor(order).tensor_split(k))


def group(batch: Batch, k: int, grouping: str) -> tuple[tuple[int, ...], ...]:
    """Split the batch into k microbatches of (nearly) equal sequence counts."""
    index = list(range(len(batch)))
    if grouping == "length_sorted":  # as a group_by_length sampler does
        index.sort(key=lambda i: batch.lengths[i])
    elif grouping == "imbalanced":  # sorted by target count: the widest spread of counts
        index.sort(key=lambda i: batch.targets[i])
    elif grouping != "contiguous":
        raise ValueError(f"unknown grouping {grouping!r}")
    return _chunks(index, k)


def plan_layouts(
    batch: Batch,
    microbatches: tuple[int, ...],
    *,
    paddings: tuple[str, ...] = PADDINGS,
    groupings: tuple[str, ...] = GROUPINGS,
    world_size: int = 1,
) -> list[Layout]:
    """Every distinct layout; two groupings that give the same microbatches count once.

    With ``world_size`` N the batch is cut into N*k microbatches and rank r takes the
    r-th run of k. The groupings keep their meaning across ranks: ``imbalanced`` gives
    rank 0 the sequences with the fewest targets, so ranks see uneven token counts and a
    per-rank normalisation cannot hide.
    """
    seen: set = set()
    layouts = []
    for k in microbatches:
        for grouping in groupings:
            groups = group(batch, world_size * k, grouping)
            for padding in paddings:
                layout = Layout(k, grouping, padding, groups, world_size)
                if _identity(layout) not in seen:
                    seen.add(_identity(layout))
                    layouts.append(layout)
    return layouts


def _identity(layout: Layout) -> tuple:
    """What makes two layouts compute different things: each rank's set of microbatches
    (order within a rank does not matter to a sum) and the padding side."""
    ranks = tuple(frozenset(frozenset(g) for g in layout.rank_groups(r)) for r in range(layout.world_size))
    return ranks, layout.padding


def pad(rows: list[torch.Tensor], value: int, side: str, length: int | None = None) -> torch.Tensor:
    """Stack 1-D tensors into (B, T), padding on ``side`` to the longest (or ``length``)."""
    width = length or max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, : len(r)] = r
        else:
            out[i, width - len(r) :] = r
    return out


def _mask(rows: list[torch.Tensor], side: str) -> torch.Tensor:
    return pad([torch.ones(len(r), dtype=torch.long) for r in rows], 0, side)


def _labels(samples: list, task: str, side: str, mask: torch.Tensor) -> torch.Tensor:
    if task == "sequence-classification":  # one label per sequence: nothing to pad
        return torch.stack([s.labels.reshape(()) for s in samples])
    return drop_after_padding(pad([s.labels for s in samples], IGNORE_INDEX, side), mask, task)


def collate(batch: Batch, indices: tuple[int, ...], padding: str) -> Microbatch:
    """Pad the chosen sequences to the longest among them, as a data collator does (labels
    with -100; a seq2seq collator pads the decoder side the same way). One difference from
    the collators, on left padding only: a causal LM's first token is not scored from the
    pad position before it (``tokens.drop_after_padding``), so the targets do not depend on
    the padding side. tests/core/test_collators.py compares with each real collator."""
    samples = [batch.samples[i] for i in indices]
    mask = _mask([s.input_ids for s in samples], padding)
    decoder = {}
    if batch.task == "seq2seq":
        rows = [s.decoder_input_ids for s in samples]
        decoder = {"decoder_input_ids": pad(rows, batch.pad_id, padding),
                   "decoder_attention_mask": _mask(rows, padding)}
    return Microbatch(
        input_ids=pad([s.input_ids for s in samples], batch.pad_id, padding),
        attention_mask=mask,
        position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
        labels=_labels(samples, batch.task, padding, mask),
        **decoder,
    )


def microbatches(batch: Batch, layout: Layout) -> list[Microbatch]:
    return [collate(batch, g, layout.padding) for g in layout.groups]


def full_batch(batch: Batch) -> Microbatch:
    return collate(batch, tuple(range(len(batch))), "right")
