"""One optimizer step of the trainer axolotl builds from the user's config (``--axolotl-config``,
``stacks/axolotl.py``) on one layout, returned as the stock Trainer path's ``StepResult``: the
trainer is axolotl's, fed the layout's rows in order (the sequential sampler and the record of
what compute_loss was given come from ``trainer_class.layout_subclass``), with SGD lr 1 whose
update ``UpdateProbe`` reads. axolotl trains a model of its own loading, with the audited
model's weights; the audited model is never touched, and what axolotl patched in place (classes,
modules) is put back after the step (``stacks.axolotl.patches_undone``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..core.layouts import Layout
from ..stacks import require
from ..stacks.axolotl import AxolotlConfig, build_trainer, patches_undone, quiet
from .probe import UpdateProbe
from .trainer_class import _no_progress_bars, layout_subclass
from .trainer_step import StepResult, _quiet_and_cheap, per_device_batch, prepared


def run_axolotl_config(ctx, layout: Layout, config: AxolotlConfig) -> StepResult:
    require("datasets", "--axolotl-config")
    per_device = per_device_batch(layout)
    with patches_undone(ctx.model), _quiet_and_cheap(), _no_progress_bars(), quiet(), tempfile.TemporaryDirectory(prefix="lossaudit-axolotl-") as out:
        trainer, model = build_trainer(config, ctx, layout, per_device, Path(out))
        trainer.__class__ = layout_subclass(type(trainer))
        prepared(trainer)
        trainer.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0,
                                            momentum=0.0, weight_decay=0.0)
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _step: 1.0)
        probe = UpdateProbe(model)
        probe.watch(trainer.optimizer)
        result = trainer.train()
        update = dict(probe.gradient())
    num_items = [None if n is None else int(n) for n in trainer.seen_num_items]
    return StepResult(update, float(result.training_loss), num_items,
                      getattr(trainer, "model_accepts_loss_kwargs", None),
                      getattr(trainer.args, "average_tokens_across_devices", None))
