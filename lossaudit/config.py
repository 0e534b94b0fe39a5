"""The settings of one audit: a frozen dataclass, validated up front, every problem at once.

Precedence: CLI flags (or keyword arguments of ``lossaudit.check``) over these defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

from .batch import BatchSpec
from .errors import UsageError
from .layouts import GROUPINGS, PADDINGS
from .objective import Objective, objective_problems
from .reductions import DEFAULT_REDUCTIONS
from .tokens import TASKS

DTYPES = ("float32", "float64", "bfloat16", "float16")
DEFAULT_MICROBATCHES = (1, 2, 4, 8)


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True, slots=True)
class CheckConfig:
    model: str = _help("model_type, save_pretrained directory, or cached hub id", "")
    task: str | None = _help("causal-lm, seq2seq, token-classification, sequence-classification")
    paths: tuple[str, ...] | None = _help("paths to audit (default: every path that applies)")
    microbatches: tuple[int, ...] | None = _help("values of k (default 1,2,4,8 capped by the batch size)")
    reductions: tuple[str, ...] = _help("reductions for the reduction path", DEFAULT_REDUCTIONS)
    paddings: tuple[str, ...] = _help("padding sides", PADDINGS)
    groupings: tuple[str, ...] = _help("how sequences are grouped into microbatches", GROUPINGS)
    world_size: int = _help("data-parallel ranks", 1)
    batch_size: int = _help("sequences per optimizer step", 8)
    max_length: int = _help("longest sequence, in tokens", 32)
    min_length: int = _help("shortest sequence, in tokens", 4)
    prompt_masking: bool = _help("mask a prompt prefix on every other sequence", True)
    empty_sequences: int = _help("sequences with no target token at all", 0)
    seed: int = _help("seed for the model weights and the batch", 0)
    device: str = _help("torch device", "cpu")
    dtype: str = _help("model dtype", "float32")
    trainer_args: tuple[tuple[str, str], ...] = _help("KEY=VALUE for TrainingArguments", ())
    config_args: tuple[tuple[str, str], ...] = _help("KEY=VALUE for the model config", ())
    loss_fn: str | None = _help("module:function with compute_loss_func's signature (outputs, labels, num_items_in_batch)")
    # the user's own training stack (issue 15): MODULE:NAME strings, or the objects themselves from Python
    step: object = _help("MODULE:FUNCTION(model, microbatches): your training step, for --path step")
    lightning_module: object = _help("MODULE:FACTORY(model) -> your LightningModule, for --path lightning")
    trainer_class: object = _help("MODULE:CLASS: a transformers.Trainer subclass for --path trainer (trl:SFTTrainer)")
    adapter: str | None = _help("a PEFT adapter folder (save_pretrained) to audit on MODEL")
    peft: str | None = _help("a fresh PEFT adapter of this method on MODEL: lora, prompt_tuning, ...")
    peft_args: tuple[tuple[str, str], ...] = _help("KEY=VALUE for the --peft method's config", ())
    allow_pickle: bool = _help("allow pickle checkpoints (loaded with weights_only=True)", False)
    trust_remote_code: bool = _help("run code shipped with a model directory", False)
    allow_download: bool = _help("download a hub id that is not in the local cache", False)
    num_layers: int | None = _help("layers to keep (cuts a checkpoint's depth for a fast audit)")

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise UsageError(*problems)

    def problems(self) -> list[str]:
        p = []
        if not self.model:
            p.append("no MODEL given")
        if self.task is not None and self.task not in TASKS:
            p.append(f"unknown --task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.batch_size < 1:
            p.append("--batch-size must be at least 1")
        ranks = max(self.world_size, 1)
        for k in self.microbatches or ():
            if k < 1 or k * ranks > self.batch_size:
                most = f"the batch size over --world-size ({self.batch_size // ranks})" if ranks > 1 else \
                    f"the batch size ({self.batch_size})"
                p.append(f"--microbatches {k}: must be between 1 and {most}")
        if self.num_layers is not None and self.num_layers < 1:
            p.append("--num-layers must be at least 1")
        if self.world_size < 1:
            p.append("--world-size must be at least 1")
        elif self.world_size > self.batch_size:
            p.append(f"--world-size {self.world_size}: more ranks than sequences in the batch ({self.batch_size})")
        if self.min_length < 2 or self.max_length < self.min_length:
            p.append("need 2 <= --min-length <= --max-length")
        if not 0 <= self.empty_sequences < self.batch_size:
            p.append("--empty-sequences must leave at least one sequence with targets")
        if self.dtype not in DTYPES:
            p.append(f"unknown --dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            p.append(f"unknown --device {self.device!r}; use cpu, cuda, cuda:N or mps")
        p += _registry_problems(self)
        p += objective_problems(self.trainer_args)
        if self.trainer_args and not self.trainer_class:  # a trainer class's own arguments class checks them
            from .compat import trainer_arg_problems

            p += trainer_arg_problems([k for k, _ in self.trainer_args])
        p += _stack_problems(self)
        p += [f"unknown padding {x!r}" for x in self.paddings if x not in PADDINGS]
        p += [f"unknown grouping {x!r}" for x in self.groupings if x not in GROUPINGS]
        return p

    @property
    def ks(self) -> tuple[int, ...]:
        if self.microbatches is not None:
            return self.microbatches
        return tuple(k for k in DEFAULT_MICROBATCHES if k * self.world_size <= self.batch_size)

    @property
    def objective(self) -> Objective:
        """What every path is judged against per token (label smoothing from --trainer-arg)."""
        return Objective.from_trainer_args(self.trainer_args) if not objective_problems(self.trainer_args) else Objective()

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec(self.batch_size, self.max_length, self.min_length, self.prompt_masking,
                         self.empty_sequences, self.seed)

    def with_(self, **changes) -> "CheckConfig":
        return replace(self, **changes)


def _registry_problems(config: "CheckConfig") -> list[str]:
    from .paths import PATHS
    from .reductions import resolve_reduction

    problems = [PATHS.unknown(name) for name in config.paths or () if name not in PATHS]
    for name in config.paths or ():
        reason = PATHS.get(name).unavailable(config) if name in PATHS else None
        if reason:
            problems.append(f"--path {name}: {reason}")
    if config.loss_fn:
        from .paths.loss_fn import resolve_loss_fn

        try:
            resolve_loss_fn(config.loss_fn)
        except UsageError as exc:
            problems.append(str(exc))
    for name in config.reductions:
        try:
            resolve_reduction(name)
        except UsageError as exc:
            problems.append(str(exc))
    return problems


def _stack_problems(config: "CheckConfig") -> list[str]:
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
    return p


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(CheckConfig)}


def parse_value(text: str):
    """A KEY=VALUE value as Python would read it: int, float, bool, None, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
