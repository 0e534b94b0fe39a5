"""ms-swift's trainers (``--trainer-class swift.trainers:Seq2SeqTrainer``): what ``swift sft`` gives
them besides the Trainer's arguments, built by ms-swift's own code for the audited model.

``swift sft`` loads the model and its processor (``get_model_processor``: the processor and the
model carry ms-swift's ``model_info``/``model_meta``), builds the ``Template`` for them
(``get_template``, mode ``train``), encodes the dataset with it (rows of ``input_ids`` and
``labels``, prompts -100) and gives the trainer the template, whose ``data_collator`` collates and
whose ``compute_sft_loss`` computes the loss. Here, per step:

- the audited model's config (its ``architectures`` named) and a tokenizer over its ids are saved
  to a folder named as the model is (ms-swift matches model groups, hence templates, by name) and
  read back by ms-swift's ``get_processor``, with the model type ms-swift matches from the
  architecture (``model_type``; several: the one named as the config's, else refused in one line);
- ``get_template`` builds the template the model type names (several candidates sharing one
  template class: the first; the class decides collation and loss, the rest only encoding, which
  the audit's rows replace), with the layout's padding side (``swift sft --padding_side``);
- the audited model gets ``model_info``/``model_meta`` for the step (taken off afterwards), as
  ms-swift's loader gives its own model;
- the trainer's arguments are its own class (``Seq2SeqTrainingArguments``) with the audit's step and
  ``train_dataloader_shuffle=False`` (ms-swift's dataloader shuffles by default; the layout's order
  is the audit's), ``check_model=False`` (no hub query) (``frameworks.KNOWN``).

ms-swift patches ``transformers.trainer``'s default callbacks when ``swift.trainers`` is imported
(``swift/trainers/patcher.py``: a flow callback reading ``args.max_epochs``, which a stock
``TrainingArguments`` lacks) and ``torch.utils.checkpoint.checkpoint`` when a trainer is built:
both hold during its step and are put back after it, so a stock Trainer after it runs as before.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import warnings
from pathlib import Path

from ..core.errors import first_line, UsageError
from ..core.layouts import Layout
from ..core.wrapped import base_model
from . import read_mapping


def model_type(config, architecture: str, name: str) -> str | None:
    """The ms-swift model type of a model with this ``config``: ms-swift's own match from its
    architecture; several: the one named as ``config.model_type``, else UsageError naming them;
    none: None (ms-swift's own fallback for a text model it does not know: its ``dummy`` template)."""
    from swift.model.model_meta import get_matched_model_types

    found = get_matched_model_types([architecture])
    if config.model_type in found:
        return config.model_type
    if len(found) <= 1:
        return found[0] if found else None
    raise UsageError(f"--trainer-class: ms-swift matches {name} ({architecture}) to several model types "
                     f"({', '.join(found)}) and none is its config's model_type {config.model_type!r}")


def template_type(model_meta) -> str | None:
    """The template ms-swift gives the model type: its own, or the first of its candidates when they
    share one template class (None: ``get_template`` decides, as it does for ``swift sft``; its one
    candidate, or its error naming them)."""
    from swift.template import TEMPLATE_MAPPING

    if model_meta.template or len(model_meta.candidate_templates) <= 1:
        return model_meta.template
    classes = {TEMPLATE_MAPPING[t].template_cls for t in model_meta.candidate_templates}
    if len(classes) == 1:
        return model_meta.candidate_templates[0]
    return None  # ms-swift's own error: it cannot tell either


def _folder(ctx, words, out: Path) -> Path:
    """The audited model's config and a tokenizer over its ids, where ms-swift's loader reads them."""
    model = base_model(ctx.model)
    name = ctx.loaded.name if ctx.loaded is not None else type(model).__name__
    folder = out / (Path(name).name or "model")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    words.save_pretrained(folder)
    return folder


class SwiftInputs:
    """What an ms-swift trainer takes besides the Trainer's arguments (its ``template``), per step;
    a context manager: what it set on the audited model and on transformers/torch is undone on exit."""

    def __init__(self, ctx, source: "SwiftArgs | None" = None):
        self.ctx, self.source = ctx, source  # source: the user's --swift-args
        self.model = base_model(ctx.model)
        self.template = None
        self.training_args = None

    def build(self, layout: Layout, words, out: str, settings: dict) -> dict:
        from swift.model import get_processor
        from swift.template import get_template

        folder = _folder(self.ctx, words, Path(out))
        kind = model_type(self.model.config, type(self.model).__name__, folder.name)
        what = f"--swift-args {self.source.path}" if self.source is not None else "--trainer-class"
        try:
            if self.source is not None:  # ms-swift's SftArguments, as swift sft parses the file
                args = self.source.sft_arguments(folder, layout, settings, kind, self.model.dtype)
                processor = args.get_model_processor(load_model=False)[1]
                template = args.get_template(processor)
                self.training_args = args.training_args
            else:
                processor = get_processor(str(folder), model_type=kind)
                template = get_template(processor, template_type=template_type(processor.model_meta),
                                        padding_side=layout.padding)
        except UsageError:
            raise
        except ValueError as exc:  # ms-swift's own "Failed to automatically match ..."
            raise UsageError(f"{what}: ms-swift cannot build a template for {folder.name}: "
                             f"{str(exc).splitlines()[0]}") from None
        template.set_mode("train")
        if template.use_model:
            template.model = self.ctx.model
        for target in {id(self.ctx.model): self.ctx.model, id(self.model): self.model}.values():
            target.model_info, target.model_meta = processor.model_info, processor.model_meta
        if self.source is not None:
            self.source.same_adapter(args, self.ctx)
        self.template = template
        return {"template": template}

    def arguments(self, built):
        """The trainer's arguments: ms-swift's own from the user's file, else ``built`` (the class's)."""
        return self.training_args if self.training_args is not None else built

    @staticmethod
    def encoded(rows: list[dict]) -> list[dict]:
        """The audit's rows as ms-swift's template encodes rows: ``labels`` -100 at the first
        position (its ``encode`` masks it even where nothing else is masked; no position predicts
        it, so the objective is the same). Left as the audit gives it, ms-swift's trainer counts
        it in ``num_items_in_batch``, trains it from a pad position under left padding, and at
        one row per microbatch fails (``prepare_logits_to_keep``): rows ms-swift never makes."""
        return [{**row, "labels": [-100, *row["labels"][1:]]} for row in rows]

    @contextlib.contextmanager
    def quiet(self):
        """ms-swift's info logging, warnings and prints off while its trainer builds and trains."""
        logger = logging.getLogger("swift")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                yield
        finally:
            logger.setLevel(level)

    def __enter__(self) -> "SwiftInputs":
        import torch.utils.checkpoint as checkpoint
        import transformers.trainer as hf_trainer

        from swift.trainers import patcher

        import transformers.modeling_utils as modeling

        # ms-swift's gradient-checkpointing patch (when a trainer is built), put back on exit
        self._saved = [(owner, owner.checkpoint) for owner in (checkpoint, modeling) if hasattr(owner, "checkpoint")]
        self._had_old = hasattr(checkpoint, "_old_checkpoint")
        # ms-swift's import-time patches, as swift sft trains with them (put back to stock on exit)
        hf_trainer.DEFAULT_CALLBACKS = [patcher.DefaultFlowCallbackNew]
        hf_trainer.DEFAULT_PROGRESS_CALLBACK = patcher.ProgressCallbackNew
        hf_trainer.PrinterCallback = patcher.PrinterCallbackNew
        self._generation = {id(m): copy.deepcopy(getattr(m, "generation_config", None))
                            for m in (self.ctx.model, self.model)}
        return self

    def __exit__(self, *exc) -> None:
        import torch.utils.checkpoint as checkpoint
        from transformers import trainer_callback

        import transformers.trainer as hf_trainer

        for target in {id(self.ctx.model): self.ctx.model, id(self.model): self.model}.values():
            for name in ("model_info", "model_meta"):
                target.__dict__.pop(name, None)
            if self._generation.get(id(target)) is not None:
                target.generation_config = self._generation[id(target)]  # ms-swift sets its eos tokens
        hf_trainer.DEFAULT_CALLBACKS = [trainer_callback.DefaultFlowCallback]
        hf_trainer.DEFAULT_PROGRESS_CALLBACK = trainer_callback.ProgressCallback
        hf_trainer.PrinterCallback = trainer_callback.PrinterCallback
        if not self._had_old:
            for owner, value in self._saved:
                owner.checkpoint = value
            if hasattr(checkpoint, "_old_checkpoint"):
                del checkpoint._old_checkpoint
        if self.template is not None:
            self.template.model = None


# --swift-args: ms-swift argument -> what the audit puts there instead (named when the file sets it)
OWNED = {
    "model": "the audited MODEL",
    "dataset": "the audit's batch",
    "val_dataset": "none",
    "cached_dataset": "the audit's batch",
    "per_device_train_batch_size": "B/k",
    "gradient_accumulation_steps": "k",
    "num_train_epochs": "one step",
    "max_epochs": "one step",
    "max_steps": "one step",
    "learning_rate": "1 (SGD: the update is the gradient)",
    "optimizer": "SGD",
    "optim": "SGD",
    "lr_scheduler_type": "constant",
    "warmup_ratio": "0",
    "warmup_steps": "0",
    "weight_decay": "0",
    "max_grad_norm": "0 (no clipping)",
    "output_dir": "a temporary folder",
    "seed": "--seed",
    "data_seed": "--seed",
    "train_dataloader_shuffle": "False (the layout's order)",
    "padding_side": "the layout's padding",
    "torch_dtype": "the audit's --dtype",
    "bf16": "the audit's --dtype",
    "fp16": "the audit's --dtype",
    "gradient_checkpointing": "off (it would change the audited model in place)",
    "lora_dropout": "0 (dropout would make the step random)",
    "report_to": "none",
    "check_model": "False (no hub query)",
    "dataloader_num_workers": "0",
    "save_strategy": "no checkpoint",
    "eval_strategy": "no",
    "logging_steps": "the audit's",
}
# what the file may not set: another objective, or what the audit cannot give the trainer
NOT_AUDITED = {
    "rlhf_type": "a preference or reward objective (swift rlhf), not a token mean of cross entropy",
    "enable_dft_loss": "DFT's probability-weighted loss, not a token mean of cross entropy",
    "label_smoothing_factor": "a smoothed target, not the token cross entropy",
    "packing": "its PackingDataset chooses which rows share a pack; audit --padding_free instead",
    "sequence_parallel_size": "sequence parallelism needs several ranks",
}
LORA_FIELDS = {"r": "lora_rank", "lora_alpha": "lora_alpha", "use_rslora": "use_rslora", "use_dora": "use_dora",
               "bias": "lora_bias"}


class SwiftArgs:
    """The user's ms-swift arguments (``--swift-args FILE``, JSON or YAML: what they give ``swift sft``),
    read and checked before any model is built; per step parsed by ms-swift's own ``SftArguments``
    with the audit's settings in place of those it owns (``OWNED``)."""

    def __init__(self, path: Path, values: dict, peft: str | None):
        self.path, self.values, self.peft = path, values, peft

    @classmethod
    def read(cls, path: str, peft: str | None) -> "SwiftArgs":
        file, values = read_mapping("--swift-args", path, "neither JSON nor YAML", "ms-swift arguments")
        problems = [f"--swift-args {path}: {key}: {values[key]!r}: {why}" for key, why in NOT_AUDITED.items()
                    if values.get(key) and not (key == "sequence_parallel_size" and values[key] == 1)]
        if values.get("task_type") not in (None, "causal_lm"):
            problems.append(f"--swift-args {path}: task_type: {values['task_type']!r}: lossaudit audits causal_lm")
        if values.get("loss_type") not in (None, "cross_entropy"):
            problems.append(f"--swift-args {path}: loss_type: {values['loss_type']!r} is not a token mean of cross "
                            "entropy")
        tuner = values.get("tuner_type", values.get("train_type", "lora"))  # ms-swift's default: lora
        if tuner not in ("full", "lora"):
            problems.append(f"--swift-args {path}: tuner_type: {tuner!r}: only full and lora are audited")
        elif (tuner == "lora") != (peft == "lora"):
            problems.append(f"--swift-args {path}: tuner_type: {tuner} (ms-swift's default is lora) but --peft {peft}: "
                            + ("give the audit the same adapter: --peft lora with --peft-arg r=..., lora_alpha=..., "
                               "target_modules=..." if tuner == "lora" else "set tuner_type: lora, or drop --peft"))
        if problems:
            raise UsageError(*problems)
        return cls(file.resolve(), values, peft)

    def owned_in(self) -> list[str]:
        """The owned settings the file sets: ``key (file's value -> the audit's)``."""
        return [f"{key} ({self.values[key]!r} -> {OWNED[key]})" for key in OWNED if self.values.get(key) is not None]

    def sft_arguments(self, folder: Path, layout: Layout, settings: dict, kind: str | None, dtype):
        """ms-swift's ``SftArguments`` from the file, the audit's ``settings`` (the Trainer step's) in
        place of what it owns."""
        from swift.arguments import SftArguments

        fields = {f.name for f in dataclasses.fields(SftArguments) if f.init}
        never_loaded = [str(folder / "the-audits-batch.jsonl")]  # ms-swift asks for one; the batch is given
        audit = {**settings, "model": str(folder), "dataset": never_loaded, "val_dataset": [], "data_seed": settings["seed"],
                 "train_dataloader_shuffle": False, "padding_side": layout.padding, "gradient_checkpointing": False,
                 "lora_dropout": 0.0, "report_to": ["none"], "check_model": False, "warmup_ratio": 0.0,
                 "torch_dtype": str(dtype).removeprefix("torch."), "bf16": False, "fp16": False, "optimizer": None,
                 "use_hf": True, "add_version": False, "logging_steps": 1}
        values = {**{k: v for k, v in self.values.items() if k not in OWNED},
                  **{k: v for k, v in audit.items() if k in fields}}
        values.setdefault("model_type", kind)
        if "template" not in values and kind is not None:  # as --trainer-class chooses it (template_type)
            from swift.model import MODEL_MAPPING

            values["template"] = template_type(MODEL_MAPPING[kind])
        try:
            return SftArguments(**values)
        except (TypeError, ValueError, AssertionError) as exc:
            first = first_line(exc)
            raise UsageError(f"--swift-args {self.path}: ms-swift refused it: {first}") from None

    def same_adapter(self, args, ctx) -> None:
        """The audit's --peft LoRA must be the one ms-swift would build from the file (its own
        ``get_target_modules`` resolving ``all-linear``)."""
        from swift.pipelines.train.tuner import get_target_modules

        ours = getattr(ctx.model, "peft_config", {}).get("default")
        if ours is None:
            return
        base = ctx.model.get_base_model()
        differ = [f"{name}: file {getattr(args, field)!r}, --peft {getattr(ours, name, None)!r}"
                  for name, field in LORA_FIELDS.items() if getattr(args, field) != getattr(ours, name, None)]
        # the modules each adapts, by name as peft matches a list (its last part); a regex is ms-swift's
        # for multimodal models, not audited here
        targets = get_target_modules(args, base)
        theirs = sorted(set(targets)) if not isinstance(targets, str) else targets
        wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if hasattr(m, "lora_A")})
        if theirs != wrapped:
            differ.append(f"target_modules: file {theirs!r}, --peft adapts {wrapped!r}")
        if differ:
            raise UsageError(f"--swift-args {self.path}: its LoRA differs from the audit's --peft adapter ("
                             + "; ".join(differ) + "); give --peft-arg the file's values")


def checked(config) -> SwiftArgs:
    """--swift-args of a CheckConfig, checked before any model is built: the options the file
    replaces refused, then the file read (``SwiftArgs.read``)."""
    clash = [flag for flag, value in (("--trainer-class", config.trainer_class), ("--trainer-arg", config.trainer_args),
                                      ("--loss-fn", config.loss_fn), ("--axolotl-config", config.axolotl_config))
             if value]
    if clash:
        raise UsageError(f"--swift-args with {', '.join(clash)}: the file is the trainer's arguments; set them there")
    return SwiftArgs.read(config.swift_args, config.peft)
