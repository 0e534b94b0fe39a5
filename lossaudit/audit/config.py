"""The settings of one audit: a frozen dataclass of parsed values, validated up front, every
problem at once.

Its fields are the option table of ``lossaudit.audit.options`` (declared there once, with help and
defaults); the command line and the pytest plugin are generated from the same table.
Precedence: CLI flags (or keyword arguments of ``lossaudit.check``) over these defaults.
Which paths apply and whether they can run is decided when the audit is planned, not here.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field, fields, make_dataclass, replace

from ..core.batch import BatchSpec
from ..models.compat import AUDIT_OWNED, trainer_arg_problems as unknown_trainer_args
from ..core.errors import UsageError
from ..core.layouts import GROUPINGS, PADDINGS
from ..core.objective import Objective, objective_problems
from .options import BY_NAME, DTYPES, OPTIONS, parse_value
from ..core.reductions import DEFAULT_REDUCTIONS, resolve_reduction
from ..core.registry import load_callable
from ..core.tokens import TASKS
from ..stacks.checks import stack_problems

DEFAULT_MICROBATCHES = (1, 2, 4, 8)
DEFAULT_SELECTIONS = {"reductions": DEFAULT_REDUCTIONS, "paddings": PADDINGS, "groupings": GROUPINGS}

# TrainingArguments the Trainer path sets for every step (lossaudit/paths/trainer_step.py), by
# every name a release has used; a user's value would clash with the audit's own.
_SET = "set by the audit for every Trainer step"
AUDIT_SETS = {
    **AUDIT_OWNED,
    **dict.fromkeys(("seed", "use_cpu", "no_cuda", "report_to", "save_strategy", "eval_strategy",
                     "evaluation_strategy", "disable_tqdm", "remove_unused_columns", "dataloader_num_workers",
                     "dataloader_pin_memory", "dataloader_drop_last"), _SET),
}


class _Config:
    """Methods of CheckConfig (its fields come from the option table)."""

    __slots__ = ()

    def __post_init__(self):
        for name, default in DEFAULT_SELECTIONS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        problems = self.problems()
        if problems:
            raise UsageError(*problems)
        object.__setattr__(self, "objective", Objective.from_trainer_args(self.trainer_args, self.aggregation))

    def problems(self) -> list[str]:
        p, bad = _table_problems(self)
        ok = lambda *names: not bad & set(names)  # noqa: E731  (checks of values of the right kind only)
        if self.task is not None and self.task not in TASKS:
            p.append(f"unknown --task {self.task!r}; choose from {', '.join(TASKS)}")
        if ok("microbatches", "batch_size"):
            ranks = self.world_size if ok("world_size") else 1
            for k in self.microbatches or ():
                if not isinstance(k, int) or k < 1 or k * ranks > self.batch_size:
                    most = f"the batch size over --world-size ({self.batch_size // ranks})" if ranks > 1 else \
                        f"the batch size ({self.batch_size})"
                    p.append(f"--microbatches {k}: must be between 1 and {most}")
        if ok("world_size", "batch_size") and self.world_size > self.batch_size:
            p.append(f"--world-size {self.world_size}: more ranks than sequences in the batch ({self.batch_size})")
        if ok("max_length", "min_length") and self.max_length < self.min_length:
            p.append("need 2 <= --min-length <= --max-length")
        if ok("prompt_masking", "every_prompt") and self.every_prompt and not self.prompt_masking:
            p.append("--mask-every-prompt and --no-prompt-masking contradict each other: choose one")
        if ok("empty_sequences", "batch_size") and self.empty_sequences >= self.batch_size:
            p.append("--empty-sequences must leave at least one sequence with targets")
        if self.dtype not in DTYPES:
            p.append(f"unknown --dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            p.append(f"unknown --device {self.device!r}; use cpu, cuda, cuda:N or mps")
        if ok("loss_fn", "reductions"):
            p += _code_problems(self)
        if ok("trainer_args"):
            p += objective_problems(self.trainer_args)
            if not self.trainer_class:  # a trainer class's own arguments class checks them (stacks/trl.py)
                p += trainer_arg_problems(self.trainer_args)
        p += _stack_problems(self)
        if ok("aggregation"):
            p += _aggregation_problems(self)
        if ok("paddings"):
            p += [f"unknown padding {x!r}; choose from {', '.join(PADDINGS)}" for x in self.paddings
                  if x not in PADDINGS]
        if ok("groupings"):
            p += [f"unknown grouping {x!r}; choose from {', '.join(GROUPINGS)}" for x in self.groupings
                  if x not in GROUPINGS]
        return p

    @property
    def ks(self) -> tuple[int, ...]:
        if self.microbatches is not None:
            return self.microbatches
        return tuple(k for k in DEFAULT_MICROBATCHES if k * self.world_size <= self.batch_size)

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec(self.batch_size, self.max_length, self.min_length, self.prompt_masking,
                         self.empty_sequences, self.seed, self.every_prompt)

    @property
    def trainer_values(self) -> dict:
        """--trainer-arg as TrainingArguments takes them (values read by ``parse_value``)."""
        return {k: parse_value(v) for k, v in self.trainer_args}

    @property
    def peft_values(self) -> dict:
        """--peft-arg as the --peft method's config takes them."""
        return {k: parse_value(v) for k, v in self.peft_args}

    @property
    def config_values(self) -> dict:
        """--config-arg as the model config takes them."""
        return {k: parse_value(v) for k, v in self.config_args}

    def with_(self, **changes) -> "CheckConfig":
        return replace(self, **changes)


def _field(option):
    return (option.name, option.type, field(default=option.default, metadata={"help": option.help, "option": option}))


CheckConfig = make_dataclass(
    "CheckConfig",
    [*(_field(o) for o in OPTIONS),
     # what every path is judged against per token: label smoothing from --trainer-arg, read once
     ("objective", "Objective", field(init=False, default=Objective(), compare=False))],
    bases=(_Config,), frozen=True, slots=True,
)
CheckConfig.__doc__ = "The settings of one audit (see lossaudit.audit.options for each field)."
CheckConfig.__module__ = __name__  # pickled to data-parallel ranks by name


def config_from(model: str | None = None, **values) -> "CheckConfig":
    """A CheckConfig from Python values (the API's keywords, a pytest marker's): unknown keys,
    values of the wrong kind and bad values are one UsageError, all problems at once."""
    if model is not None:
        values["model"] = model
    if "path" in values:
        values["paths"] = values.pop("path")
    if "objective" in values:  # the --objective flag's name (its field is aggregation: objective is derived)
        values["aggregation"] = values.pop("objective")
    problems, coerced = [], {}
    for key, value in values.items():
        option = BY_NAME.get(key)
        if option is None:
            problems.append(f"unknown option {key!r}; choose from {', '.join(BY_NAME)}")
            continue
        try:
            coerced[key] = option.coerce(value)
        except (ValueError, TypeError, IndexError) as exc:
            problems.append(f"{option.cli}: {exc}")
    if problems:
        raise UsageError(*problems)
    return CheckConfig(**coerced)


def _table_problems(config) -> tuple[list[str], set[str]]:
    """The option table's own checks: the problems, and the fields that have one."""
    problems, bad = [], set()
    for option in OPTIONS:
        value = getattr(config, option.name)
        problem = option.check(value) if option.check and value is not None else None
        if problem:
            problems.append(f"{option.cli}: {problem}" if option.flag else "no MODEL given")
            bad.add(option.name)
    return problems, bad


def _stack_problems(config) -> list[str]:
    """The user's stack options (issue 15): what can be told before any model is built."""
    p = []
    if config.adapter and config.peft:
        p.append("--adapter and --peft: give one (an adapter folder, or a fresh adapter of a method)")
    if config.peft_args and not config.peft:
        p.append("--peft-arg: only with --peft METHOD")
    for flag, value in (("--step", config.step), ("--lightning-module", config.lightning_module),
                        ("--trainer-class", config.trainer_class)):
        if isinstance(value, str) and value.count(":") != 1:
            p.append(f"{flag} {value!r}: expected MODULE:NAME")
    return p + stack_problems(config, _trainer_value_problems)


def _aggregation_problems(config) -> list[str]:
    """What --objective can be audited with, told before any model is built."""
    a = config.aggregation
    if a is None or not a.pairwise:
        return []
    p = []
    if not (config.step or config.trainer_class):
        p.append(f"--objective {a.spec}: a pair objective needs your pairwise step (--step MODULE:FUNCTION) "
                 "or a pairwise trainer (--trainer-class trl:DPOTrainer)")
    if config.world_size > 1:
        p.append(f"--objective {a.spec}: pairs are audited in one process (--world-size 1)")
    return p


def _code_problems(config) -> list[str]:
    """The user's code named by --loss-fn and --reductions imports and is callable."""
    problems = []
    specs = [(config.loss_fn, "loss function")] if config.loss_fn else []
    for spec, kind in specs:
        try:
            load_callable(spec, kind)
        except UsageError as exc:
            problems.append(str(exc))
    for name in config.reductions:
        try:
            resolve_reduction(name)
        except UsageError as exc:
            problems.append(str(exc))
    return problems


def trainer_arg_problems(pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """--trainer-arg keys the audit sets itself or the installed TrainingArguments lacks, and
    values of the wrong type (``bf16=banana``): found when the arguments are read."""
    if not pairs:
        return []
    owned = [key for key, _ in pairs if key in AUDIT_SETS]
    problems = [f"--trainer-arg {key}: {AUDIT_SETS[key]}" for key in owned]
    if owned:
        problems.append("the audit sets these TrainingArguments itself: " + ", ".join(sorted(AUDIT_SETS)))
    problems += unknown_trainer_args([key for key, _ in pairs if key not in AUDIT_SETS])
    return problems + _trainer_value_problems(pairs)


def _trainer_value_problems(pairs, args_cls: type | None = None) -> list[str]:
    """Values of the wrong type for ``args_cls`` (TrainingArguments, or a trainer class's own)."""
    from transformers import TrainingArguments

    args_cls = args_cls or TrainingArguments
    kinds = {f.name: f.type for f in dataclasses.fields(args_cls) if f.init}
    problems = []
    for key, text in pairs:
        if key not in kinds or key in AUDIT_SETS:
            continue
        allowed = _scalar_types(kinds[key])
        value = parse_value(text)
        if allowed is None or any(_fits(value, t) for t in allowed):
            continue
        names = " or ".join(sorted("None" if t is type(None) else t.__name__ for t in allowed))
        problems.append(f"--trainer-arg {key}={text}: {args_cls.__name__}.{key} takes {names}")
    return problems


def _scalar_types(annotation) -> set | None:
    """The scalar types a field admits, or None when it admits any string (or is not plain)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    scalars = {a for a in args if a in (bool, int, float, type(None))}
    if str in args or any(isinstance(a, type) and issubclass(a, str) for a in args) or not scalars:
        return None
    return scalars


def _fits(value, kind) -> bool:
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(CheckConfig) if f.init}
