"""``--trainer-class MODULE:CLASS``: what one optimizer step of a ``transformers.Trainer`` subclass
such as TRL's ``SFTTrainer`` needs, with the class's own dataset preparation and data collator
(``paths/trainer_class.py`` runs the step beside the stock Trainer's).

The class gets the layout's sequences, in the layout's order, as pre-tokenized rows: ``input_ids``
alone when the batch scores every token (``--no-prompt-masking``), else with ``labels`` (the
audit's targets, prompts -100), or, with ``completion_only_loss=True``, with ``completion_mask`` so
that the class's own completion-only masking builds them; a tokenizer built offline over the model's vocabulary as
``processing_class``, and its own arguments class (``SFTConfig`` for ``SFTTrainer``) holding the
step the stock Trainer path runs (SGD lr 1, per-device batch B/k, k accumulation steps) plus the
user's ``--trainer-arg``. The update is read exactly by ``paths.probe.UpdateProbe`` and returned as the
stock Trainer path's ``StepResult``. The class's
collator pads its own way (TRL: right, or one flattened row when padding-free).

Trainers whose objective is not a token mean of cross entropy are refused (exit 2), except those
that declare the objective they compute (``DECLARED``: DPO's pair mean, ``stacks/dpo.py``), and GRPO's
(``GRPOTrainer``: judged per optimizer step against its loss type's declaration, ``paths/grpo.py``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from functools import lru_cache

import torch

from ..models.compat import AUDIT_OWNED, installed_name
from ..core.errors import first_line, UsageError
from ..core.layouts import Layout
from ..core.registry import load_callable
from . import EXTRAS, dpo, require
from .frameworks import arguments_class, framework_of  # noqa: F401  (found from the class itself)

# Trainer classes (by name, anywhere in the class's MRO) whose loss is not a token mean
OTHER_OBJECTIVES = {
    "DPOTrainer": "a preference loss over chosen/rejected pairs (DPO)",
    "OnlineDPOTrainer": "an online preference loss (online DPO)",
    "CPOTrainer": "a contrastive preference loss (CPO)",
    "ORPOTrainer": "an odds-ratio preference loss (ORPO)",
    "KTOTrainer": "a prospect-theoretic preference loss (KTO)",
    "BCOTrainer": "a binary-classifier preference loss (BCO)",
    "NashMDTrainer": "a Nash mirror-descent preference objective",
    "XPOTrainer": "an exploratory preference objective (XPO)",
    "RLOOTrainer": "a REINFORCE leave-one-out reward objective (RLOO)",
    "PPOTrainer": "a PPO reward objective",
    "RewardTrainer": "a pairwise ranking loss of a reward model",
    "PRMTrainer": "a process-reward classification loss",
    "GKDTrainer": "a generalized distillation divergence (GKD)",
}
# Trainer classes audited against the objective they declare (issue 22): name (anywhere in the
# class's MRO) -> the Aggregation it computes under the user's --trainer-arg values
DECLARED = {dpo.TRAINER: dpo.declared_aggregation}
# what the audit sets besides the stock Trainer path's settings, unless --trainer-arg says otherwise
# (TRL's configs default to bf16 autocast and gradient checkpointing)
CLASS_DEFAULTS = {"bf16": False, "fp16": False, "gradient_checkpointing": False}


def resolve_trainer_class(spec) -> type:
    """The user's ``MODULE:CLASS`` (or the class itself): a Trainer subclass whose objective is
    a token mean."""
    from transformers import Trainer

    if isinstance(spec, str):
        package = spec.partition(":")[0].split(".")[0]
        if package in EXTRAS:
            require(package, f"--trainer-class {spec}")
        cls = load_callable(spec, "trainer class")
    else:
        cls, spec = spec, getattr(spec, "__qualname__", repr(spec))
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise UsageError(f"--trainer-class {spec}: not a subclass of transformers.Trainer")
    for base in cls.__mro__:
        if base.__name__ in DECLARED:  # audited against the objective it declares (declared_aggregation)
            break
        if base.__name__ in OTHER_OBJECTIVES:
            raise UsageError(f"--trainer-class {spec}: {base.__name__} trains {OTHER_OBJECTIVES[base.__name__]}, "
                             "not a token mean of cross entropy; lossaudit audits token-mean objectives only")
    return cls


def declared_aggregation(cls: type, user_args: dict):
    """The aggregation a trainer class declares (an ``Aggregation``), or None: a token mean."""
    for base in cls.__mro__:
        if base.__name__ in DECLARED:
            return DECLARED[base.__name__](user_args)
    return None


def arguments(cls: type, settings: dict, user: dict):
    """``arguments_class(cls)`` from the audit's settings (newest names, left out where the
    release lacks them), its framework's (``frameworks.Framework.settings``) and the user's values
    (taken as given; they win over CLASS_DEFAULTS)."""
    args_cls = arguments_class(cls)
    names = {f.name for f in dataclasses.fields(args_cls) if f.init}
    kwargs = {installed_name(k): v for k, v in settings.items() if installed_name(k)}
    kwargs.update({k: v for k, v in CLASS_DEFAULTS.items() if k in names and k not in user})
    kwargs.update({k: v for k, v in framework_of(cls).settings if k in names})  # ms-swift's: no shuffling
    try:
        return args_cls(**kwargs, **user)
    except (TypeError, ValueError) as exc:
        first = first_line(exc)
        raise UsageError(f"--trainer-arg: {args_cls.__name__} refused the values: {first}") from None


def check_arguments(cls: type, user: dict) -> None:
    """The user's --trainer-arg values, tried on the class's arguments class before any step;
    a setting the audit owns (learning rate, batch sizes, ...) is refused as for the stock Trainer."""
    framework = dict(framework_of(cls).settings)  # ms-swift's shuffling: the layout's order is the audit's
    owned = [f"--trainer-arg {key}: {AUDIT_OWNED[key]}" for key in user if key in AUDIT_OWNED]
    owned += [f"--trainer-arg {key}: set by the audit ({key}={framework[key]!r} for {cls.__name__})"
              for key in user if key in framework]
    if owned:
        raise UsageError(*owned)
    with tempfile.TemporaryDirectory(prefix="lossaudit-args-") as out:
        arguments(cls, {"output_dir": out, "use_cpu": True, "report_to": "none", "gradient_accumulation_steps": 1,
                        "dataloader_num_workers": 0}, user)


def tokenizer(vocab_size: int, pad_id: int, eos_id: int | None):
    """A word-level tokenizer over ids 0..vocab_size-1 (token ``<i>`` is id i), built offline:
    what a class that insists on a ``processing_class`` gets. Its pad token is the batch's."""
    return _tokenizer(vocab_size, pad_id, pad_id if eos_id is None else eos_id)


@lru_cache(maxsize=8)
def _tokenizer(vocab_size: int, pad_id: int, eos_id: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"<{pad_id}>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # text rows (DPO's): "<5> <9>" is [5, 9]
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=f"<{pad_id}>", eos_token=f"<{eos_id}>",
                                   unk_token=f"<{pad_id}>")


def rows(ctx, layout: Layout, *, completion_mask: bool = False, labels: bool = False, rank: int = 0) -> list[dict]:
    """The layout's sequences, in order, as pre-tokenized dataset rows: ``input_ids`` alone where
    the batch scores every token (the class's collator copies them to labels, as every TRL
    release does) unless ``labels`` (a collator that pads labels and makes none), else with the
    audit's ``labels``, or with ``completion_mask`` (1 where the audit scores a token) so that
    the class's own completion-only masking builds the labels."""
    samples = [ctx.batch.samples[i] for group in layout.rank_groups(rank) for i in group]
    plain = not labels and all(torch.equal(s.labels[1:], s.input_ids[1:]) for s in samples)  # position 0 is never scored
    out = []
    for sample in samples:
        targets = sample.labels.tolist()
        row = {"input_ids": sample.input_ids.tolist()}
        if completion_mask:
            row["completion_mask"] = [int(x != -100) for x in targets]
        elif not plain:
            row["labels"] = targets
        out.append(row)
    return out
