"""The option table of an audit: every setting of ``CheckConfig`` declared once, with its flag,
help, default, how its text is parsed and what a value must satisfy.

``lossaudit.audit.config`` builds ``CheckConfig`` from this table; ``check``'s command line and the
pytest plugin's ``--lossaudit-...`` options are generated from it, and ``lossaudit.check``'s
keyword arguments are coerced by it. Imports nothing heavy: the pytest plugin loads it when
pytest starts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from ..core.aggregation import aggregation_check, parse_aggregation
from ..core.tasks import TASKS  # noqa: F401  (re-exported: the option table offers them)

DTYPES = ("float32", "float64", "bfloat16", "float16")
DATA_PARALLEL = ("ddp", "fsdp2", "zero1", "zero2", "zero3")  # how a step on --world-size N ranks wraps the model
SEED_LIMIT = 2**32  # numpy's (and so transformers.set_seed's) seeds are below 2**32

Parse = Callable[[str], object]
Check = Callable[[object], "str | None"]


# --- parsing text: every KEY=VALUE, list and number of the command line is read here ---------

def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected integers like 1,2,4, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


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


def parse_text(text: str) -> str:
    return text


# --- checks on parsed values (also the values the Python API and the pytest marker pass) -----

def at_least(n: int) -> Check:
    def check(value):
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= n \
            else f"must be an integer of at least {n}, got {value!r}"
    return check


def seed_check(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT:
        return None
    return f"must be an integer from 0 to 2**32-1, got {value!r}"


def nonempty(value) -> str | None:
    return "is empty: name at least one" if value is not None and len(value) == 0 else None


def not_blank(value) -> str | None:
    return "is empty" if isinstance(value, str) and not value.strip() else None


@dataclass(frozen=True, slots=True)
class Option:
    """One setting. ``kind``: ``value`` (one value), ``list`` (comma-separated; ``--path`` may
    repeat), ``pairs`` (KEY=VALUE, repeatable), ``on`` (a switch), ``off`` (a --no- switch)."""

    name: str
    type: str  # the CheckConfig field's annotation
    default: object
    help: str
    flag: str | None = None  # None: the positional MODEL
    kind: str = "value"
    parse: Parse = parse_text
    check: Check | None = None
    metavar: str | None = None
    repeat: bool = False

    @property
    def cli(self) -> str:
        return self.flag or self.name.upper()

    def coerce(self, value):
        """A Python value (the API's, a marker's) as the field holds it: lists become tuples, a
        string is read as on the command line, a dict of KEY=VALUE becomes (key, str) pairs."""
        if value is None:
            return None
        if self.kind == "pairs":
            items = value.items() if isinstance(value, dict) else value
            return tuple(parse_key_value(v) if isinstance(v, str) else (str(v[0]), str(v[1])) for v in items)
        if isinstance(value, str) and self.parse is not parse_text:
            return self.parse(value)
        if self.kind == "list" and isinstance(value, (list, tuple)):
            return tuple(value)
        return value

    def argparse_kwargs(self, *, unset_default: bool = False) -> dict:
        """``add_argument`` keywords; ``unset_default``: default None, so that an option not
        given can be told apart (the pytest plugin's options)."""
        default = None if unset_default or self.kind in ("list", "pairs") else self.default
        shown = self.kind == "value" and self.default not in (None, "")
        kwargs: dict = {"help": self.help + (f" (default {self.default})" if shown else ""), "dest": self.name}
        if self.kind == "on":
            return {**kwargs, "action": "store_true", "default": default}
        if self.kind == "off":
            return {**kwargs, "action": "store_false", "default": default}
        kwargs.update(type=_argparse_type(self.parse), default=default, metavar=self.metavar)
        if self.kind == "pairs" or self.repeat:
            kwargs["action"] = "append" if self.kind == "pairs" else "extend"
        return kwargs


def _argparse_type(parse: Parse) -> Parse:
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


POSITIVE = at_least(1)


def one_of(choices: tuple[str, ...]) -> Check:
    def check(value):
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    return check


def positive_number(value) -> str | None:
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value < float("inf") \
        else f"must be a positive number, got {value!r}"


MAX_MEMORY_GIB = 2**30  # an exbibyte: more is no machine's memory (and its bytes overflow an int64)


def memory_gib(value) -> str | None:
    problem = positive_number(value)
    if problem is None and value > MAX_MEMORY_GIB:
        return f"must be at most {MAX_MEMORY_GIB} GiB, got {value!r}"
    return problem


OPTIONS: tuple[Option, ...] = (
    Option("model", "str", "", "model_type (built tiny), save_pretrained directory, or cached hub id",
           check=not_blank, metavar="MODEL"),
    Option("task", "str | None", None, "causal-lm, seq2seq, token-classification, sequence-classification "
           "(default: what the model supports, causal-lm first)", "--task", metavar="TASK"),
    Option("paths", "tuple[str, ...] | None", None, "paths to audit, e.g. model,trainer (repeatable; "
           "default every path that applies)", "--path", "list", parse_names, nonempty, "NAME", repeat=True),
    Option("microbatches", "tuple[int, ...] | None", None, "values of k, e.g. 1,2,4,8 (default 1,2,4,8 "
           "capped by the batch size)", "--microbatches", "list", parse_ints, nonempty, "K[,K...]"),
    Option("reductions", "tuple[str, ...] | None", None, "reductions for the reduction path, e.g. "
           "mean_of_means,num_items or module:function (default the four built in)", "--reductions", "list",
           parse_names, nonempty, "NAME[,NAME...]"),
    Option("paddings", "tuple[str, ...] | None", None, "padding sides: right,left (default both)",
           "--paddings", "list", parse_names, nonempty, "SIDE[,SIDE...]"),
    Option("groupings", "tuple[str, ...] | None", None, "how sequences are grouped into microbatches: "
           "contiguous,length_sorted,imbalanced (default all)", "--groupings", "list", parse_names, nonempty,
           "NAME[,NAME...]"),
    Option("world_size", "int", 1, "data-parallel ranks", "--world-size", parse=parse_int, check=POSITIVE,
           metavar="N"),
    Option("data_parallel", "str", "ddp", "how the step, trainer and accelerate paths wrap the model on "
           "--world-size N ranks: ddp (DistributedDataParallel) or fsdp2 (torch.distributed.fsdp.fully_shard); "
           "zero1, zero2, zero3: DeepSpeed ZeRO on --path trainer and accelerate", "--data-parallel",
           check=one_of(DATA_PARALLEL), metavar="WRAPPER"),
    Option("batch_size", "int", 8, "sequences per optimizer step", "--batch-size", parse=parse_int,
           check=POSITIVE, metavar="N"),
    Option("max_length", "int", 32, "longest sequence, in tokens", "--max-length", parse=parse_int,
           check=at_least(2), metavar="N"),
    Option("min_length", "int", 4, "shortest sequence, in tokens", "--min-length", parse=parse_int,
           check=at_least(2), metavar="N"),
    Option("empty_sequences", "int", 0, "sequences with no target token at all", "--empty-sequences",
           parse=parse_int, check=at_least(0), metavar="N"),
    Option("prompt_masking", "bool", True, "do not mask a prompt prefix on every other sequence",
           "--no-prompt-masking", "off"),
    Option("every_prompt", "bool", False, "mask a prompt prefix on every sequence, as a chat template's rows "
           "(default: every other sequence; the others' first token is a target)", "--mask-every-prompt", "on"),
    Option("seed", "int", 0, "seed for the model weights and the batch (0 to 2**32-1)", "--seed",
           parse=parse_int, check=seed_check, metavar="N"),
    Option("device", "str", "cpu", "torch device: cpu, cuda, cuda:N or mps", "--device", metavar="DEVICE"),
    Option("dtype", "str", "float32", "model dtype: float32, float64, bfloat16 or float16", "--dtype", metavar="DTYPE"),
    Option("max_memory", "float | None", None, "GiB the audit may hold on the device (on the CPU what the process holds; "
           "default: the logit paths planned within 1.4x the reference's measured peak, on CUDA within 94 %% of "
           "its memory); logit paths whose gradient sums would not fit run in more passes or blocks of parameters", "--max-memory",
           parse=parse_float, check=memory_gib, metavar="GIB"),
    Option("trainer_args", "tuple[tuple[str, str], ...]", (), "KEY=VALUE for TrainingArguments (repeatable)",
           "--trainer-arg", "pairs", parse_key_value, metavar="KEY=VALUE"),
    Option("config_args", "tuple[tuple[str, str], ...]", (), "KEY=VALUE for the model config (repeatable)",
           "--config-arg", "pairs", parse_key_value, metavar="KEY=VALUE"),
    Option("loss_fn", "str | None", None, "your compute_loss_func(outputs, labels, num_items_in_batch=None), "
           "audited on its own and in the Trainer", "--loss-fn", check=not_blank, metavar="MODULE:FUNCTION"),
    # the user's own training stack (issue 15): MODULE:NAME, or from Python the object itself
    Option("step", "object", None, "MODULE:FUNCTION(model, microbatches): your training step, leaving the step's "
           "gradient in .grad (path step)", "--step", check=not_blank, metavar="MODULE:FUNCTION"),
    Option("aggregation", "object", None, "what the step means to compute over the optimizer window: token-mean, "
           "sequence-mean (a mean of per-sequence token means), sum-over:N (the token sum over a constant N) or "
           "pair-mean[:BETA] (DPO's sigmoid loss, a mean over pairs); default token-mean, or what --trainer-class "
           "declares", "--objective", parse=parse_aggregation, check=aggregation_check, metavar="OBJECTIVE"),
    Option("lightning_module", "object", None, "MODULE:FACTORY(model) -> your LightningModule (path lightning)",
           "--lightning-module", check=not_blank, metavar="MODULE:FACTORY"),
    Option("trainer_class", "object", None, "a transformers.Trainer subclass for --path trainer, e.g. "
           "trl:SFTTrainer", "--trainer-class", check=not_blank, metavar="MODULE:CLASS"),
    Option("axolotl_config", "str | None", None, "an axolotl config: --path trainer runs the trainer axolotl builds "
           "from it (its validation, model loader, LoRA, trainer builder) on the audit's batch and step",
           "--axolotl-config", check=not_blank, metavar="FILE.yml"),
    Option("swift_args", "str | None", None, "ms-swift's arguments (the JSON or YAML of what you give swift sft): "
           "--path trainer runs the trainer ms-swift builds from them (its SftArguments, template, trainer class) on "
           "the audit's batch and step", "--swift-args", check=not_blank, metavar="FILE"),
    Option("adapter", "str | None", None, "a PEFT adapter folder (save_pretrained) to audit on MODEL",
           "--adapter", check=not_blank, metavar="DIR"),
    Option("peft", "str | None", None, "a fresh PEFT adapter of this method on MODEL: lora, prompt_tuning, ...",
           "--peft", check=not_blank, metavar="METHOD"),
    Option("peft_args", "tuple[tuple[str, str], ...]", (), "KEY=VALUE for the --peft method's config (repeatable)",
           "--peft-arg", "pairs", parse_key_value, metavar="KEY=VALUE"),
    Option("allow_pickle", "bool", False, "load a pickle checkpoint (pytorch_model.bin) with "
           "torch.load(weights_only=True)", "--allow-pickle", "on"),
    Option("trust_remote_code", "bool", False, "run code that config.json's auto_map names",
           "--trust-remote-code", "on"),
    Option("allow_download", "bool", False, "download a hub id that is not in the local cache "
           "(default: the cache only)", "--allow-download", "on"),
    Option("num_layers", "int | None", None, "keep this many layers (cut a checkpoint's depth for a fast "
           "audit)", "--num-layers", parse=parse_int, check=POSITIVE, metavar="N"),
)

BY_NAME = {o.name: o for o in OPTIONS}


def add_arguments(parser, prefix: str = "", *, unset_default: bool = False) -> None:
    """Every option on ``parser`` (an argparse parser, or a pytest option group with
    ``prefix="lossaudit-"``: then MODEL is ``--lossaudit-model`` and nothing has a default)."""
    for option in OPTIONS:
        kwargs = option.argparse_kwargs(unset_default=unset_default)
        if option.flag is None and not prefix:
            kwargs.pop("dest")
            parser.add_argument(option.name, **kwargs)
            continue
        flag = option.flag or f"--{option.name}"
        kwargs["dest"] = f"{prefix.replace('-', '_')}{option.name}"
        if prefix:  # a pytest option group
            parser.addoption(f"--{prefix}{flag[2:]}", **kwargs)
        else:
            parser.add_argument(flag, **kwargs)


def values_from(namespace: dict, prefix: str = "") -> dict:
    """The options given in a parsed namespace (``vars(args)``), unset ones left out."""
    values = {}
    for option in OPTIONS:
        value = namespace.get(f"{prefix.replace('-', '_')}{option.name}")
        if value is None:
            continue
        values[option.name] = tuple(value) if isinstance(value, list) else value
    return values
