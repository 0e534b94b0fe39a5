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
import io
import logging
import warnings
from pathlib import Path

from ..core.errors import UsageError
from ..core.layouts import Layout


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
    share one template class (None: ``get_template`` decides, as it does for ``swift sft``)."""
    from swift.template import TEMPLATE_MAPPING

    if model_meta.template or len(model_meta.candidate_templates) <= 1:
        return None
    classes = {TEMPLATE_MAPPING[t].template_cls for t in model_meta.candidate_templates}
    if len(classes) == 1:
        return model_meta.candidate_templates[0]
    return None  # ms-swift's own error: it cannot tell either


def _folder(ctx, words, out: Path) -> Path:
    """The audited model's config and a tokenizer over its ids, where ms-swift's loader reads them."""
    model = ctx.model.get_base_model() if hasattr(ctx.model, "get_base_model") else ctx.model
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

    def __init__(self, ctx):
        self.ctx = ctx
        self.model = ctx.model.get_base_model() if hasattr(ctx.model, "get_base_model") else ctx.model
        self.template = None

    def build(self, layout: Layout, words, out: str) -> dict:
        from swift.model import get_processor
        from swift.template import get_template

        folder = _folder(self.ctx, words, Path(out))
        kind = model_type(self.model.config, type(self.model).__name__, folder.name)
        try:
            processor = get_processor(str(folder), model_type=kind)
            template = get_template(processor, template_type=template_type(processor.model_meta),
                                    padding_side=layout.padding)
        except ValueError as exc:  # ms-swift's own "Failed to automatically match ..."
            raise UsageError(f"--trainer-class: ms-swift cannot build a template for {folder.name}: "
                             f"{str(exc).splitlines()[0]}") from None
        template.set_mode("train")
        if template.use_model:
            template.model = self.ctx.model
        for target in {id(self.ctx.model): self.ctx.model, id(self.model): self.model}.values():
            target.model_info, target.model_meta = processor.model_info, processor.model_meta
        self.template = template
        return {"template": template}

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
