"""The one place that knows label shifting, ``ignore_index`` and token counting.

Every other module asks this one which logits a label scores and how many target
tokens a batch holds, so a miscount can only live here (and is tested here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tasks import TASKS  # noqa: F401  (re-exported: the tasks whose labels this module aligns)

IGNORE_INDEX = -100


def align(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each scored logit row with its target label.

    causal-lm: position t predicts token t+1, so logits drop the last position and
    labels drop the first. seq2seq and token classification score each label where it
    stands. Sequence classification has one label per sequence.
    Returns logits (B, T', C) and targets (B, T').
    """
    if task == "causal-lm":
        return logits[:, :-1, :], labels[:, 1:]
    if task == "sequence-classification":
        return logits.unsqueeze(1), labels.reshape(-1, 1)
    return logits, labels


def shift_right(targets: torch.Tensor, start_id: int) -> torch.Tensor:
    """A seq2seq decoder's inputs for ``targets`` (T,): the start token, then the targets
    without the last one, so position t is scored on target t (``align`` does not shift)."""
    return torch.cat([targets.new_tensor([start_id]), targets[:-1]])


def prepend_ignored(labels: torch.Tensor, count: int) -> torch.Tensor:
    """``labels`` (B, T) after ``count`` IGNORE_INDEX columns: the labels a model scores when it
    prepends ``count`` virtual positions to its inputs (PEFT prompt tuning, see
    ``stacks.peft.virtual_tokens``). After the causal shift the last virtual position scores
    the first real token, a target the unwrapped model never scores."""
    if not count:
        return labels
    return torch.cat([labels.new_full((labels.shape[0], count), IGNORE_INDEX), labels], dim=1)


def drop_after_padding(labels: torch.Tensor, attention_mask: torch.Tensor, task: str) -> torch.Tensor:
    """Labels (B, T) with -100 where the position that would predict them is padding.

    causal-lm: left padding puts a row's first token right after padding, where the shift
    scores it from a pad position's logits; a right-padded or unpadded row never scores its
    first token. Dropping it keeps a row's target set the same under either padding (what
    DataCollatorForLanguageModeling with ``padding_side="left"`` does not: it scores it).
    Other tasks do not shift: unchanged.
    """
    if task != "causal-lm":
        return labels
    out = labels.clone()
    out[:, 1:][attention_mask[:, :-1] == 0] = IGNORE_INDEX
    return out


def target_mask(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Bool (B, T'): which aligned positions carry a target."""
    if task == "causal-lm":
        labels = labels[:, 1:]
    elif task == "sequence-classification":
        labels = labels.reshape(-1, 1)
    return labels != IGNORE_INDEX


def targets_per_sequence(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Long (B,): target tokens in each sequence."""
    return target_mask(labels, task).sum(dim=1)


def count_targets(labels: torch.Tensor, task: str) -> int:
    """Target tokens in a batch: the ``num_items_in_batch`` of a correct step."""
    return int(target_mask(labels, task).sum())


def count_unshifted(labels: torch.Tensor, task: str) -> int:
    """Labels that are not ``ignore_index``, counted without the shift: what a loop that forgets
    that nothing predicts a causal LM's first token counts (one too many per such row)."""
    return int((labels != IGNORE_INDEX).sum()) if task == "causal-lm" else count_targets(labels, task)


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, task: str, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-target cross entropy in float64, shape (B, T'); exactly 0 where no target.

    The logits are upcast before the softmax, so the loss (not the model) is float64.
    """
    scored, targets = align(logits, labels, task)
    flat = scored.reshape(-1, scored.shape[-1]).to(torch.float64)
    losses = F.cross_entropy(
        flat,
        targets.reshape(-1).to(flat.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return losses.view(targets.shape)
