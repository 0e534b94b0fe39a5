"""Precision told apart from normalisation.

The reference is float64 from the model's logits. A step that takes its cross entropy on the
model's own 16-bit logits (litgpt's ``bf16-true``, any loss without ``logits.float()``) rounds
its log-softmax: on bf16 its gradient comes out a few tenths of a percent below the float32 one,
at every k. Read as a normalisation, that looks like a miscounted denominator.

So, in a 16-bit run, the reference is also taken in the step's own precision, where it is cheap:
one forward and backward of the full batch with the log-softmax in the model's dtype. A case
whose deviation is what that gives (its scale, its direction, each microbatch's weight) is named
a precision finding; at k > 1 the normalisation is then judged against the same step's own k = 1,
whose precision it shares (judge.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..core.accumulate import SIXTEEN_BIT
from ..core.forward import forward
from ..core.grads import dots, grads_of
from ..core.layouts import full_batch
from ..core.tokens import prepend_ignored, target_mask, token_losses
from ..core.wrapped import virtual_tokens
from .tolerance import Tolerance

if TYPE_CHECKING:
    from ..paths.base import AuditContext
    from .judge import Measured


@dataclass(frozen=True)
class PrecisionReference:
    """The token mean with the log-softmax in ``dtype``, against the float64 reference."""

    dtype: str
    scale: float  # its gradient's least-squares scale against the reference
    direction: float  # its 1 - cosine with the reference
    loss_ratio: float  # its loss over the reference's

    def describe(self) -> str:
        below = (1.0 - self.scale) * 100
        return (f"cross entropy on {self.dtype} logits: its gradient is {abs(below):.2g} % "
                f"{'below' if below > 0 else 'above'} float32's (the rounding of a {self.dtype} "
                f"log-softmax, not a count); upcast the logits (logits.float()) before the loss")


def precision_reference(ctx: "AuditContext") -> PrecisionReference | None:
    """The reference in the model's own precision, or None when the model is not 16-bit or its
    logits are not (a model that upcasts them itself has nothing to tell apart)."""
    dtype = next((p.dtype for _, p in ctx.params), torch.float32)
    if dtype not in SIXTEEN_BIT or ctx.reference is None:
        return None
    mb = full_batch(ctx.batch)
    outputs, _ = forward(ctx.model, mb, ctx.device)
    if outputs.logits.dtype not in SIXTEEN_BIT:
        return None
    labels = prepend_ignored(mb.labels, virtual_tokens(ctx.model)).to(ctx.device)
    losses = token_losses(outputs.logits, labels, ctx.batch.task, label_smoothing=ctx.objective.label_smoothing,
                          dtype=outputs.logits.dtype)
    count = int(target_mask(labels, ctx.batch.task).sum())
    loss = losses.double().sum() / count
    grads = grads_of(loss, ctx.params, retain_graph=False)
    g = [x for x in grads]
    r = [ctx.reference.grads[n] for n, _ in ctx.params]
    gr, gg, rr = dots(g, r), dots(g, g), dots(r, r)
    if not (gg and rr) or not ctx.reference.loss:
        return None
    return PrecisionReference(str(outputs.logits.dtype).removeprefix("torch."), gr / rr,
                             1.0 - gr / math.sqrt(gg * rr), float(loss.detach()) / ctx.reference.loss)


def fits(m: "Measured", p: PrecisionReference, tol: Tolerance) -> bool:
    """What ``m`` measured is what the reference in ``p``'s precision gives: its scale, its
    direction and each microbatch's weight (the loss of a 16-bit step rounds too coarsely to tell)."""
    g = m.grads
    if g is None or not (math.isfinite(g.scale) and math.isfinite(g.cosine)):
        return False
    t = tol.tolerances
    if abs(p.scale - 1.0) <= t["scale"] and p.direction <= t["direction"]:
        return False  # the precision's own deviation is within tolerance: it explains no finding
    if abs(g.scale / p.scale - 1.0) > t["scale"] or 1.0 - g.cosine > t["direction"] + p.direction:
        return False
    return all(abs(w / p.scale - 1.0) <= t["weights"] for w in m.weights or ())


def relative(m: "Measured", single: "Measured") -> "Measured":
    """``m`` measured against its own step at k = 1 (whose precision it shares): its weights and
    scale over that step's scale, its loss over that step's loss ratio."""
    s1 = single.grads.scale
    l1 = single.loss / single.target_loss if single.target_loss else 1.0
    return dataclasses.replace(m, loss=m.loss / l1 if l1 else m.loss,
                               grads=dataclasses.replace(m.grads, scale=m.grads.scale / s1),
                               weights=[w / s1 for w in m.weights] if m.weights else m.weights)


def loss_resolution(tol: Tolerance, dtype: str) -> Tolerance:
    """``tol`` with the loss's noise at least a tenth of ``dtype``'s epsilon: a loss computed in a
    16-bit dtype is good to its epsilon, so a cause's loss is fitted no closer (causes._loss_fits)."""
    eps = torch.finfo(getattr(torch, dtype)).eps
    return dataclasses.replace(tol, loss_noise=max(tol.loss_noise, eps / 10))
