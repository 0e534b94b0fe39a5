"""The reference every case is compared with: the full batch, one microbatch, the declared
objective (by default the token mean of the per-token losses; ``core/objective.py``), computed
here in float64 from the model's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moe import ReferenceAux, aux_spec, reference_aux
from .batch import Batch
from .finite import has_nonfinite
from .forward import forward
from .grads import Params, grads_of
from .layouts import Layout, full_batch, microbatches, pad
from .reductions import Reduction, StepTokens, Weight
from .objective import Objective
from .tokens import prepend_ignored, target_mask
from .wrapped import virtual_tokens


@dataclass
class Reference:
    loss: float
    count: int  # target tokens in the step
    grads: dict[str, torch.Tensor]
    sequence_losses: list[torch.Tensor]  # per sequence: float64 aligned token losses, 0 off-target
    aux: ReferenceAux | None = None  # MoE: the full batch's router aux loss (aux.py)
    nonfinite: str | None = None  # the first tensor holding NaN/Inf: then nothing can be compared

    def step_loss(self, batch: Batch, layout: Layout, reduction: Reduction) -> float:
        """What ``reduction`` gives on ``layout``, from the reference's token losses (no forward)."""
        step = step_tokens(batch, layout)
        total = 0.0
        for group, mask, weight in zip(layout.groups, step.masks, reduction.weights(step)):
            losses = pad([self.sequence_losses[i] for i in group], 0, layout.padding, length=mask.shape[1])
            total += float(weighted_sum(weight, losses))
        return total

    def group_sums(self, batch: Batch, layout: Layout) -> list[float]:
        """Each microbatch's sum of the reference's token losses."""
        return [sum(float(self.sequence_losses[i].sum()) for i in group) for group in layout.groups]

    def microbatch_losses(self, batch: Batch, layout: Layout) -> list[float]:
        """Each microbatch's token mean of the reference's token losses (NaN where it holds
        no target): the numbers ``mean_of_means`` averages."""
        counts = batch.group_targets(layout.groups)
        return [total / count if count else float("nan") for total, count in zip(self.group_sums(batch, layout), counts)]


def step_tokens(batch: Batch, layout: Layout) -> StepTokens:
    return StepTokens(tuple(target_mask(mb.labels, batch.task) for mb in microbatches(batch, layout)))


def weighted_sum(weight: Weight, losses: torch.Tensor) -> torch.Tensor:
    """Sum of weighted token losses; ``losses`` is 0 where there is no target."""
    if isinstance(weight, torch.Tensor):
        return (weight.to(losses) * losses).sum()
    return losses.sum() * weight


def compute_reference(model, batch: Batch, params: Params, device: torch.device, *, label_smoothing: float = 0.0,
                      objective: Objective | None = None) -> Reference:
    """The full batch's reference of ``objective`` (default: the token mean, smoothed by
    ``label_smoothing``)."""
    objective = objective or Objective(label_smoothing)
    mb = full_batch(batch)
    outputs, _ = forward(model, mb, device)
    prefix = virtual_tokens(model)  # what a prompt-tuned model scores: its virtual positions too
    labels = prepend_ignored(mb.labels, prefix)
    losses = objective.token_losses(outputs.logits, labels.to(device), batch.task)
    mask = target_mask(labels, batch.task)
    count = int(mask.sum())
    loss = objective.window_loss(losses, mask.to(losses.device), batch.pairs)
    aux = reference_aux(outputs, mb.attention_mask, aux_spec(model), params)  # before the graph is freed
    grads = grads_of(loss, params, retain_graph=False)
    nonfinite = _first_nonfinite(outputs.logits, loss, params, grads)
    widths = [int(target_mask(s.labels[None], batch.task).shape[1]) for s in batch.samples]
    return Reference(
        loss=float(loss.detach()),
        count=count,
        grads={n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params, grads)},
        # per sequence at the plain model's positions: a prompt-tuned model's first real token,
        # scored from the last virtual position (a target only when its label is), is left out here
        sequence_losses=[losses[i, prefix:prefix + w].detach().cpu() for i, w in enumerate(widths)],
        aux=aux,
        nonfinite=nonfinite,
    )


def _first_nonfinite(logits, loss, params: Params, grads) -> str | None:
    if has_nonfinite(logits):
        return "the full batch's logits"
    if has_nonfinite(loss):
        return "the full batch's loss"
    return next((f"the gradient of {n}" for (n, _), g in zip(params, grads) if g is not None and has_nonfinite(g)), None)
