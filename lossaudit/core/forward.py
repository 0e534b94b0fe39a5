"""Calling a model the same way in every path: position ids from the attention mask, no
cache, and labels / ``num_items_in_batch`` only when the path audits the model's own loss."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from .moe import aux_spec
from .layouts import Microbatch
from .wrapped import base_model


@lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def model_inputs(model: torch.nn.Module, mb: Microbatch, device: torch.device) -> dict:
    """The inputs every path gives the model for ``mb`` (labels excepted).

    A seq2seq model gets its decoder inputs from the batch, never from its own shift of the
    labels, so every path scores the same decoder sequence whether it passes labels or not.
    """
    accepted = _forward_params(type(base_model(model)))  # a PeftModel's forward takes **kwargs: ask its base
    inputs = {"input_ids": mb.input_ids.to(device), "attention_mask": mb.attention_mask.to(device)}
    if mb.decoder_input_ids is not None:
        inputs["decoder_input_ids"] = mb.decoder_input_ids.to(device)
        inputs["decoder_attention_mask"] = mb.decoder_attention_mask.to(device)
    elif "position_ids" in accepted:  # encoder-decoders place positions themselves
        inputs["position_ids"] = mb.position_ids.to(device)
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    if "output_router_logits" in accepted and aux_spec(model) is not None:
        inputs["output_router_logits"] = True  # a MoE model trains with its router aux loss on
    return inputs


def rejects_kwarg(exc: TypeError, name: str) -> bool:
    return name in str(exc) and ("unexpected keyword" in str(exc) or "got an unexpected" in str(exc))


def forward(
    model: torch.nn.Module,
    mb: Microbatch,
    device: torch.device,
    *,
    with_labels: bool = False,
    num_items_in_batch: int | None = None,
):
    """Run the model on one microbatch. Returns (outputs, num_items_rejected)."""
    inputs = model_inputs(model, mb, device)
    if with_labels:
        inputs["labels"] = mb.labels.to(device)
    if num_items_in_batch is not None:
        try:
            return model(**inputs, num_items_in_batch=num_items_in_batch), False
        except TypeError as exc:
            if not rejects_kwarg(exc, "num_items_in_batch"):
                raise
    return model(**inputs), num_items_in_batch is not None
