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
    total = sum(_targets(b) for b in microbatches) * count_factor
    loss = 0.0
    for batch in microbatches:
        part = _token_sum(model, batch) / total
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


def __getattr__(name):  # the class needs trl, imported only when a test asks for it
    if name == "OwnCountSFTTrainer":
        return _sft()
    raise AttributeError(name)
