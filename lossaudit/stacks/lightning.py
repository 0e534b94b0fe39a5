"""``--path lightning``: one ``Trainer(accumulate_grad_batches=k, max_steps=1)`` optimizer step
on a layout's microbatches, in order, on the CPU, with nothing logged or saved.

Lightning runs forward and backward inside ``optimizer.step``'s closure, so the gradient is read
where it is complete: a callback's ``on_before_optimizer_step`` (after the closure, before
clipping and the update). The weights are restored afterwards.

Built-in recipes (a LightningModule around the model, SGD lr 1):

- ``naive``: ``training_step`` returns ``model(**batch).loss``. Lightning divides it by k: a mean
  of microbatch means (Lightning#20350). Known to differ; shown, never a finding.
- ``token_count``: the token sum of the microbatch times k over the step's target tokens (the
  module counts them over the step's k batches before the step), so Lightning's division by k
  leaves the token mean.

``--lightning-module MODULE:FACTORY`` audits the user's own module: ``FACTORY(model)`` returns
a LightningModule whose ``training_step`` takes the layout's batches (dicts of model inputs with
``labels``) and whose ``configure_optimizers`` is its own (the gradient is read before it steps).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.grads import trainable
from ..core.layouts import Microbatch
from ..core.registry import Registry
from ..core.tokens import count_targets, prepend_ignored, token_losses
from . import StackStep, require
from ..core.wrapped import virtual_tokens
from .step import batch_dicts

Factory = Callable[[torch.nn.Module], object]  # model -> LightningModule

NAIVE_DOC = ("naive Lightning module: training_step returns model(**batch).loss, each microbatch's token "
             "mean, and Lightning divides it by accumulate_grad_batches: a mean of microbatch means "
             "(Lightning#20350), which differs from the token mean when microbatches hold different "
             "numbers of target tokens")


@dataclass(frozen=True)
class LightningRecipe:
    name: str
    loss: Callable  # (model, batch dict, task, k, step_total) -> the loss training_step returns
    expected: bool = False  # known to differ from the token mean: shown, never a finding
    doc: str = ""


def naive_loss(model, batch, task, k, total):
    return model(**batch).loss


def token_count_loss(model, batch, task, k, total):
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = prepend_ignored(batch["labels"], virtual_tokens(model))  # what a prompt-tuned model scores
    return token_losses(model(**inputs).logits, labels, task).sum() * k / total


RECIPES: Registry[LightningRecipe] = Registry("lightning recipe")
RECIPES.register("naive", LightningRecipe("naive", naive_loss, expected=True, doc=NAIVE_DOC))
RECIPES.register("token_count", LightningRecipe(
    "token_count", token_count_loss,
    doc="token sum * accumulate_grad_batches / the step's target tokens (Lightning divides by k)"))
DEFAULT_RECIPES = ("naive", "token_count")


def _package(module=None):
    """``lightning.pytorch``, or ``pytorch_lightning`` when the user's module subclasses it."""
    standalone = sys.modules.get("pytorch_lightning")
    if module is not None and standalone is not None and isinstance(module, standalone.LightningModule):
        return standalone
    require("lightning", "--path lightning")
    import lightning.pytorch

    return lightning.pytorch


def recipe_module(model: torch.nn.Module, recipe: LightningRecipe, task: str, total: int):
    """The built-in LightningModule running ``recipe`` with SGD lr 1."""
    pl = _package()

    class RecipeModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return recipe.loss(self.model, batch, task, self.trainer.accumulate_grad_batches, total)

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1.0)

    return RecipeModule()


def _probe_class(pl):
    class GradientProbe(pl.Callback):
        """Copies the gradient at every optimizer step (after the closure ran the backward
        passes, before clipping and the update) and sums what training_step returned."""

        def __init__(self, params):
            self.params, self.steps, self.gradient, self.losses = params, 0, None, []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.steps += 1
            if self.gradient is None:
                self.gradient = [(n, None if p.grad is None else p.grad.detach().cpu().clone())
                                 for n, p in self.params]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.losses.append(float(loss.detach()))  # already divided by k by Lightning

    return GradientProbe


@contextlib.contextmanager
def _quiet():
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def run_lightning(model: torch.nn.Module, microbatches: list[Microbatch], module, *,
                  device: torch.device) -> StackStep:
    """One optimizer step of ``module`` (a LightningModule around ``model``) with
    accumulate_grad_batches = len(microbatches); the weights are restored afterwards."""
    pl = _package(module)
    params = trainable(model)
    saved = [p.detach().clone() for _, p in params]
    probe = _probe_class(pl)(params)
    batches = batch_dicts(model, microbatches, torch.device("cpu"))  # Lightning moves them itself
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="lossaudit-lightning-") as out:
            trainer = pl.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=1,
                accumulate_grad_batches=len(microbatches), callbacks=[probe], logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
            trainer.fit(module, train_dataloaders=loader)
    finally:
        with torch.no_grad():
            for (_, p), w in zip(params, saved):
                p.copy_(w)
                p.grad = None
        model.train()
    return _outcome(probe, len(microbatches))


def _outcome(probe, k: int) -> StackStep:
    notes = []
    if probe.steps != 1:
        notes.append(f"the optimizer stepped {probe.steps} times for {k} accumulated microbatches (once expected)")
    gradient = probe.gradient or [(n, None) for n, _ in probe.params]
    loss = sum(probe.losses) if len(probe.losses) == k else math.nan
    return StackStep(gradient, loss, notes, {"optimizer_steps": probe.steps})


def run_recipe(model, microbatches: list[Microbatch], recipe: LightningRecipe, *, task: str,
               device: torch.device) -> StackStep:
    total = sum(count_targets(prepend_ignored(mb.labels, virtual_tokens(model)), task) for mb in microbatches)
    return run_lightning(model, microbatches, recipe_module(model, recipe, task, total), device=device)


def run_user_module(model, microbatches: list[Microbatch], factory: Factory, *, device: torch.device) -> StackStep:
    return run_lightning(model, microbatches, factory(model), device=device)
