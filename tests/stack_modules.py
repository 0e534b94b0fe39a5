"""What users write, for tests/stacks/test_stacks_*.py: step functions and Lightning modules, each
correct one with a planted-bug twin."""

from __future__ import annotations

import torch

from lossaudit.core.tokens import IGNORE_INDEX


def _targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _token_sum(model, batch: dict) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX,
        reduction="sum")


def _token_sums_over(model, microbatches, count_factor: float) -> float:
    """Each microbatch's token sum over the step's target count times ``count_factor``."""
    return _token_sums_by(model, microbatches, sum(_targets(b) for b in microbatches) * count_factor)


def _token_sums_by(model, microbatches, denominator: float) -> float:
    """Each microbatch's token sum over one ``denominator``, backwarded microbatch by microbatch."""
    loss = 0.0
    for batch in microbatches:
        part = _token_sum(model, batch) / denominator
        part.backward()
        loss += float(part.detach())
    return loss


def token_mean_step(model, microbatches):
    """Right: token sums over the step's target count."""
    return _token_sums_over(model, microbatches, 1.0)


def rescaled_step(model, microbatches):
    """Planted bug: token sums over a count 1 % too large (a gradient 0.990x the right one)."""
    return _token_sums_over(model, microbatches, 1.01)


def mean_of_means_step(model, microbatches):
    """Planted bug: nanoGPT's ``loss / gradient_accumulation_steps``."""
    loss = 0.0
    for batch in microbatches:
        part = model(**batch).loss / len(microbatches)
        part.backward()
        loss += float(part.detach())
    return loss


def _module_class():
    import lightning.pytorch as pl

    class TokenCountModule(pl.LightningModule):
        """Counts the step's target tokens over the next accumulate_grad_batches batches."""

        forget_k = False

        def __init__(self, model):
            super().__init__()
            self.model = model

        def on_train_epoch_start(self):
            k = self.trainer.accumulate_grad_batches
            batches = [b for _, b in zip(range(k), self.trainer.train_dataloader)]
            self.total = sum(_targets(b) for b in batches)

        def training_step(self, batch, batch_idx):
            loss = _token_sum(self.model, batch) / self.total
            # Lightning divides by accumulate_grad_batches: undo it, unless the bug forgets to
            return loss if self.forget_k else loss * self.trainer.accumulate_grad_batches

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3)  # its own: read before it steps

    return TokenCountModule


def token_count_module(model):
    return _module_class()(model)


def forgets_k_module(model):
    """Planted bug: normalises by the step's tokens but lets Lightning divide by k again."""
    module = _module_class()(model)
    module.forget_k = True
    return module


def _sft():
    from trl import SFTTrainer

    class OwnCountSFTTrainer(SFTTrainer):
        """Planted bug: each microbatch normalised by its own tokens, as if no count were given."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

    return OwnCountSFTTrainer


def _dpo_summed():
    from trl import DPOTrainer

    class SummedDPOTrainer(DPOTrainer):
        """Planted bug: claims its loss is already scaled for gradient accumulation, so the Trainer
        no longer divides each microbatch's pair mean by k (a k-fold step)."""

        loss_is_scaled_for_ga = True

    return SummedDPOTrainer


def _grpo_reweighted():
    from trl import GRPOTrainer

    class ReweightedGRPOTrainer(GRPOTrainer):
        """Planted bug: each window's microbatches divided by a count 1 % off, alternately short and
        long (1/0.99 and 1/1.01 of the loss type's own normaliser): 1 % of the weight moved between
        microbatches, the window's total nearly kept."""

        def _compute_loss(self, model, inputs):
            self.lossaudit_planted = getattr(self, "lossaudit_planted", -1) + 1
            return super()._compute_loss(model, inputs) / (0.99 if self.lossaudit_planted % 2 == 0 else 1.01)

    return ReweightedGRPOTrainer


def __getattr__(name):  # the classes need trl, imported only when a test asks for them
    if name == "OwnCountSFTTrainer":
        return _sft()
    if name == "ReweightedGRPOTrainer":
        return _grpo_reweighted()
    if name == "SummedDPOTrainer":
        return _dpo_summed()
    raise AttributeError(name)


# --- steps that declare an objective other than the token mean (issue 22) ----------------------

def _sequence_sums(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's token sum (B,) and target count (B,) on one microbatch."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                               reduction="none")
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def sequence_mean_step(model, microbatches):
    """A mean of per-sequence token means over the window (verl's seq-mean-token-mean): each
    sequence's token mean, over the window's sequences that have a target."""
    sequences = sum(int(((b["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1) > 0).sum()) for b in microbatches)
    loss = 0.0
    for batch in microbatches:
        sums, counts = _sequence_sums(model, batch)
        part = (sums / counts.clamp(min=1)).sum() / sequences
        part.backward()
        loss += float(part.detach())
    return loss


SUM_OVER = 192


def sum_over_step(model, microbatches):
    """The token sum over a constant 192 (Dr. GRPO's sequences x max completion length)."""
    return _token_sums_by(model, microbatches, SUM_OVER)


def microbatch_sequence_mean_step(model, microbatches):
    """Planted bug under a declared sequence mean: each microbatch's mean of sequence means, the
    microbatches' means averaged (right only when every microbatch holds as many sequences)."""
    loss = 0.0
    for batch in microbatches:
        sums, counts = _sequence_sums(model, batch)
        has = counts > 0
        part = (sums / counts.clamp(min=1))[has].mean() / len(microbatches)
        part.backward()
        loss += float(part.detach())
    return loss


# --- DPO-style steps under a declared pair mean (issue 22) ---------------------------------------
# each microbatch dict holds its chosen rows, then its rejected rows, and ref_logps (the frozen
# reference model's completion log-probabilities, constants)

DPO_BETA = 0.1


def _pair_losses(model, batch: dict) -> torch.Tensor:
    """DPO's sigmoid loss per pair of one microbatch, (P_m,)."""
    sums, _ = _sequence_sums(model, {k: v for k, v in batch.items() if k != "ref_logps"})
    ratios = -sums - batch["ref_logps"]  # log pi - log ref, per row
    chosen, rejected = ratios.chunk(2)
    return -torch.nn.functional.logsigmoid(DPO_BETA * (chosen - rejected))


def _dpo(model, microbatches, normalise) -> float:
    loss = 0.0
    for batch in microbatches:
        part = normalise(_pair_losses(model, batch), microbatches)
        part.backward()
        loss += float(part.detach())
    return loss


def dpo_step(model, microbatches):
    """Right: each microbatch's pair losses summed, over the window's pair count."""
    pairs = sum(len(b["ref_logps"]) // 2 for b in microbatches)
    return _dpo(model, microbatches, lambda losses, mbs: losses.sum() / pairs)


def dpo_summed_means_step(model, microbatches):
    """Planted bug: each microbatch's pair mean, summed over the k microbatches (no 1/k)."""
    return _dpo(model, microbatches, lambda losses, mbs: losses.mean())


def dpo_rows_step(model, microbatches):
    """Planted bug: the pair losses over the window's rows (chosen and rejected counted apart)."""
    rows = sum(len(b["ref_logps"]) for b in microbatches)
    return _dpo(model, microbatches, lambda losses, mbs: losses.sum() / rows)


def miscount_step(model, microbatches):
    """Planted bug: the token sum over the step's target count plus 2 (a miscount, not an objective)."""
    return _token_sums_by(model, microbatches, sum(_targets(b) for b in microbatches) + 2)
