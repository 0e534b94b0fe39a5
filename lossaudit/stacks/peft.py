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
import math
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
# fresh adapters lossaudit does not build, and config fields it sets itself
REFUSED_METHODS = {"XLORA": "X-LoRA mixes adapters that peft loads itself (from folders or the hub), so there is no "
                            "fresh one to build: save it and pass --adapter DIR"}
AUDIT_SETS = {"inference_mode": "the audit trains the adapter (inference_mode=False)",
              "task_type": "set from the model's task"}


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
    if key in REFUSED_METHODS:
        raise UsageError(f"--peft {method}: {REFUSED_METHODS[key]}")
    problems = [f"--peft-arg {k}: {AUDIT_SETS[k]}" for k in args if k in AUDIT_SETS]
    problems += [f"--peft-arg {k}={v!r}: not a finite number" for k, v in args.items()
                 if isinstance(v, float) and not math.isfinite(v)]
    if problems:
        raise UsageError(*problems)
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


def load_adapter(model: torch.nn.Module, directory: str, task: str, *, allow_download: bool = False,
                 allow_pickle: bool = False) -> torch.nn.Module:
    """``model`` inside the adapter saved in ``directory``, trainable, loaded without pickle,
    code or download; every weight the adapter has on this model must be in the file."""
    require("peft", "--adapter")
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    path, fields, cls = read_adapter(directory, allow_download=allow_download, allow_pickle=allow_pickle)
    kind = fields["peft_type"]
    fields.update(inference_mode=False)  # audit it as it trains
    if "prompt_tuning_init" in fields:
        fields["prompt_tuning_init"] = "RANDOM"  # TEXT would load a tokenizer by name; the weights follow
    fields.setdefault("task_type", TASK_TYPES[task])
    try:
        config = cls.from_peft_type(**fields) if hasattr(cls, "from_peft_type") else cls(**fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--adapter {directory}: {CONFIG} does not describe a {kind} adapter: {_first_line(exc)}") from None
    wrapped = wrap(model, config)
    weights = _safetensors(path / SAFE_WEIGHTS)
    expected = set(get_peft_model_state_dict(wrapped))
    missing = sorted(expected - set(weights))
    if missing:
        raise UsageError(f"--adapter {directory}: {SAFE_WEIGHTS} lacks {len(missing)} of the adapter's "
                         f"{len(expected)} weights on this model, e.g. {missing[0]}")
    try:
        result = set_peft_model_state_dict(wrapped, weights)
    except (RuntimeError, ValueError, KeyError) as exc:  # a tensor whose shape fits no parameter
        raise UsageError(f"--adapter {directory}: weights that do not fit the adapter on this model: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    # prompt learning's "prompt_embeddings" is loaded apart from the state dict, so never unexpected
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if k != "prompt_embeddings"]
    if unexpected:
        raise UsageError(f"--adapter {directory}: weights that fit no parameter of the adapter on this model, "
                         f"e.g. {unexpected[0]}")
    return wrapped


def read_adapter(directory: str, *, allow_download: bool = False, allow_pickle: bool = False):
    """(folder, config fields, peft config class) of a saved adapter, checked before any model
    is built: its config JSON of a known peft_type that names nothing peft would load itself
    beyond the rules, and a readable safetensors file."""
    require("peft", "--adapter")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = _adapter_dir(directory)
    try:
        fields = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--adapter {directory}: cannot read {CONFIG}: {_first_line(exc)}") from None
    if not isinstance(fields, dict):
        raise UsageError(f"--adapter {directory}: {CONFIG} is not a JSON object")
    kind = str(fields.get("peft_type", ""))
    by_name = {str(getattr(t, "value", t)): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind not in by_name:
        raise UsageError(f"--adapter {directory}: unknown peft_type {kind!r} in {CONFIG}")
    problems = [f"--adapter {directory}: {p}" for p in
                _loaded_by_peft(path, fields, allow_download=allow_download, allow_pickle=allow_pickle)]
    if problems:
        raise UsageError(*problems)
    weights = _safetensors(path / SAFE_WEIGHTS)
    if not weights:
        raise UsageError(f"--adapter {directory}: {SAFE_WEIGHTS} holds no tensors")
    return path, fields, by_name[kind]


def _loaded_by_peft(path: Path, fields: dict, *, allow_download: bool, allow_pickle: bool) -> list[str]:
    """What an adapter config makes peft load itself (X-LoRA's ``adapters``: hub ids or folders),
    against lossaudit's rules: no download without --allow-download, nothing outside the adapter
    folder, no pickle without --allow-pickle."""
    refs = fields.get("adapters")
    if refs is None:
        return []
    if not isinstance(refs, dict) or not all(isinstance(v, str) for v in refs.values()):
        return [f"{CONFIG}: 'adapters' must map names to adapter folders"]
    problems, root = [], path.resolve()
    for name, ref in refs.items():
        local = Path(ref)  # as peft reads it: from the working directory, else a hub id
        if not local.exists():
            if not allow_download:
                problems.append(f"{CONFIG} names adapter {name!r} at {ref!r}, not a folder here: peft would "
                                "download it; pass --allow-download to let it")
            continue
        if root != local.resolve() and root not in local.resolve().parents:
            problems.append(f"{CONFIG} names adapter {name!r} at {ref!r}, outside the adapter folder")
        elif not (local / SAFE_WEIGHTS).is_file() and not allow_pickle:
            problems.append(f"{CONFIG} names adapter {name!r} at {ref!r}, which has no {SAFE_WEIGHTS} "
                            "(a pickle would be loaded): pass --allow-pickle to let it")
    return problems


def _safetensors(file: Path) -> dict:
    """The tensors of ``file``, or a UsageError naming it (empty, cut, garbled, misshapen)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError is no OSError; anything a broken file raises is one
        if isinstance(exc, (MemoryError, KeyboardInterrupt)):
            raise
        raise UsageError(f"{file}: not a readable safetensors file: {_first_line(exc)}") from None


def _adapter_dir(directory: str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"--adapter {directory}: not a folder")
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
                seed: int = 0, allow_download: bool = False, allow_pickle: bool = False):
    """``loaded`` (a models.LoadedModel) with its model inside the adapter ``--adapter`` or
    ``--peft`` names; unchanged when neither is given, and both at once is a usage error."""
    if adapter and method:
        raise UsageError("--adapter and --peft: give one (an adapter folder, or a fresh adapter of a method)")
    if not (adapter or method):
        return loaded
    if adapter:
        model = load_adapter(loaded.model, adapter, loaded.task, allow_download=allow_download,
                             allow_pickle=allow_pickle)
    else:
        model = wrap(loaded.model, peft_config(method, args or {}, loaded.task), seed=seed)
    return dataclasses.replace(loaded, model=model)
