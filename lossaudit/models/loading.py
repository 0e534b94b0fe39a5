"""Build or load the model under audit: a tiny random model from a ``model_type``, a local
``save_pretrained`` directory, or a hub id (from the local cache unless downloads are allowed).
``--config-arg`` keys are checked against the config class; a value it cannot take is a usage error."""

from __future__ import annotations

import dataclasses
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import Trust, load_weights, read_config_json, refuse_untrusted, remote_code_message, snapshot_dir
from ..core.errors import EnvironmentProblem, first_line, UsageError
from ..audit.faults import must_propagate
from ..core.registry import did_you_mean
from .tiny import depth_kwargs, tiny_config, tiny_keys
from ..core.tokens import TASKS

@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    task: str
    source: str  # "tiny", "directory" or "cache"
    config_overrides: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def vocab_size(self) -> int:
        """Token ids the batch may use: the input embedding's rows (and the LM head's, if any)."""
        sizes = [self.model.get_input_embeddings().weight.shape[0]]
        head = self.model.get_output_embeddings()
        if head is not None and self.task in ("causal-lm", "seq2seq"):
            sizes.append(head.weight.shape[0])
        return int(min(sizes))

    @property
    def pad_id(self) -> int:
        pad = getattr(self.model.config, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0

    @property
    def num_labels(self) -> int:
        """Classes of a classification head; 0 for language-model heads."""
        if self.task in ("token-classification", "sequence-classification"):
            return int(self.model.config.num_labels)
        return 0

    @property
    def eos_id(self) -> int | None:
        eos = getattr(self.model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        return int(eos) if isinstance(eos, int) and 0 <= eos < self.vocab_size else None

    @property
    def decoder_start_id(self) -> int:
        start = getattr(self.model.config, "decoder_start_token_id", None)
        return int(start) if isinstance(start, int) else self.pad_id


def _auto_classes() -> dict:
    import transformers as tf

    return {
        "causal-lm": tf.AutoModelForCausalLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
        "token-classification": tf.AutoModelForTokenClassification,
        "sequence-classification": tf.AutoModelForSequenceClassification,
    }


AUTO_MAP_KEYS = {  # config.json's auto_map keys of a remote-code model's heads
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "token-classification": "AutoModelForTokenClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
}


def supported_tasks(config) -> list[str]:
    """Tasks with a head for ``config``: in transformers' own mapping, or (a remote-code model,
    whose dynamic classes never enter that mapping) named by config.json's auto_map."""
    classes = _auto_classes()
    auto_map = getattr(config, "auto_map", None) or {}
    return [t for t in TASKS if type(config) in classes[t]._model_mapping or AUTO_MAP_KEYS[t] in auto_map]


def _choose_task(config, task: str | None, name: str) -> str:
    tasks = supported_tasks(config)
    if getattr(config, "is_encoder_decoder", False) and "seq2seq" in tasks:
        # an encoder-decoder is a seq2seq model first; its causal-LM class is the bare decoder
        tasks.remove("seq2seq")
        tasks.insert(0, "seq2seq")
    if task is None:
        if not tasks:
            raise UsageError(f"model {name!r} has no head for any of: {', '.join(TASKS)}")
        return tasks[0]
    if task not in tasks:
        raise UsageError(f"model {name!r} has no {task} head; it supports: {', '.join(tasks) or 'none'}")
    return task


def _ensure_pad_for_pooling(config, task: str, name: str, *, tiny: bool) -> None:
    """Decoder sequence classifiers pool the last token that is not ``pad_token_id``; without
    one they refuse batches of more than one sequence. A tiny model gets id 0 (never drawn as
    a token); a user's model must say which id pads."""
    if task != "sequence-classification" or getattr(config, "pad_token_id", 0) is not None:
        return
    if not tiny:
        raise UsageError(f"model {name!r} has no pad_token_id, which sequence classification needs "
                         "to find each sequence's last token; pass --config-arg pad_token_id=ID")
    config.pad_token_id = 0


def _model_types() -> list[str]:
    from transformers import CONFIG_MAPPING

    return list(CONFIG_MAPPING.keys())


def load_model(
    name: str,
    *,
    task: str | None = None,
    seed: int = 0,
    config_overrides: dict | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    num_layers: int | None = None,
) -> LoadedModel:
    """Resolve MODEL: a directory, then a model_type, then a hub id (the local cache only
    unless ``allow_download``). What a saved model may do is in ``lossaudit.models.checkpoints``."""
    trust = Trust(allow_pickle, trust_remote_code, allow_download)
    overrides = dict(config_overrides or {})
    source, path = _locate(name, trust)
    if source == "tiny":
        return _tiny(name, task, seed, overrides, num_layers)
    return _from_pretrained(path, name, source, task, overrides, trust, num_layers)


def resolve_task(name: str, *, task: str | None = None, allow_pickle: bool = False,
                 trust_remote_code: bool = False, allow_download: bool = False) -> str:
    """The task an audit of ``name`` will run, from its config alone (no weights are read):
    the default report directory is named, locked and probed before the audit."""
    trust = Trust(allow_pickle, trust_remote_code, allow_download)
    source, path = _locate(name, trust)
    if source == "tiny":
        return _choose_task(tiny_config(name, {}, None), task, name)
    refuse_untrusted(path, read_config_json(path), trust)
    try:
        config = _load_config(path, trust)
    except (OSError, ValueError) as exc:
        raise UsageError(remote_code_message(path, exc) or f"cannot load {name!r} ({source}): {first_line(exc)}") from None
    return _choose_task(config, task, name)


def _locate(name: str, trust: Trust) -> tuple[str, Path | None]:
    if os.path.isdir(name) and not _bare_type_over_other_dir(name):
        return "directory", Path(name)
    if name in _model_types():
        return "tiny", None
    if "/" in name and not name.startswith((".", "/")):
        return "cache", snapshot_dir(name, trust)
    raise UsageError(
        f"unknown model {name!r}: not a directory, a transformers model_type or a cached hub id"
        + did_you_mean(name, _model_types())
    )


def _load_config(path: Path, trust: Trust, **kwargs):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust.trust_remote_code,
                                      **kwargs)


def _bare_type_over_other_dir(name: str) -> bool:
    """``llama`` run where a folder ``llama/`` holds no saved model (reports, data, code): the
    model type is meant. A folder with a config.json wins, as in from_pretrained; ``./llama``
    always means the folder."""
    return (name in _model_types() and os.sep not in name and not name.startswith(".")
            and not (Path(name) / "config.json").is_file())


def _tiny(name: str, task: str | None, seed: int, overrides: dict, num_layers: int | None) -> LoadedModel:
    from transformers import CONFIG_MAPPING

    if overrides:
        _refuse_unknown_keys(CONFIG_MAPPING[name], overrides, extra=tiny_keys(name))
    with _overrides_blamed(overrides):
        config = tiny_config(name, overrides, num_layers)
    task = _choose_task(config, task, name)
    _ensure_pad_for_pooling(config, task, name, tiny=True)
    torch.manual_seed(seed)
    with _overrides_blamed(overrides):
        model = _auto_classes()[task].from_config(config)
    return LoadedModel(model, name, task, "tiny", overrides)


def _from_pretrained(path: Path, name: str, source: str, task, overrides: dict, trust: Trust,
                     num_layers: int | None) -> LoadedModel:
    refuse_untrusted(path, read_config_json(path), trust)

    def load_config(**kwargs):
        return _load_config(path, trust, **kwargs)

    try:
        if overrides:
            _refuse_unknown_keys(type(load_config()), overrides)
        with _overrides_blamed(overrides):
            config = load_config(**overrides)
            if num_layers is not None:  # the first layers; the checkpoint's others are left unloaded
                config = load_config(**{**depth_kwargs(config, num_layers, grow=False), **overrides})
        task = _choose_task(config, task, name)
        _ensure_pad_for_pooling(config, task, name, tiny=False)
        with _overrides_blamed(overrides):
            model = load_weights(_auto_classes()[task], path, config, trust)
    except UsageError:
        raise
    except (OSError, ValueError) as exc:
        raise UsageError(remote_code_message(path, exc) or f"cannot load {name!r} ({source}): {first_line(exc)}") from None
    except ImportError as exc:
        raise EnvironmentProblem(f"cannot load {name!r}: {exc}") from None
    return LoadedModel(model, name, task, source, overrides)


def _refuse_unknown_keys(config_class, overrides: dict, extra=()) -> None:
    known = known_config_keys(config_class) | set(extra)
    unknown = [key for key in overrides if key not in known]
    if unknown:
        raise UsageError(*(f"--config-arg {key}: {config_class.__name__} has no such setting"
                           + did_you_mean(key, sorted(known)) for key in unknown))


def known_config_keys(config_class) -> set[str]:
    """What a config of ``config_class`` takes: its declared fields and constructor arguments,
    the attributes of a default instance, attribute_map aliases and settable properties."""
    keys = set(getattr(config_class, "attribute_map", None) or {})
    for cls in config_class.__mro__:
        keys |= {n for n, v in vars(cls).items() if isinstance(v, property) and v.fset is not None}
        if "__init__" in vars(cls):
            keys |= set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    if dataclasses.is_dataclass(config_class):
        keys |= {f.name for f in dataclasses.fields(config_class)}
    try:
        keys |= set(vars(config_class()))
    except Exception:  # a config that cannot be built without arguments: the declared keys stand
        pass
    return {k for k in keys if not k.startswith("_")}


# what a config's validation or a model's constructor raises on a value it cannot take
BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, RuntimeError)


@contextmanager
def _overrides_blamed(overrides: dict):
    """A config or model that cannot be built with the user's --config-arg values: usage error."""
    try:
        yield
    except Exception as exc:
        if not overrides or must_propagate(exc) or not (isinstance(exc, BUILD_ERRORS) or _is_strict_validation(exc)):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        message = " ".join(str(exc).split())[:300]
        raise UsageError(f"--config-arg {given}: the model cannot be built with it: {type(exc).__name__}: {message}") from None


def _is_strict_validation(exc: Exception) -> bool:
    """huggingface_hub's strict-dataclass validation error (transformers 5 configs): no ValueError."""
    return any(c.__name__ == "StrictDataclassError" for c in type(exc).__mro__)
