"""Deterministic batches of varied length, with padding and prompt masking in the labels.

What a sample holds depends on the task (the labels are what the model is scored on):

- causal-lm: ``input_ids`` (T,) and ``labels`` (T,) as the collators build them: the ids
  themselves (DataCollatorForLanguageModeling(mlm=False): the first token is a label, the
  shift drops it), or -100 on a prompt prefix and the ids after it (TRL's completion-only
  masking: ``completion_mask`` folded into the labels);
- seq2seq: encoder ``input_ids`` (S,), decoder ``labels`` (T,) and ``decoder_input_ids`` (T,)
  = the start token then the targets shifted right (as the model's own shift would build them);
- token-classification: ``input_ids`` (T,), ``labels`` (T,) class ids, -100 on ignored tokens
  (a leading special token, sub-word continuations);
- sequence-classification: ``input_ids`` (T,), ``labels`` () one class id per sequence.

A sequence made "empty" (``--empty-sequences``) has every label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .tokens import IGNORE_INDEX, shift_right, targets_per_sequence

FIRST_TOKEN_ID = 3  # ids below this are left to pad/bos/eos


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """How the audit batch is drawn."""

    batch_size: int = 8
    max_length: int = 32
    min_length: int = 4
    prompt_masking: bool = True  # every other sequence gets a masked prompt (SFT style); False: no masking at all
    empty_sequences: int = 0  # sequences with no target at all, placed last
    seed: int = 0
    every_prompt: bool = False  # every sequence gets a masked prompt (a chat template's rows), not every other one


@dataclass(frozen=True, slots=True)
class Sample:
    input_ids: torch.Tensor  # (T,) long; the encoder's input for seq2seq
    labels: torch.Tensor  # long, IGNORE_INDEX where nothing is scored; shape per task (module doc)
    decoder_input_ids: torch.Tensor | None = None  # (T_dec,) seq2seq only


@dataclass(frozen=True)
class Batch:
    samples: tuple[Sample, ...]
    task: str
    pad_id: int
    pairs: tuple[tuple[int, int], ...] = ()  # preference pairs: (chosen, rejected) sample indices

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    @cached_property
    def targets(self) -> list[int]:
        """Targets per sequence (tokens, or 1/0 for a sequence label): what a correct step counts.
        Computed once: callers index it per sequence."""
        return [int(targets_per_sequence(s.labels[None], self.task)) for s in self.samples]

    def group_targets(self, groups) -> list[int]:
        """Targets of each group of sequence indices (a layout's microbatches)."""
        return [sum(self.targets[i] for i in g) for g in groups]


@dataclass(frozen=True, slots=True)
class Vocab:
    """The id ranges a batch may draw from."""

    size: int  # token ids are drawn from [FIRST_TOKEN_ID, size)
    pad_id: int
    num_labels: int = 0  # classes of a classification head
    decoder_start_id: int = 0  # seq2seq: the decoder's first input token
    eos_id: int | None = None  # sequence classification: ends every sequence, as tokenizers do


def make_batch(spec: BatchSpec, *, vocab_size: int, pad_id: int, task: str = "causal-lm",
               num_labels: int = 0, decoder_start_id: int = 0, eos_id: int | None = None) -> Batch:
    """Draw ``spec.batch_size`` samples for ``task`` from ``spec.seed``."""
    vocab = Vocab(max(vocab_size, FIRST_TOKEN_ID + 1), pad_id, num_labels, decoder_start_id, eos_id)
    if task in ("token-classification", "sequence-classification") and num_labels < 2:
        raise ValueError(f"{task} needs at least 2 labels, got {num_labels}")
    g = torch.Generator().manual_seed(spec.seed)
    draw = _DRAW[task]
    samples = []
    for i in range(spec.batch_size):
        empty = i >= spec.batch_size - spec.empty_sequences
        masked = spec.prompt_masking and (spec.every_prompt or i % 2 == 1)
        samples.append(draw(spec, vocab, g, empty=empty, masked=masked))
    return Batch(tuple(samples), task, pad_id)


def _randint(low: int, high: int, g: torch.Generator, size: tuple = (1,)) -> torch.Tensor:
    return torch.randint(low, high, size, generator=g)


def _ids(spec: BatchSpec, vocab: Vocab, g: torch.Generator) -> torch.Tensor:
    """Text never holds the pad id: a collator that masks pad ids in the labels
    (DataCollatorForLanguageModeling) would drop it, a classifier that pools the last
    non-pad token would stop at it."""
    length = int(_randint(spec.min_length, spec.max_length + 1, g))
    ids = _randint(FIRST_TOKEN_ID, vocab.size, g, (length,))
    if vocab.pad_id >= FIRST_TOKEN_ID:
        ids[ids == vocab.pad_id] = FIRST_TOKEN_ID if vocab.pad_id != FIRST_TOKEN_ID else FIRST_TOKEN_ID + 1
    return ids


def _causal(spec, vocab, g, *, empty, masked) -> Sample:
    """An unmasked sequence's labels are its ids: the first is a label no position predicts
    (the shift drops it), as DataCollatorForLanguageModeling(mlm=False) leaves it. A masked
    one ignores a prompt of 1 to T-1 tokens, as completion-only masking does."""
    ids = _ids(spec, vocab, g)
    labels = ids.clone()
    prompt = len(ids) if empty else int(_randint(1, len(ids), g)) if masked else 0
    labels[:prompt] = IGNORE_INDEX
    return Sample(ids, labels)


def _seq2seq(spec, vocab, g, *, empty, masked) -> Sample:
    """Every decoder position is scored (the start token predicts the first target); a masked
    sequence ignores a forced decoder prefix (a language tag, a task prompt)."""
    source = _ids(spec, vocab, g)
    targets = _ids(spec, vocab, g)
    labels = targets.clone()
    prompt = len(targets) if empty else int(_randint(1, len(targets), g)) if masked else 0
    labels[:prompt] = IGNORE_INDEX
    return Sample(source, labels, shift_right(targets, vocab.decoder_start_id))


def _token_classification(spec, vocab, g, *, empty, masked) -> Sample:
    """Position 0 stands for a special token ([CLS]) and is ignored; a masked sequence also
    ignores about a third of its tokens, scattered, as sub-word continuations are."""
    ids = _ids(spec, vocab, g)
    labels = _randint(0, vocab.num_labels, g, (len(ids),))
    ignored = torch.zeros(len(ids), dtype=torch.bool)
    ignored[0] = True
    if masked:
        ignored[1:] = torch.rand(len(ids) - 1, generator=g) < 1 / 3
    if empty:
        ignored[:] = True
    labels[ignored] = IGNORE_INDEX
    return Sample(ids, labels)


def _sequence_classification(spec, vocab, g, *, empty, masked) -> Sample:
    """One label per sequence. The sequence ends with EOS, once: encoder-decoder heads (BART,
    T5) pool the decoder's state at the last EOS and refuse a sequence without one."""
    ids = _ids(spec, vocab, g)
    if vocab.eos_id is not None:
        other = FIRST_TOKEN_ID if vocab.eos_id != FIRST_TOKEN_ID else FIRST_TOKEN_ID + 1
        ids = torch.where(ids == vocab.eos_id, other, ids)
        ids[-1] = vocab.eos_id
    label = IGNORE_INDEX if empty else int(_randint(0, vocab.num_labels, g))
    return Sample(ids, torch.tensor(label))


_DRAW = {
    "causal-lm": _causal,
    "seq2seq": _seq2seq,
    "token-classification": _token_classification,
    "sequence-classification": _sequence_classification,
}
