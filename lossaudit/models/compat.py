"""What differs between transformers releases (4.40 to the newest), in one place.

``TrainingArguments`` renamed fields (``no_cuda`` -> ``use_cpu``, ``evaluation_strategy`` ->
``eval_strategy``) and grew new ones (``average_tokens_across_devices``); ``Trainer`` grew
``compute_loss_func`` and renamed ``tokenizer`` to ``processing_class``. Callers name a setting
once, by its newest name, and this module passes what the installed release takes.
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache

from packaging.version import Version

from ..core.registry import did_you_mean

# The first release whose Trainer passes num_items_in_batch to the loss (the Oct-2024 fix).
GA_FIX_RELEASE = "4.46.0"

# Releases after the fix whose Trainer, measured by lossaudit, passes no num_items_in_batch and
# no longer divides by k either: each step is k times the token mean (see tox.ini, README).
KFOLD_RELEASES = ("4.47.0", "4.48.0")

# Releases whose Trainer counts num_items_in_batch over the unshifted labels: 4.46.2 dropped
# 4.46.0's ``labels[..., 1:]`` (for seq2seq), 5.10.1 shifts again for causal LMs
# (``Trainer._loss_shifts_labels``). A collator's row, whose first token is a label the shift
# drops, is counted once too often: the step is N / (N + such rows) of the token mean at every
# k (measured, tox.ini). [first affected, first fixed)
UNSHIFTED_COUNT_RELEASES = ("4.46.2", "5.10.1")

# The first release whose Trainer scales a label-smoothed loss for accumulation (measured:
# 4.46.0 to 5.14.0 give k times the token mean with label_smoothing_factor > 0 and k > 1).
LABEL_SMOOTHING_GA_FIX_RELEASE = "5.15.0"

# One setting, the names releases gave it, newest first.
ALIASES = {
    "use_cpu": ("use_cpu", "no_cuda"),
    "eval_strategy": ("eval_strategy", "evaluation_strategy"),
}

_STEP = "set by the audit so that the update of one SGD step equals the gradient"
_LAYOUT = "set per layout from --batch-size and --microbatches"
# TrainingArguments a user may not override: they would change the update under audit.
AUDIT_OWNED = {
    "output_dir": "set by the audit (a temporary directory)",
    "per_device_train_batch_size": _LAYOUT,
    "gradient_accumulation_steps": _LAYOUT,
    "group_by_length": "the layout decides the order of sequences; use --groupings",
    "auto_find_batch_size": _LAYOUT,
    "max_steps": _STEP,
    "num_train_epochs": _STEP,
    "learning_rate": _STEP,
    "lr_scheduler_type": _STEP,
    "lr_scheduler_kwargs": _STEP,
    "warmup_steps": _STEP,
    "warmup_ratio": _STEP,
    "weight_decay": _STEP,
    "max_grad_norm": _STEP,
    "optim": _STEP,
    "optim_args": _STEP,
    "fsdp": "set by the audit: use --data-parallel fsdp2 (the Trainer's FSDP2 on --world-size N)",
    "fsdp_config": "set by the audit: use --data-parallel fsdp2 (the Trainer's FSDP2 on --world-size N)",
    # on N ranks only a logging step gathers the loss over ranks; the audit logs at its one step
    "logging_strategy": "set by the audit: the logged loss is read at the audited step",
    "logging_steps": "set by the audit: the logged loss is read at the audited step",
}


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def release_has_ga_fix(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) is at or after the Oct-2024 fix."""
    return _at_least(version or transformers_version(), GA_FIX_RELEASE)


def trainer_accumulates_right(version: str | None = None) -> bool:
    """Whether the stock Trainer's accumulated step is the token mean on ``version``, as measured."""
    version = version or transformers_version()
    return release_has_ga_fix(version) and version not in KFOLD_RELEASES


def trainer_counts_unshifted(version: str | None = None) -> bool:
    """Whether the Trainer's num_items_in_batch counts a causal LM's first labels (measured)."""
    version = version or transformers_version()
    first, fixed = UNSHIFTED_COUNT_RELEASES
    # the k-fold releases pass no num_items_in_batch at all: their count is never used
    return _at_least(version, first) and not _at_least(version, fixed) and version not in KFOLD_RELEASES


def label_smoothing_accumulates_right(version: str | None = None) -> bool:
    """Whether the Trainer's label-smoothed accumulated step is the token mean (measured)."""
    version = version or transformers_version()
    return trainer_accumulates_right(version) and _at_least(version, LABEL_SMOOTHING_GA_FIX_RELEASE)


def _at_least(version: str, release: str) -> bool:
    return Version(version).release >= Version(release).release


@lru_cache(maxsize=None)
def training_argument_names() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


@lru_cache(maxsize=None)
def trainer_parameters() -> frozenset[str]:
    from transformers import Trainer

    return frozenset(inspect.signature(Trainer.__init__).parameters)


def trainer_takes(name: str) -> bool:
    """Whether the installed ``Trainer(...)`` takes keyword ``name`` (e.g. compute_loss_func)."""
    return name in trainer_parameters()


def installed_name(setting: str) -> str | None:
    """The installed release's name for ``setting`` (a newest name), or None if it has none."""
    names = training_argument_names()
    return next((n for n in ALIASES.get(setting, (setting,)) if n in names), None)


def trainer_arg_problems(keys: list[str]) -> list[str]:
    """One line per --trainer-arg key that the installed release or the audit cannot take."""
    names = training_argument_names()
    problems = []
    for key in keys:
        if key in AUDIT_OWNED:
            problems.append(f"--trainer-arg {key}: {AUDIT_OWNED[key]}")
        elif key not in names:
            problems.append(
                f"--trainer-arg {key}: TrainingArguments of transformers {transformers_version()} "
                f"has no such field{did_you_mean(key, sorted(names))}"
            )
    return problems


def training_arguments(settings: dict, user: dict):
    """``TrainingArguments`` from the audit's ``settings`` (newest names; a setting the installed
    release does not have is left out) and the user's ``user`` arguments (taken as given)."""
    from transformers import TrainingArguments

    kwargs = {}
    for setting, value in settings.items():
        name = installed_name(setting)
        if name is not None:
            kwargs[name] = value
    return TrainingArguments(**kwargs, **user)
