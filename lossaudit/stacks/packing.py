"""Sample packing (axolotl's ``sample_packing: true``): each microbatch of the layout is one pack,
its sequences concatenated into one row (position ids restarting at each), so the audit keeps
owning which rows a microbatch holds; the framework's own collator, attention and loss do the rest.

What a packed step can get wrong, and what each predicts (``candidates``), computed plainly on the
audited model:

- **boundary targets**: the labels are concatenated and shifted as one row, so each packed
  sequence's first label is scored from the previous sequence's last position, a target that
  sequence alone never has (``num_items_in_batch`` counts it too);
- **crossing attention**: the pack is attended as one causal row, every sequence seeing the ones
  before it (an attention backend that does not isolate packed sequences).

Both are divided as the step divides: by the step's packed target count where the Trainer gave
``num_items_in_batch``, else each pack by k times its own count (the mean of microbatch means).
The audit's reference stays each sequence's own targets under its own attention; a step that
equals one of these is named, within the measured error (``explain``).
"""

from __future__ import annotations

import torch

from ..core.grads import compare_grads, trainable
from ..core.layouts import Layout
from ..core.tokens import count_targets, token_losses

FITS = 1e-4  # a candidate is named only when the step's update is this close to it (measured: 2e-7)


class Packs(torch.utils.data.BatchSampler):
    """The batch sampler of a packed step: per microbatch one pack holding its rows, in the order
    of the dataset (``rows`` gives the layout's sequences microbatch by microbatch)."""

    def __init__(self, sizes: list[int]):  # noqa: D107 (no base init: nothing to sample from)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.batches = [[list(range(s, s + n))] for s, n in zip(starts, sizes)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def sizes(layout: Layout, rank: int = 0) -> list[int]:
    """Rows in each microbatch of ``rank``: one pack each."""
    return [len(g) for g in layout.rank_groups(rank)]


def longest_pack(batch, layout: Layout, rank: int = 0) -> int:
    """Tokens in the layout's longest pack (the ``sequence_len`` a pack must fit in)."""
    return max(sum(len(batch.samples[i].input_ids) for i in g) for g in layout.rank_groups(rank))


def _pack_losses(model, samples, isolated: bool, device) -> torch.Tensor:
    """Per-target float64 losses of one pack, labels concatenated and shifted as one row."""
    labels = torch.cat([s.labels for s in samples])[None].to(device)
    if isolated:  # each sequence under its own attention; the logits side by side
        logits = torch.cat([model(input_ids=s.input_ids[None].to(device)).logits for s in samples], dim=1)
    else:  # one causal row, position ids restarting at each sequence; the mask given (transformers isolates
        # the sequences itself where position ids restart and no attention mask is given)
        ids = torch.cat([s.input_ids for s in samples])[None].to(device)
        positions = torch.cat([torch.arange(len(s.input_ids)) for s in samples])[None].to(device)
        logits = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
    return token_losses(logits, labels, "causal-lm")


def packed_count(batch, layout: Layout, rank: int = 0) -> list[int]:
    """Target tokens of each pack, boundary targets included."""
    return [count_targets(torch.cat([batch.samples[i].labels for i in g])[None], "causal-lm")
            for g in layout.rank_groups(rank)]


def candidate(model, batch, layout: Layout, *, isolated: bool, counted: bool, device) -> dict[str, torch.Tensor]:
    """The gradient of a packed step (``isolated`` attention or crossing; divided by the step's
    packed count where ``counted``, else each pack by k times its own)."""
    params = trainable(model)
    counts = packed_count(batch, layout)
    total = None
    for group, count in zip(layout.rank_groups(0), counts):
        losses = _pack_losses(model, [batch.samples[i] for i in group], isolated, device)
        loss = losses.sum() / (sum(counts) if counted else len(counts) * count)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        total = list(grads) if total is None else [a if b is None else (b if a is None else a + b)
                                                   for a, b in zip(total, grads)]
    return {name: g for (name, _), g in zip(params, total)}


def explain(ctx, layout: Layout, update: dict, num_items: list) -> str:
    """What the packed step's update equals, named only where it fits (``FITS``); else the counts."""
    if compare_grads(ctx.reference.grads, update.items()).rel_err <= FITS:
        return ""  # the token mean of the sequences' own targets: nothing to explain
    counts, own = packed_count(ctx.batch, layout), sum(ctx.batch.group_targets(layout.groups))
    extra = sum(counts) - own
    counted = any(n is not None for n in num_items) or layout.microbatches == 1  # one pack: the same division
    how = "over the step's packed count" if counted else "each pack by k times its own count"
    stories = (
        (True, f"sample packing scores each packed sequence's first label from the previous sequence's last "
               f"position ({extra} target(s) beyond the sequences' own {own}; attention isolated per sequence, "
               f"divided {how})"),
        (False, f"sample packing attends across the packed sequences (each sees the ones packed before it: the "
                f"attention backend does not isolate them), and scores each packed sequence's first label from the "
                f"previous sequence's last position ({extra} beyond {own}; divided {how})"),
    )
    for isolated, text in stories:
        if not extra and isolated:
            continue  # with no boundary target the isolated pack is the reference itself
        predicted = candidate(ctx.model, ctx.batch, layout, isolated=isolated, counted=counted, device=ctx.device)
        err = compare_grads(predicted, update.items()).rel_err
        if err <= FITS:
            return f"{text}: the update equals that within {err:.1e}"
    return f"sample packing: {sum(counts)} packed targets ({extra} boundary target(s) beyond the sequences' own {own})"
