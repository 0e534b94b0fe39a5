"""One optimizer step of the trainer axolotl builds from the user's config (``--axolotl-config``,
``stacks/axolotl.py``) on one layout, returned as the stock Trainer path's ``StepResult``: the
trainer is axolotl's, fed the layout's rows in order (the sequential sampler and the record of
what compute_loss was given come from ``trainer_class.layout_subclass``), with SGD lr 1 whose
update ``UpdateProbe`` reads. axolotl trains a model of its own loading, with the audited
model's weights; the audited model is never touched, and what axolotl patched in place (classes,
modules) is put back after the step (``stacks.axolotl.patches_undone``).

With ``sample_packing: true`` each microbatch is one pack (``stacks.packing.Packs`` in place of
axolotl's multipack sampler, which would choose the rows itself), collated by axolotl's own packing
collator; what the packed step's update equals is said in its note (``stacks.packing.explain``)."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ..core.layouts import Layout
from ..stacks import require
from ..stacks.axolotl import AxolotlConfig, build_trainer, patches_undone, quiet
from ..stacks.packing import Packs, explain, sizes
from .probe import UpdateProbe
from .trainer_class import _no_progress_bars, layout_subclass
from .trainer_step import StepResult, _quiet_and_cheap, per_device_batch, prepared


def run_axolotl_config(ctx, layout: Layout, config: AxolotlConfig) -> StepResult:
    require("datasets", "--axolotl-config")
    per_device = per_device_batch(layout)
    with patches_undone(ctx.model), _quiet_and_cheap(), _no_progress_bars(), quiet(), tempfile.TemporaryDirectory(prefix="lossaudit-axolotl-") as out:
        trainer, model = build_trainer(config, ctx, layout, per_device, Path(out))
        trainer.__class__ = packed_subclass(type(trainer)) if config.packing else layout_subclass(type(trainer))
        trainer.lossaudit_packs = Packs(sizes(layout))
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
                      getattr(trainer.args, "average_tokens_across_devices", None),
                      note=explain(ctx, layout, update, num_items) if config.packing else "")


@lru_cache(maxsize=None)
def packed_subclass(cls: type) -> type:
    """``layout_subclass(cls)`` whose microbatches are the packs set on the instance (``lossaudit_packs``)."""

    class Packed_(layout_subclass(cls)):
        def _get_train_sampler(self, *args, **kwargs):
            return self.lossaudit_packs

    Packed_.__name__ = Packed_.__qualname__ = f"Packed{cls.__name__}"
    return Packed_
