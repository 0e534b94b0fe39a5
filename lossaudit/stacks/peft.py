"""PEFT: audit a model wrapped in an adapter, built fresh (``--peft METHOD --peft-arg K=V``) or
saved with ``save_pretrained`` (``--adapter DIR``, on the base MODEL).

What a wrapped model scores (peft 0.21 ``PeftModelForCausalLM.forward``, read from the source):

- Prompt tuning, p-tuning and multitask prompt tuning prepend ``num_virtual_tokens`` embeddings
  to the inputs, prepend as many ``-100`` to the labels and ones to the attention mask, and drop
  ``position_ids`` (warning that they are not supported). The model then shifts the longer
  labels: the last virtual position scores the first real token, which the plain model never
  scores. A sequence whose first label is a target carries one target more (``virtual_tokens``
  returns the count of prepended positions; ``tokens`` prepends them to the labels).
- Prefix tuning puts its virtual tokens in the key/value cache: the logits and labels keep
  their length, ``position_ids`` are offset by the prefix length, nothing more is scored.
- Every other method (LoRA, IA3, ...) changes weights only: the base model's forward, unchanged.

An adapter directory obeys the untrusted-model rules: its config is read as JSON, its weights
from ``adapter_model.safetensors`` only (a pickle ``adapter_model.bin`` is refused), nothing is
downloaded: lossaudit never calls ``PeftModel.from_pretrained`` (which falls back to the hub and
to ``torch.load``), it builds the adapter from the config and loads the safetensors itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..core.errors import UsageError
from ..core.wrapped import PREPENDING
from ..core.registry import did_you_mean
from . import require

# lossaudit task -> peft TaskType
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM",
              "token-classification": "TOKEN_CLS", "sequence-classification": "SEQ_CLS"}
DEFAULT_VIRTUAL_TOKENS = 4
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"


def methods() -> list[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(str(getattr(t, "value", t)).lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def peft_config(method: str, args: dict, task: str):
    """A fresh adapter config of ``method`` (lora, prompt_tuning, ...) with the user's ``args``."""
    require("peft", "--peft")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = method.upper().replace("-", "_")
    by_name = {str(getattr(t, "value", t)): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if key not in by_name:
        raise UsageError(f"--peft {method}: peft has no such method{did_you_mean(method.lower(), methods())}")
    cls = by_name[key]
    kwargs = dict(args)
    if key in PREPENDING or key == "PREFIX_TUNING":
        kwargs.setdefault("num_virtual_tokens", DEFAULT_VIRTUAL_TOKENS)
    try:
        return cls(task_type=TASK_TYPES[task], **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--peft {method}: {cls.__name__} refused --peft-arg: {_first_line(exc)}") from None


def wrap(model: torch.nn.Module, config, *, seed: int = 0) -> torch.nn.Module:
    """``model`` inside a fresh adapter; the adapter's initial weights come from ``seed``."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except (TypeError, ValueError, KeyError) as exc:
            raise UsageError(f"peft cannot wrap {type(model).__name__} in {type(config).__name__}: "
                             f"{_first_line(exc)}") from None


def load_adapter(model: torch.nn.Module, directory: str, task: str) -> torch.nn.Module:
    """``model`` inside the adapter saved in ``directory``, trainable, loaded without pickle,
    code or download."""
    require("peft", "--adapter")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = _adapter_dir(directory)
    fields = json.loads((path / CONFIG).read_text())
    kind = str(fields.get("peft_type", ""))
    by_name = {str(getattr(t, "value", t)): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind not in by_name:
        raise UsageError(f"--adapter {directory}: unknown peft_type {kind!r} in {CONFIG}")
    fields.update(inference_mode=False)  # audit it as it trains
    if "prompt_tuning_init" in fields:
        fields["prompt_tuning_init"] = "RANDOM"  # TEXT would load a tokenizer by name; the weights follow
    fields.setdefault("task_type", TASK_TYPES[task])
    try:
        config = by_name[kind].from_peft_type(**fields) if hasattr(by_name[kind], "from_peft_type") \
            else by_name[kind](**fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--adapter {directory}: {CONFIG} does not describe a {kind} adapter: {_first_line(exc)}") from None
    wrapped = wrap(model, config)
    result = set_peft_model_state_dict(wrapped, load_file(str(path / SAFE_WEIGHTS)))
    # prompt learning's "prompt_embeddings" is loaded apart from the state dict, so never unexpected
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if k != "prompt_embeddings"]
    if unexpected:
        raise UsageError(f"--adapter {directory}: weights that fit no parameter of the adapter on this model, "
                         f"e.g. {unexpected[0]}")
    return wrapped


def _adapter_dir(directory: str) -> Path:
    path = Path(directory)
    if not (path / CONFIG).is_file():
        raise UsageError(f"--adapter {directory}: no {CONFIG} (a folder written by PeftModel.save_pretrained)")
    if not (path / SAFE_WEIGHTS).is_file():
        if (path / PICKLE_WEIGHTS).is_file():
            raise UsageError(f"--adapter {directory}: only {PICKLE_WEIGHTS} (a pickle); lossaudit loads adapters "
                             f"from {SAFE_WEIGHTS} only: save it with save_pretrained(safe_serialization=True)")
        raise UsageError(f"--adapter {directory}: no {SAFE_WEIGHTS}")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def wrap_loaded(loaded, *, adapter: str | None = None, method: str | None = None, args: dict | None = None,
                seed: int = 0):
    """``loaded`` (a models.LoadedModel) with its model inside the adapter ``--adapter`` or
    ``--peft`` names; unchanged when neither is given, and both at once is a usage error."""
    if adapter and method:
        raise UsageError("--adapter and --peft: give one (an adapter folder, or a fresh adapter of a method)")
    if not (adapter or method):
        return loaded
    if adapter:
        model = load_adapter(loaded.model, adapter, loaded.task)
    else:
        model = wrap(loaded.model, peft_config(method, args or {}, loaded.task), seed=seed)
    return dataclasses.replace(loaded, model=model)
