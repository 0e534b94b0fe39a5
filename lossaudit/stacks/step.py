"""``--step MODULE:FUNCTION``: any training loop. ``FUNCTION(model, microbatches)`` runs the
user's forward and backward over the layout's microbatches and leaves the step's gradient in
``.grad``; the runner zeroes ``.grad`` before and reads it after (no optimizer involved)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch

from ..core.forward import model_inputs
from ..core.grads import trainable
from ..core.layouts import Microbatch
from . import StackStep

StepFn = Callable[[torch.nn.Module, list[dict]], object]


def batch_dicts(model: torch.nn.Module, microbatches: list[Microbatch], device: torch.device) -> list[dict]:
    """The layout's microbatches as a user's loop sees them: model inputs plus ``labels``."""
    return [{**model_inputs(model, mb, device), "labels": mb.labels.to(device)} for mb in microbatches]


def run_step_function(model: torch.nn.Module, microbatches: list[Microbatch], fn: StepFn,
                      device: torch.device, extras: list[dict] | None = None, *,
                      watch: Callable[[list[dict]], ContextManager] | None = None) -> StackStep:
    """One call of the user's step; ``.grad`` is cleared again afterwards. ``extras``: more keys
    for each microbatch's dict (a pair objective's ``ref_logps``); ``watch``: a context made from
    the step's microbatch dicts, entered around the call (core/backwards.py)."""
    params = trainable(model)
    for _, p in params:
        p.grad = None
    dicts = batch_dicts(model, microbatches, device)
    for d, extra in zip(dicts, extras or ()):
        d.update(extra)
    try:
        with (watch or (lambda _: contextlib.nullcontext()))(dicts):
            returned = fn(model, dicts)
        gradient = [(n, None if p.grad is None else p.grad.detach().cpu().clone()) for n, p in params]
    finally:
        for _, p in params:
            p.grad = None
    notes = [] if any(g is not None for _, g in gradient) else ["the step function left no gradient in .grad"]
    return StackStep(gradient, _as_loss(returned), notes)


def _as_loss(value) -> float:
    """The function's return value as the step's loss, if it returned a number (else NaN)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan
