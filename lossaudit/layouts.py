"""Layouts: how one optimizer step's batch is cut into microbatches and padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import Batch
from .tokens import IGNORE_INDEX

GROUPINGS = ("contiguous", "length_sorted", "imbalanced")
PADDINGS = ("right", "left")


@dataclass(frozen=True, slots=True)
class Layout:
    microbatches: int
    grouping: str
    padding: str
    groups: tuple[tuple[int, ...], ...]  # sequence indices of each microbatch
    world_size: int = 1

    @property
    def name(self) -> str:
        return f"k={self.microbatches} {self.grouping} pad-{self.padding}"


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
    """Every distinct layout; two groupings that give the same microbatches count once."""
    seen: set = set()
    layouts = []
    for k in microbatches:
        for grouping in groupings:
            groups = group(batch, k, grouping)
            for padding in paddings:
                key = (frozenset(frozenset(g) for g in groups), padding)
                if key not in seen:
                    seen.add(key)
                    layouts.append(Layout(k, grouping, padding, groups, world_size))
    return layouts


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


def _labels(samples: list, task: str, side: str) -> torch.Tensor:
    if task == "sequence-classification":  # one label per sequence: nothing to pad
        return torch.stack([s.labels.reshape(()) for s in samples])
    return pad([s.labels for s in samples], IGNORE_INDEX, side)


def collate(batch: Batch, indices: tuple[int, ...], padding: str) -> Microbatch:
    """Pad the chosen sequences to the longest among them, as a data collator does
    (a seq2seq collator pads the decoder side the same way, labels with -100)."""
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
        labels=_labels(samples, batch.task, padding),
        **decoder,
    )


def microbatches(batch: Batch, layout: Layout) -> list[Microbatch]:
    return [collate(batch, g, layout.padding) for g in layout.groups]


def full_batch(batch: Batch) -> Microbatch:
    return collate(batch, tuple(range(len(batch))), "right")
