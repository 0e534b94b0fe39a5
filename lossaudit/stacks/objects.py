"""A model object the caller built (a PreTrainedModel, or a PeftModel around one) as the audit's
LoadedModel, for ``lossaudit.check(model_object, ...)``."""

from __future__ import annotations

import torch

from ..core.errors import UsageError
from ..models.loading import LoadedModel
from ..core.tokens import TASKS
from ..core.wrapped import base_model

# class-name endings of transformers heads -> task
HEADS = (("ForCausalLM", "causal-lm"), ("ForTokenClassification", "token-classification"),
         ("ForSequenceClassification", "sequence-classification"), ("ForConditionalGeneration", "seq2seq"),
         ("ForSeq2SeqLM", "seq2seq"))


def task_of(model: torch.nn.Module) -> str | None:
    base = base_model(model)
    name = type(base).__name__
    for ending, task in HEADS:
        if name.endswith(ending):
            if task == "seq2seq" and not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
                return "causal-lm"  # a decoder-only ...ForConditionalGeneration (vision-language models)
            return task
    return None


def loaded_object(model: torch.nn.Module, task: str | None = None) -> LoadedModel:
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model must be a name, a directory or a torch.nn.Module, not {type(model).__name__}")
    task = task or task_of(model)
    if task not in TASKS:
        raise UsageError(f"cannot tell the task of a {type(base_model(model)).__name__}: pass task= "
                         f"({', '.join(TASKS)})")
    return LoadedModel(model, type(base_model(model)).__name__, task, "object")
