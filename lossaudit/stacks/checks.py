"""The user's stack options checked before any model is built, every problem at once (issue 26):
``--step``, ``--lightning-module`` and ``--trainer-class`` import and are what they must be (the
class's arguments class takes the ``--trainer-arg`` values, of the right types), ``--peft`` names
a method peft builds with the ``--peft-arg`` values, ``--adapter`` is a readable adapter folder
that names nothing beyond the download and pickle rules; an option whose path is not selected,
and combinations that can never run (a one-process path on several ranks), are refused.

``CheckConfig.problems`` calls ``stack_problems``; a missing optional package is an
EnvironmentProblem (exit 3, naming the pip command) and ends the checks.
"""

from __future__ import annotations

from typing import Callable

from ..core.errors import UsageError
from ..core.registry import load_callable
from ..core.tokens import TASKS
from . import require
from .grpo import grpo_problems, is_grpo
from .peft import peft_config, read_adapter
from .axolotl import checked as checked_axolotl
from .swift import checked as checked_swift
from .deepspeed import problems as zero_problems
from .frameworks import required_problem, rows_problem
from .trl import arguments_class, check_arguments, resolve_trainer_class

# (flag, config field, the path it drives); ONE_PROCESS: the flags whose path runs in one process only
PATH_OPTIONS = (("--step", "step", "step"), ("--trainer-class", "trainer_class", "trainer"),
                ("--lightning-module", "lightning_module", "lightning"), ("--axolotl-config", "axolotl_config", "trainer"),
                ("--swift-args", "swift_args", "trainer"))
ONE_PROCESS = ("--trainer-class", "--axolotl-config", "--swift-args")  # --step runs on ranks (stacks/ranks.py)
RANKED_PATHS = ("accelerate", "trainer", "lightning")  # step paths other than step that run on ranks
SHARDED_PATHS = ("step", "trainer", "accelerate")  # what --data-parallel fsdp2 runs (stacks/ranks.py, paths/fsdp2.py)


def stack_problems(config, value_problems: Callable[[tuple, type], list[str]]) -> list[str]:
    """Every problem of ``config``'s stack options; ``value_problems(pairs, args_cls)``: the
    --trainer-arg values an arguments class refuses by type (config.py reads them)."""
    problems = []
    for flag, name, path in PATH_OPTIONS:
        value = getattr(config, name)
        if not value:
            continue
        if config.paths is not None and path not in config.paths:
            problems.append(f"{flag}: drives --path {path}, which is not selected (--path {','.join(config.paths)}): "
                            f"add --path {path}")
        if flag in ONE_PROCESS and isinstance(config.world_size, int) and config.world_size > 1:
            problems.append(f"{flag}: runs in one process; --world-size {config.world_size} cannot run it")
    problems += _data_parallel(config) + zero_problems(config)
    problems += _loadable(config, value_problems)
    problems += _adapter(config)
    return problems


def _data_parallel(config) -> list[str]:
    """``--data-parallel fsdp2`` shards the model on several ranks: a user's step (``--path step``),
    the Trainer's own FSDP2 (``--path trainer``; --trainer-class and --axolotl-config run in one
    process) and accelerate's FSDP2 plugin (``--path accelerate``); Lightning runs DDP only."""
    if getattr(config, "data_parallel", "ddp") != "fsdp2":
        return []
    problems = []
    if not (isinstance(config.world_size, int) and config.world_size > 1):
        problems.append("--data-parallel fsdp2: shards over ranks; give --world-size 2 or more")
    others = [p for p in RANKED_PATHS if p not in SHARDED_PATHS]
    others = others if config.paths is None else [p for p in config.paths if p in others]
    if others:
        problems.append(f"--data-parallel fsdp2: only --path {','.join(SHARDED_PATHS)} run under FSDP2 so far, "
                        f"not --path {','.join(others)}{' (selected by default)' if config.paths is None else ''}: "
                        f"select --path {' or '.join(SHARDED_PATHS)}")
    return problems


def _loadable(config, value_problems) -> list[str]:
    problems = []
    for flag, spec, kind in (("--step", config.step, "step function"),
                             ("--lightning-module", config.lightning_module, "Lightning module factory")):
        if isinstance(spec, str) and spec.count(":") == 1:
            if flag == "--lightning-module":
                require("lightning", flag)
            problems += _problems(load_callable, spec, kind)
    if config.trainer_class and (not isinstance(config.trainer_class, str) or config.trainer_class.count(":") == 1):
        require("accelerate", "--trainer-class")  # the trainer path's (transformers.Trainer imports it)
        problems += _trainer_class_problems(config, value_problems)
    if config.axolotl_config:
        problems += _problems(checked_axolotl, config)
    if config.swift_args:
        problems += _problems(checked_swift, config)
    if config.peft:
        task = config.task if config.task in TASKS else TASKS[0]  # the model's, when known, is tried again later
        problems += _problems(peft_config, config.peft, config.peft_values, task)
    return problems


def _trainer_class_problems(config, value_problems) -> list[str]:
    try:
        cls = resolve_trainer_class(config.trainer_class)
        args_cls = arguments_class(cls)  # found from the class itself, or one line (stacks/frameworks.py)
    except UsageError as exc:
        return exc.problems
    problem = required_problem(cls) or rows_problem(cls, config.prompt_masking)
    if problem:
        return [problem]
    user = config.trainer_values
    problems = value_problems(config.trainer_args, args_cls)
    if not problems and is_grpo(cls):  # what a GRPO audit refuses (stacks/grpo.py)
        problems = grpo_problems(user, config.aggregation)
    return problems or _problems(check_arguments, cls, user)


def _adapter(config) -> list[str]:
    if not config.adapter or not isinstance(config.adapter, str) or not config.adapter.strip():
        return []
    return _problems(read_adapter, config.adapter, allow_download=config.allow_download,
                     allow_pickle=config.allow_pickle)


def _problems(fn, *args, **kwargs) -> list[str]:
    try:
        fn(*args, **kwargs)
    except UsageError as exc:
        return exc.problems
    return []
