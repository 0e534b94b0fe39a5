"""Loading a saved model without running what it ships, unless the user says so.

- Weights come from safetensors. A pickle checkpoint (``pytorch_model*.bin``) is refused
  unless ``allow_pickle``, and then lossaudit unpickles it itself with
  ``torch.load(weights_only=True)``, whatever the installed transformers' default is.
- Code named by ``auto_map`` in config.json is never imported unless ``trust_remote_code``.
- A hub id resolves from the local cache only unless ``allow_download``; lossaudit asks
  huggingface_hub for the snapshot folder and loads it like any directory.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError

PICKLE_WEIGHTS = "pytorch_model*.bin"  # not training_args.bin, which is a pickle of something else
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class Trust:
    """What the user allows a model directory or hub id to do."""

    allow_pickle: bool = False
    trust_remote_code: bool = False
    allow_download: bool = False


def snapshot_dir(repo_id: str, trust: Trust) -> Path:
    """The local folder of a hub id: from the cache only, or downloaded if ``allow_download``
    (then only what the audit may load: configs, safetensors, and what ``trust`` allows)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError  # also on hub < 0.24

    patterns = ["*.json", "*.safetensors"]
    patterns += ["*.py"] if trust.trust_remote_code else []
    patterns += [PICKLE_WEIGHTS] if trust.allow_pickle else []
    try:
        return Path(snapshot_download(repo_id, local_files_only=not trust.allow_download, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise UsageError(f"{repo_id!r} is not in the local Hugging Face cache; download it first "
                         "(hf download) or pass --allow-download") from None
    except HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a valid hub id: {_first_line(exc)}") from None
    except OSError as exc:  # network and HTTP errors of a download
        raise UsageError(f"cannot download {repo_id!r}: {_first_line(exc)}") from None


def read_config_json(path: Path) -> dict:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no config.json (is this a directory written by save_pretrained?)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}/config.json: cannot read it: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}/config.json: not a JSON object")
    return data


def refuse_untrusted(path: Path, config_json: dict, trust: Trust) -> None:
    """Refuse, before transformers sees the directory, what would run code from it."""
    if not trust.allow_pickle and not list(path.glob("*.safetensors")) and pickle_files(path):
        raise UsageError(f"{path}: weights are a pickle checkpoint, which can run code when loaded; "
                         "convert to safetensors or pass --allow-pickle (loaded with torch.load(weights_only=True))")
    auto_map = config_json.get("auto_map")
    if auto_map and not trust.trust_remote_code and not _builtin_type(config_json.get("model_type")):
        files = sorted({f"{str(ref).split('--')[-1].rsplit('.', 1)[0]}.py" for ref in _refs(auto_map)})
        raise UsageError(f"{path}: config.json's auto_map runs code shipped with the model ({', '.join(files)}); "
                         "read it, then pass --trust-remote-code to run it")


def remote_code_message(path, exc: Exception) -> str | None:
    """transformers' refusal of custom code, as lossaudit's one line naming the flag."""
    text = str(exc)
    if "trust_remote_code" not in text:
        return None
    return f"{path}: the model needs code shipped with it; read it, then pass --trust-remote-code to run it"


def pickle_files(path: Path) -> list[Path]:
    index = path / PICKLE_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UsageError(f"{index}: cannot read the shard index: {_first_line(exc)}") from None
        files = [path / str(name) for name in sorted(map(str, shards))]
        outside = [f for f in files if not f.resolve().is_relative_to(path.resolve())]
        if outside:
            raise UsageError(f"{index}: names a shard outside the model directory ({outside[0]}); refused")
        return files
    return sorted(path.glob(PICKLE_WEIGHTS))


def pickle_state_dict(path: Path) -> dict:
    """Every shard of a pickle checkpoint, unpickled with ``weights_only=True`` on the CPU."""
    import torch

    state = {}
    for file in pickle_files(path):
        try:
            with warnings.catch_warnings():  # torch's own warnings would come before lossaudit's one line
                warnings.simplefilter("ignore")
                shard = torch.load(file, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise UsageError(f"{file}: refused by torch.load(weights_only=True): it holds more than tensors "
                             f"({_unsupported(exc)}), which could run code when unpickled") from None
        except (OSError, RuntimeError, EOFError) as exc:
            raise UsageError(f"{file}: not a readable PyTorch checkpoint: {_first_line(exc)}") from None
        if not isinstance(shard, dict):
            raise UsageError(f"{file}: holds a {type(shard).__name__}, not a state dict")
        state.update(shard)
    return state


def load_weights(auto_class, path: Path, config, trust: Trust):
    """The model of ``auto_class`` for ``config`` with the directory's weights; a checkpoint
    that is broken, or does not fill every weight with one of the right shape, is refused."""
    with quiet():
        if list(path.glob("*.safetensors")) or not trust.allow_pickle or not pickle_files(path):
            check_safetensors(path)
            model, info = auto_class.from_pretrained(
                path, config=config, local_files_only=True, trust_remote_code=trust.trust_remote_code,
                use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True)
            kind = "safetensors"
        else:
            state = pickle_state_dict(path)
            model, info = _model_class(auto_class, config, trust).from_pretrained(
                None, config=config, state_dict=state, output_loading_info=True)
            kind = "pickle"
    problems = [f"{len(info[k])} {k.replace('_', ' ')} ({', '.join(sorted(map(_key, info[k]))[:3])}"
                f"{', ...' if len(info[k]) > 3 else ''})" for k in ("missing_keys", "mismatched_keys") if info.get(k)]
    if problems:
        raise UsageError(f"{path}: the {kind} checkpoint does not fit config.json: {'; '.join(problems)}")
    return model


def check_safetensors(path: Path) -> None:
    """Every safetensors file's header reads and covers its file (an empty, cut or garbled file
    is refused by name before transformers reports it its own way)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:  # SafetensorError is no OSError; anything else is a broken file too
            if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "SafetensorError":
                raise
            raise UsageError(f"{file}: not a readable safetensors file: {_first_line(exc)}") from None


def _key(item) -> str:
    """A missing key is a name; a mismatched one (name, checkpoint shape, model shape)."""
    if isinstance(item, (tuple, list)) and item:
        return f"{item[0]}: {'x'.join(map(str, item[1]))} in the checkpoint, {'x'.join(map(str, item[2]))} in the model" \
            if len(item) == 3 else str(item[0])
    return str(item)


def _model_class(auto_class, config, trust: Trust):
    """The concrete class ``auto_class`` picks for ``config`` (built on the meta device: no memory).
    A class's own ``from_pretrained(None, state_dict=...)`` ties weights and reports missing keys."""
    import torch

    with torch.device("meta"):
        return type(auto_class.from_config(config, trust_remote_code=trust.trust_remote_code))


@contextmanager
def quiet():
    """transformers' load reports and progress bars off: lossaudit says what went wrong in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _builtin_type(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _refs(auto_map: dict) -> list[str]:
    refs = []
    for value in auto_map.values() if isinstance(auto_map, dict) else ():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v]
    return refs


def _unsupported(exc: Exception) -> str:
    """torch's long weights_only message, cut to the global it refused."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"global {found.group(1)}" if found else _first_line(exc)[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
