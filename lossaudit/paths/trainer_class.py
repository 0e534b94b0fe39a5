"""One optimizer step of a user's ``transformers.Trainer`` subclass (``--trainer-class``, e.g.
``trl:SFTTrainer``) on one layout, built as the stock Trainer's step is (``trainer_step``: the
same settings, SGD lr 1, sequential sampler, ``UpdateProbe``) but with the class's own dataset
preparation, arguments class and the collator its own builder would give it
(``stacks/frameworks.py``, ``stacks/trl.py``). Returns the stock step's
``StepResult``, so the trainer path's notes and report fields apply unchanged."""

from __future__ import annotations

import contextlib
import inspect
from functools import lru_cache

import torch

from ..core.layouts import Layout
from ..stacks import dpo, require
from ..stacks.frameworks import collator, framework_of, load
from ..stacks.trl import arguments, rows, tokenizer
from .trainer_step import StepResult, _common_settings, given, per_device_batch, prepared, train_one_step


@lru_cache(maxsize=None)
def layout_subclass(cls: type) -> type:
    """``cls`` feeding its dataset in order and recording what compute_loss was given."""

    class Layout_(cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.seen_num_items.append(given(kwargs.get("num_items_in_batch")))
            return super().compute_loss(model, inputs, *args, **kwargs)

    Layout_.__name__ = Layout_.__qualname__ = f"Layout{cls.__name__}"
    return Layout_


def _takes(cls: type) -> set[str]:
    """The keyword arguments ``cls`` takes: its own, and the Trainer's where it passes ``**kwargs`` on."""
    from transformers import Trainer

    params = inspect.signature(cls.__init__).parameters
    names = set(params)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names |= set(inspect.signature(Trainer.__init__).parameters)
    return names


def _build(ctx, layout: Layout, cls: type, out: str, user_args: dict, inputs=None):
    from datasets import Dataset

    pairwise = dpo.trains_pairs(cls)  # DPO: rows of pairs, batches counted in pairs, a frozen reference model
    framework = framework_of(cls)
    settings = {**_common_settings(ctx, layout, out), "logging_strategy": "no"}
    if pairwise:
        settings = dpo.pair_settings(settings)
    args = arguments(cls, settings, user_args)
    optimizer = torch.optim.SGD([p for _, p in ctx.params], lr=1.0, momentum=0.0, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    kwargs = {}
    takes = _takes(cls)
    loaded = ctx.loaded
    vocab = loaded.vocab_size if loaded is not None else ctx.model.get_input_embeddings().weight.shape[0]
    eos = loaded.eos_id if loaded is not None else None
    words = tokenizer(vocab, ctx.batch.pad_id, eos)
    for name in ("processing_class", "tokenizer"):  # renamed in transformers 4.46
        if name in takes:
            kwargs[name] = words
            break
    if pairwise:  # its own preference collator over text rows of pairs
        data = dpo.dataset_rows(ctx, layout)
        kwargs.update(dpo.trainer_kwargs(ctx.model))
    else:
        given_collator = collator(cls, words)  # None: the class builds its own
        if given_collator is not None:
            kwargs["data_collator"] = given_collator
        data = rows(ctx, layout, completion_mask=user_args.get("completion_only_loss") is True,
                    labels=given_collator is not None or framework.labels)
    if inputs is not None:  # what the framework's trainers take besides (ms-swift: its Template), its rows
        kwargs.update(inputs.build(layout, words, out, settings))
        data = inputs.encoded(data)
        args = inputs.arguments(args)  # --swift-args: the arguments ms-swift builds from the user's file
    trainer = layout_subclass(cls)(model=ctx.model, args=args, train_dataset=Dataset.from_list(data),
                                   optimizers=(optimizer, schedule), **kwargs)
    return prepared(trainer)


@contextlib.contextmanager
def _no_progress_bars():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _quieter(inputs):
    """No progress bars, and the framework's own chatter off while its trainer trains."""
    with _no_progress_bars(), inputs.quiet():
        yield


def run_trainer_class(ctx, layout: Layout, cls: type, *, user_args: dict, source=None) -> StepResult:
    """One step of ``cls`` on ``layout``, as the stock Trainer path's StepResult (so its notes
    and report fields apply); the model's weights are restored afterwards. ``source``: the
    framework's own arguments file the trainer is built from (``stacks.swift.SwiftArgs``)."""
    require("datasets", f"--trainer-class {cls.__name__}")
    per_device_batch(layout)
    framework = framework_of(cls)
    if framework.inputs is None:
        return train_one_step(ctx, lambda out: _build(ctx, layout, cls, out, user_args), _no_progress_bars)
    with load(framework.inputs)(ctx, source) as inputs:  # undoes what it set on the audited model
        return train_one_step(ctx, lambda out: _build(ctx, layout, cls, out, user_args, inputs),
                              lambda: _quieter(inputs))
