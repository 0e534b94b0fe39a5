"""Build or load the model under audit: a tiny random model from a ``model_type``, a local
``save_pretrained`` directory, or a hub id already in the local cache (never downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EnvironmentProblem, UsageError
from .registry import did_you_mean
from .tiny import depth_kwargs, tiny_config
from .tokens import TASKS

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


def supported_tasks(config) -> list[str]:
    classes = _auto_classes()
    return [t for t in TASKS if type(config) in classes[t]._model_mapping]


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
    num_layers: int | None = None,
) -> LoadedModel:
    """Resolve MODEL: a directory, then a model_type, then a hub id in the local cache."""
    if os.path.isdir(name):
        return _from_pretrained(name, name, "directory", task, config_overrides, allow_pickle, trust_remote_code,
                                num_layers)
    if name in _model_types():
        config = tiny_config(name, config_overrides, num_layers)
        task = _choose_task(config, task, name)
        _ensure_pad_for_pooling(config, task, name, tiny=True)
        torch.manual_seed(seed)
        model = _auto_classes()[task].from_config(config)
        return LoadedModel(model, name, task, "tiny", dict(config_overrides or {}))
    if "/" in name and not name.startswith((".", "/")):
        return _from_pretrained(name, name, "cache", task, config_overrides, allow_pickle, trust_remote_code,
                                num_layers)
    raise UsageError(
        f"unknown model {name!r}: not a directory, a transformers model_type or a cached hub id"
        + did_you_mean(name, _model_types())
    )


def _from_pretrained(path, name, source, task, overrides, allow_pickle, trust_remote_code, num_layers) -> LoadedModel:
    from transformers import AutoConfig

    local = Path(path)
    if source == "directory" and not (local / "config.json").is_file():
        raise UsageError(f"{path}: no config.json (is this a directory written by save_pretrained?)")
    if source == "directory" and not allow_pickle and not list(local.glob("*.safetensors")):
        if list(local.glob("*.bin")) or list(local.glob("*.pt")):
            raise UsageError(
                f"{path}: weights are a pickle checkpoint, which can run code when loaded; "
                "convert to safetensors or pass --allow-pickle"
            )
    try:
        def load_config(**kwargs):
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs)

        config = load_config(**(overrides or {}))
        if num_layers is not None:  # the first layers; the checkpoint's others are left unloaded
            config = load_config(**{**depth_kwargs(config, num_layers, grow=False), **(overrides or {})})
        task = _choose_task(config, task, name)
        _ensure_pad_for_pooling(config, task, name, tiny=False)
        model = _auto_classes()[task].from_pretrained(
            path,
            config=config,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except UsageError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load {name!r} ({source}): {first}") from None
    except ImportError as exc:
        raise EnvironmentProblem(f"cannot load {name!r}: {exc}") from None
    return LoadedModel(model, name, task, source, dict(overrides or {}))
