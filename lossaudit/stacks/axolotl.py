"""``--axolotl-config FILE``: one optimizer step of the trainer axolotl builds from the user's own
config, on the audit's batch (``paths/trainer.py`` runs it as the trainer path's step).

Per layout the config goes through axolotl's own ``load_cfg`` (its plugins, pydantic validation
and normalisation), with the settings the audit owns put in (``OWNED``: the audited MODEL saved
to a folder as ``base_model``, the batch in place of ``datasets``, per-device batch B/k and k
accumulation steps, one step, no clipping, the audit's dtype); axolotl's loader then builds the
model (its patches, its LoRA where the config sets ``adapter``), and its trainer builder the
trainer and collator. The model gets the audited model's weights (a LoRA's too, so the adapter
the reference was computed on is the one trained), the optimizer is SGD lr 1 read by
``probe.UpdateProbe``, and the sampler is sequential (the layout's order), so the update is the
gradient axolotl's step produced and is compared with the reference like the stock Trainer's.

What the config sets among the owned keys is named once (``owned_in``) on the progress line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from ..core.errors import EnvironmentProblem, UsageError
from ..core.layouts import Layout
from . import missing, read_mapping, require
from .packing import longest_pack
from .trl import rows, tokenizer

# axolotl config key -> what the audit puts there instead
OWNED = {
    "base_model": "the audited MODEL",
    "base_model_config": "the audited MODEL",
    "tokenizer_config": "a tokenizer over MODEL's ids",
    "datasets": "the audit's batch",
    "micro_batch_size": "B/k",
    "gradient_accumulation_steps": "k",
    "batch_size": "B",
    "num_epochs": "one step",
    "max_steps": "one step",
    "learning_rate": "1 (SGD, the update is the gradient)",
    "optimizer": "SGD",
    "lr_scheduler": "constant",
    "warmup_steps": "0",
    "warmup_ratio": "0",
    "weight_decay": "0",
    "max_grad_norm": "0 (no clipping)",
    "bf16": "the audit's --dtype",
    "fp16": "the audit's --dtype",
    "tf32": "off",
    "sequence_len": "the batch's longest row",
    "val_set_size": "0",
    "output_dir": "a temporary folder",
    "lora_dropout": "0 (dropout would make the step random)",
    "save_strategy": "no checkpoint",
    "seed": "--seed",
}
# what the audit puts there instead with sample_packing: true (stacks/packing.py)
PACKED = {
    "micro_batch_size": "1: one pack, the microbatch's B/k rows",
    "sequence_len": "the layout's longest pack",
}
# configs lossaudit cannot audit as a token mean of cross entropy
NOT_A_TOKEN_MEAN = ("rl", "reward_model", "process_reward_model")


LOGGERS = ("axolotl", "py.warnings")  # axolotl's own, and the warnings it routes through logging


def _quiet_env() -> dict:
    return {"DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "AXOLOTL_LOG_LEVEL": "ERROR", "TRL_EXPERIMENTAL_SILENCE": "1"}


@contextlib.contextmanager
def _environment():
    """axolotl's telemetry, trackers and info logging off, the hub offline, while it runs."""
    saved = {k: os.environ.get(k) for k in _quiet_env()}
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    os.environ.update(_quiet_env())
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet():
    """While axolotl builds and trains: its environment (``_environment``), no warnings (its and
    peft's advice on CPU, pin_memory, kernels is not the audit's) and no prints on stdout or stderr (errors still raise)."""
    with _environment(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # its import chatter (torchao, kernels); errors still raise
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def patches_undone(model: torch.nn.Module):
    """axolotl patches classes and modules in place (its LoRA kernels replace
    ``LlamaAttention.forward`` with one that needs attributes only its own instances get; it
    patches ``Trainer`` methods and loss functions): every attribute of the model's classes
    (their MROs), of ``transformers.Trainer``, and of the modules defining them, as it was
    before, so the audited model and the later paths run what they ran before."""
    from transformers import Trainer

    classes = {c for m in model.modules() for c in type(m).__mro__ if c is not object} | set(Trainer.__mro__[:-1])
    modules = {sys.modules[c.__module__] for c in classes if c.__module__ in sys.modules}
    modules |= {sys.modules[n] for n in ("transformers.loss.loss_utils", "transformers.trainer") if n in sys.modules}
    saved = [(owner, dict(vars(owner))) for owner in (*classes, *modules)]
    try:
        yield
    finally:
        for owner, before in saved:
            now = vars(owner)
            for name in [n for n in now if n not in before]:
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(owner, name)
            for name, value in before.items():
                if now.get(name) is not value:
                    with contextlib.suppress(AttributeError, TypeError):
                        setattr(owner, name, value)


@dataclasses.dataclass
class AxolotlConfig:
    """The user's axolotl YAML, read and checked before any model is built."""

    path: Path
    values: dict
    peft: str | None  # the audit's --peft method (the config's adapter must be the same)

    @classmethod
    def read(cls, path: str, peft: str | None) -> "AxolotlConfig":
        file, values = read_mapping("--axolotl-config", path, "not YAML", "axolotl settings")
        problems = [f"--axolotl-config {path}: {key}: {values[key]!r} trains another objective than a token mean "
                    "of cross entropy" for key in NOT_A_TOKEN_MEAN if values.get(key)]
        adapter = values.get("adapter") or None
        if adapter != peft:
            problems.append(f"--axolotl-config {path}: adapter: {adapter} but --peft {peft}: give the audit the same "
                            f"adapter (--peft {adapter} with --peft-arg r=..., as lora_r ...)" if adapter else
                            f"--axolotl-config {path}: --peft {peft} but the config trains no adapter")
        if problems:
            raise UsageError(*problems)
        flash = values.get("flash_attention") or str(values.get("attn_implementation") or "").startswith("flash_attention")
        if flash and missing("flash_attn"):  # else an ImportError per case, from transformers' loader
            raise EnvironmentProblem(f"--axolotl-config {path}: flash attention needs the flash_attn package (and CUDA), "
                                     "not installed here; on the CPU set attn_implementation: sdpa (axolotl isolates "
                                     "packed sequences with it too) to audit the rest of the config")
        require("axolotl", f"--axolotl-config {path}")
        return cls(file.resolve(), values, peft)

    def owned_in(self) -> list[str]:
        """The owned settings the config sets: ``key (config: value -> audit)``."""
        owned = {**OWNED, **PACKED} if self.packing else OWNED
        return [f"{key} ({self.values[key]!r} -> {owned[key]})" for key in owned if self.values.get(key) is not None]

    @property
    def packing(self) -> bool:
        """``sample_packing: true``: each microbatch of the layout is one pack (``stacks/packing.py``)."""
        return bool(self.values.get("sample_packing"))


def checked(config) -> AxolotlConfig:
    """--axolotl-config of a CheckConfig, checked before any model is built: the options the
    config replaces refused, then the file read (``AxolotlConfig.read``)."""
    clash = [flag for flag, value in (("--trainer-class", config.trainer_class), ("--trainer-arg", config.trainer_args),
                                      ("--loss-fn", config.loss_fn)) if value]
    if clash:
        raise UsageError(f"--axolotl-config with {', '.join(clash)}: the config is the trainer; set its options there")
    return AxolotlConfig.read(config.axolotl_config, config.peft)


def _model_folder(ctx, folder: Path) -> Path:
    """The audited model (without an adapter: axolotl adds the config's own) and a tokenizer over
    its ids, saved where axolotl's loader reads them."""
    model = ctx.model
    state = None
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: the base's weights under their own names
        base = model.get_base_model()
        state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        model = base
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    vocab = ctx.model.get_input_embeddings().weight.shape[0]
    eos = ctx.loaded.eos_id if ctx.loaded is not None else None
    tokenizer(vocab, ctx.batch.pad_id, eos).save_pretrained(folder)
    return folder


def _settings(ctx, layout: Layout, per_device: int, model_dir: Path, out: Path, packing: bool) -> dict:
    longest = longest_pack(ctx.batch, layout) if packing else max(len(s.input_ids) for s in ctx.batch.samples)
    half = ctx.model.dtype in (torch.bfloat16, torch.float16)
    return {
        "base_model": str(model_dir), "base_model_config": str(model_dir), "tokenizer_config": str(model_dir),
        "datasets": [{"path": str(model_dir), "type": "completion"}],  # never loaded: the batch is given
        "micro_batch_size": 1 if packing else per_device, "gradient_accumulation_steps": layout.microbatches,
        "batch_size": None, "num_epochs": 1, "max_steps": 1, "learning_rate": 1.0, "optimizer": "sgd",
        "lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": None, "weight_decay": 0.0,
        "max_grad_norm": 0.0, "bf16": half and ctx.model.dtype == torch.bfloat16, "fp16": ctx.model.dtype == torch.float16,
        "tf32": False, "sequence_len": max(longest, 8), "val_set_size": 0.0, "output_dir": str(out),
        "seed": ctx.config.seed if ctx.config is not None else 0, "logging_steps": 1,
        "use_wandb": False, "dataset_prepared_path": str(out / "prepared"), "lora_dropout": 0.0,
    }


# a LoRA's settings that change what it computes: the audit's --peft adapter and axolotl's must agree
ADAPTER_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save", "bias")


def _same_adapter(ours: torch.nn.Module, theirs: torch.nn.Module, path: Path) -> None:
    mine, yours = getattr(ours, "peft_config", {}).get("default"), getattr(theirs, "peft_config", {}).get("default")
    if mine is None or yours is None:
        return
    norm = lambda v: sorted(v) if isinstance(v, (set, list, tuple)) else v  # noqa: E731
    differ = [f"{name}: config {norm(getattr(yours, name, None))!r}, --peft {norm(getattr(mine, name, None))!r}"
              for name in ADAPTER_FIELDS if norm(getattr(yours, name, None)) != norm(getattr(mine, name, None))]
    if differ:
        raise UsageError(f"--axolotl-config {path}: its adapter differs from the audit's --peft adapter ("
                         + "; ".join(differ) + "); give --peft-arg the config's values")


def _copy_weights(source: torch.nn.Module, target: torch.nn.Module, path: Path) -> None:
    """The audited model's weights (and adapter) into axolotl's model, which must hold the same tensors."""
    theirs = target.state_dict()
    ours = source.state_dict()
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    shapes = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise UsageError(f"--axolotl-config {path}: axolotl built another model than the audited one "
                         f"({len(missing)} tensors only axolotl's, {len(extra)} only the audit's, {len(shapes)} "
                         f"of other shapes, e.g. {first}); match --peft-arg to the config's lora_r/lora_alpha/"
                         "lora_target_modules")
    with torch.no_grad():
        for name, tensor in theirs.items():
            tensor.copy_(ours[name])


def build_trainer(config: AxolotlConfig, ctx, layout: Layout, per_device: int, out: Path):
    """axolotl's trainer for one step of ``layout`` (``per_device`` rows a microbatch): (trainer,
    the model it trains)."""
    from datasets import Dataset

    with quiet():
        from axolotl.cli.config import load_cfg
        from axolotl.train import setup_model_and_tokenizer
        from axolotl.utils.trainer import setup_trainer

        for name in LOGGERS:  # after the import: it configures its loggers then
            logging.getLogger(name).setLevel(logging.ERROR)

        model_dir = _model_folder(ctx, out / "model")
        try:
            cfg = load_cfg(str(config.path), **_settings(ctx, layout, per_device, model_dir, out, config.packing))
        except Exception as exc:  # pydantic's ValidationError, axolotl's ValueErrors
            first = str(exc).strip().splitlines()
            raise UsageError(f"--axolotl-config {config.path}: axolotl refused it: "
                             f"{' '.join(first[:3]) if first else type(exc).__name__}") from None
        model, tok, peft_config, processor = setup_model_and_tokenizer(cfg)
        model.to(ctx.device)
        model.train()
        _same_adapter(ctx.model, model, config.path)
        _copy_weights(ctx.model, model, config.path)
        cfg.save_strategy = "no"  # after validation: load_cfg would read the string "no" as False
        # with packing, the position ids axolotl's dataset preparation adds (restarting at each pack's sequences)
        data = Dataset.from_list([{**row, "attention_mask": [1] * len(row["input_ids"]),
                                   **({"position_ids": list(range(len(row["input_ids"])))} if config.packing else {})}
                                  for row in rows(ctx, layout, labels=True)])
        trainer = setup_trainer(cfg, data, None, model, tok, processor, 1, peft_config=peft_config)
    return trainer, model
