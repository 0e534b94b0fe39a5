"""What a ``transformers.Trainer`` subclass takes (``--trainer-class``): its arguments class and
the data collator its own builder would give it, found from the class itself.

The arguments class, in order:
0. the annotation of the ``args`` attribute on the class or a base below ``Trainer`` (ms-swift's
   ``Seq2SeqTrainer``: ``args: Seq2SeqTrainingArguments``, the class's own statement of what it reads);
1. the annotation of ``args`` on the first ``__init__`` in the class's MRO below
   ``transformers.Trainer`` that names one (TRL's ``SFTTrainer``: ``SFTConfig | TrainingArguments``,
   the most derived wins); an ``__init__`` that passes ``*args``/``**kwargs`` on is looked through;
2. a small table of frameworks whose trainers take their arguments through ``**kwargs``
   (axolotl: ``AxolotlTrainingArguments``, which its builder gives every trainer);
3. the one ``TrainingArguments`` subclass the class's module holds;
4. ``TrainingArguments`` for a plain subclass (no ``__init__`` of its own between it and Trainer,
   or only ones that pass everything on, and no framework's module around it).
An ``__init__`` that takes no ``args`` at all, or a module with several candidates and no
annotation, cannot be told: one UsageError naming the class (exit 2), not an error per case.

The collator: a class that builds its own (TRL's trainers) gets none; a framework whose builder
hands one in gets the same one (axolotl: its ``DataCollatorForSeq2Seq``, padding labels with
-100); ms-swift's trainers build theirs from the ``Template`` the audit gives them (``stacks/swift.py``);
any other class gets ``transformers.DataCollatorForSeq2Seq`` padding labels with -100,
what a stock Trainer user passes for pre-tokenized rows with masked prompts (the Trainer's own
default, ``DataCollatorWithPadding``, does not pad labels: "Unable to create tensor").
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import typing
from functools import lru_cache

from ..core.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Framework:
    """A framework whose trainers lossaudit knows how to feed."""

    package: str  # top-level module name
    arguments: str | None  # MODULE:CLASS of its arguments class (None: from the class's annotation)
    collator: str | None  # MODULE:CLASS of the collator its builder gives (None: the class builds its own)
    # what the audit builds for the framework's trainers beyond the Trainer's own arguments: the
    # parameter names it gives, and MODULE:CLASS of the lossaudit class building them (``inputs``)
    gives: tuple[str, ...] = ()
    inputs: str | None = None
    labels: bool = False  # its collator takes labels and makes none: rows always carry them
    settings: tuple[tuple[str, object], ...] = ()  # arguments the audit owns for its trainers


KNOWN = {
    "trl": Framework("trl", None, None),
    "axolotl": Framework("axolotl", "axolotl.core.training_args:AxolotlTrainingArguments",
                         "axolotl.utils.collators:DataCollatorForSeq2Seq"),
    # ms-swift: its trainers take the Template ``swift sft`` builds for the model and collate with it
    # (stacks/swift.py); its own dataloader shuffles unless told not to (the layout's order is the
    # audit's); check_model would ask the hub about the model folder
    "swift": Framework("swift", None, None, gives=("template",), inputs="lossaudit.stacks.swift:SwiftInputs",
                       labels=True, settings=(("train_dataloader_shuffle", False), ("check_model", False))),
}
PLAIN = Framework("transformers", "transformers:TrainingArguments", "transformers:DataCollatorForSeq2Seq")


def load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def framework_of(cls: type) -> Framework:
    """The known framework that ``cls`` (or a base below Trainer) comes from, else PLAIN."""
    for base in _below_trainer(cls):
        found = KNOWN.get(base.__module__.split(".")[0])
        if found is not None:
            return found
    return PLAIN


def _below_trainer(cls: type) -> list[type]:
    """``cls``'s MRO before ``Trainer``: its Trainer subclasses and the mixins between them (ms-swift's
    ``SwiftMixin``, which is no Trainer, takes ``args`` and requires ``template``)."""
    from transformers import Trainer

    mro = cls.__mro__
    return list(mro[:mro.index(Trainer)]) if Trainer in mro else []


def _is_arguments(x) -> bool:
    from transformers import TrainingArguments

    return isinstance(x, type) and issubclass(x, TrainingArguments)


def _annotated(init) -> list[type]:
    """The TrainingArguments classes named by ``init``'s annotation of ``args`` (resolved even
    when the annotation is a string naming what the function's module imports)."""
    try:
        hint = typing.get_type_hints(init).get("args")
    except Exception:  # names only imported under TYPE_CHECKING, or not at all
        hint = inspect.signature(init).parameters["args"].annotation
    if isinstance(hint, str):
        space = {**vars(sys.modules.get(init.__module__, object)), **getattr(init, "__globals__", {})}
        found = []
        for dotted in re.findall(r"[A-Za-z_][\w.]*", hint):
            head, *rest = dotted.split(".")
            value = space.get(head)
            for part in rest:
                value = getattr(value, part, None)
            found.append(value)
        return [x for x in found if _is_arguments(x)]
    args = typing.get_args(hint) or (hint,)
    return [x for x in args if _is_arguments(x)]


def _most_derived(classes: list[type]) -> type:
    return next(c for c in classes if not any(o is not c and issubclass(o, c) for o in classes))


def _from_module(cls: type) -> list[type]:
    module = sys.modules.get(cls.__module__)
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    stock = (TrainingArguments, Seq2SeqTrainingArguments)
    found = {id(v): v for v in vars(module).values() if _is_arguments(v) and v not in stock} if module else {}
    return list(found.values())


def _cannot_tell(cls: type, why: str) -> UsageError:
    name = f"{cls.__module__}:{cls.__qualname__}"
    known = ", ".join(sorted(KNOWN))
    return UsageError(f"--trainer-class {name}: cannot tell its arguments class ({why}; its package is not one "
                      f"lossaudit knows: {known}); annotate its __init__'s args with its arguments class")


@lru_cache(maxsize=None)
def arguments_class(cls: type) -> type:
    """The arguments class ``cls`` is built with (module docstring: annotation, table, module,
    TrainingArguments), or UsageError when it cannot be told."""
    from transformers import TrainingArguments

    for base in _below_trainer(cls):
        try:
            stated = inspect.get_annotations(base, eval_str=True).get("args")
        except Exception:  # a name only imported under TYPE_CHECKING
            stated = None
        if _is_arguments(stated):
            return stated
    for base in _below_trainer(cls):
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if "args" in params:
            named = _annotated(init)
            if named:
                return _most_derived(named)
            continue
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            raise _cannot_tell(cls, f"{base.__qualname__}.__init__ takes no args")
    framework = framework_of(cls)
    if framework is not PLAIN:
        if framework.arguments is not None:
            return load(framework.arguments)
        return TrainingArguments
    found = _from_module(cls)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        raise _cannot_tell(cls, f"its __init__ does not annotate args and its module holds {names}")
    return TrainingArguments


# what the audit gives a trainer class's __init__ (paths/trainer_class.py)
GIVEN = ("model", "args", "train_dataset", "data_collator", "processing_class", "tokenizer", "optimizers")


def required_problem(cls: type) -> str | None:
    """A required ``__init__`` parameter the audit cannot give (LlamaFactory's trainers take
    ``finetuning_args``), as one line; None when every required one is given (by the audit, or by
    what it builds for the class's framework: ms-swift's ``template``)."""
    given = GIVEN + framework_of(cls).gives
    for base in _below_trainer(cls):
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        needed = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                  and p.name not in given]
        if needed:
            return (f"--trainer-class {cls.__module__}:{cls.__qualname__}: {base.__qualname__}.__init__ requires "
                    f"{', '.join(needed)}, which lossaudit cannot give (it gives {', '.join(given)})")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return None  # this __init__ decides what reaches the ones above it
    return None


def collator(cls: type, tokenizer):
    """The data collator ``cls``'s own builder would give it for pre-tokenized rows (None: the
    class builds its own)."""
    framework = framework_of(cls)
    if framework.collator is None:
        return None
    made = load(framework.collator)
    return made(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def pads_labels(cls: type) -> bool:
    """Whether the collator ``cls`` gets (its own or its builder's) pads a ``labels`` column.
    TRL's trainers before its own collator (0.13 .. 0.18: transformers'
    DataCollatorForLanguageModeling, which copies input_ids into labels) do not."""
    if framework_of(cls).collator is not None:
        return True
    for base in _below_trainer(cls):
        used = getattr(sys.modules.get(base.__module__), "DataCollatorForLanguageModeling", None)
        if used is not None:
            return not used.__module__.startswith("transformers")
    return True


def rows_problem(cls: type, prompt_masking: bool) -> str | None:
    """Why ``cls`` cannot take the audit's rows (prompt-masked labels it cannot pad), naming the
    option that fits; None when it can."""
    if not prompt_masking or pads_labels(cls):
        return None
    package = cls.__module__.split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", "?")
    return (f"--trainer-class {cls.__qualname__}: {package} {version}'s collator copies input_ids into labels and "
            f"cannot pad prompt-masked labels; pass --no-prompt-masking (rows of input_ids alone, every token scored)")
