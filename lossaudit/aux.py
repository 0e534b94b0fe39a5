"""Router auxiliary (load-balancing) losses of mixture-of-experts models.

A MoE model is audited the way it is trained: ``output_router_logits=True``, so its loss is
cross entropy + coef * aux. The two parts are judged apart:

- the cross-entropy part must match the float64 token-mean reference exactly;
- the aux part of an accumulated step should be the **mean over microbatches** of each
  microbatch's aux loss. It cannot equal the full-batch aux exactly: the loss is a product of
  two batch averages (expert load x router probability), not a sum over tokens. That inherent
  gap is shown as information; a step that carries k times the mean (each microbatch's aux
  added in full, as a loop that sums the model's losses does) is a finding.

So a case is compared with its *accumulation target*: the CE reference plus coef times the
layout's mean aux, and its gradient with the CE reference gradient plus coef times the
gradient of that mean. lossaudit computes the aux itself, in float64, from the router logits
(Switch Transformer eqs. 4-6, normalised as transformers does); it never reads the model's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from .grads import GradAccumulator, Params, grads_of

if TYPE_CHECKING:
    from .layouts import Layout, Microbatch
    from .paths.base import AuditContext

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True, slots=True)
class AuxSpec:
    coef: float  # router_aux_loss_coef
    num_experts: int
    top_k: int


def aux_spec(model: torch.nn.Module) -> AuxSpec | None:
    """The router aux loss a model trains with, or None for a model without one."""
    config = getattr(model, "config", None)
    coef = getattr(config, "router_aux_loss_coef", None)
    experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not coef or not experts or not isinstance(top_k, int) or not hasattr(config, "output_router_logits"):
        return None
    return AuxSpec(float(coef), experts, top_k)


def router_logits(outputs) -> tuple[torch.Tensor, ...] | None:
    logits = getattr(outputs, "router_logits", None)
    if not logits or not all(isinstance(t, torch.Tensor) for t in logits):
        return None
    return tuple(logits)


def load_balancing_loss(logits: Sequence[torch.Tensor], attention_mask: torch.Tensor, spec: AuxSpec) -> torch.Tensor:
    """num_experts * sum_e f_e * P_e over every layer's non-padding tokens, in float64.

    f_e: share of top-k assignments that go to expert e (summing to top_k, as transformers
    normalises it); P_e: mean router probability of e. ``logits``: per layer (B*T, E).
    """
    keep = attention_mask.reshape(-1).to(device=logits[0].device, dtype=torch.float64)  # (B*T,)
    assigned = torch.zeros(spec.num_experts, dtype=torch.float64, device=keep.device)
    probability = torch.zeros_like(assigned)
    for layer in logits:
        probs = layer.reshape(-1, spec.num_experts).to(torch.float64).softmax(dim=-1)  # (B*T, E)
        chosen = F.one_hot(probs.topk(spec.top_k, dim=-1).indices, spec.num_experts).sum(dim=1)  # (B*T, E)
        assigned = assigned + (chosen.to(torch.float64) * keep[:, None]).sum(dim=0)
        probability = probability + (probs * keep[:, None]).sum(dim=0)
    rows = keep.sum() * len(logits)
    return spec.num_experts * ((assigned / rows) * (probability / rows)).sum()


@dataclass
class ReferenceAux:
    """The full batch's aux loss and coef times its gradient."""

    spec: AuxSpec
    value: float
    grads: dict[str, torch.Tensor]


def reference_aux(outputs, attention_mask: torch.Tensor, spec: AuxSpec | None, params: Params) -> ReferenceAux | None:
    logits = router_logits(outputs) if spec else None
    if logits is None:
        return None
    aux = load_balancing_loss(logits, attention_mask, spec)
    grads = grads_of(spec.coef * aux, params)
    return ReferenceAux(spec, float(aux.detach()),
                        {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(params, grads)})


class SummedGrads(Mapping):
    """reference[name] + extra[name], made one tensor at a time (no second full copy)."""

    def __init__(self, first: Mapping, second: Mapping):
        self.first, self.second = first, second

    def __getitem__(self, name):
        return self.first[name] + self.second[name].to(self.first[name])

    def __iter__(self):
        return iter(self.first)

    def __len__(self):
        return len(self.first)


@dataclass
class LayoutAux:
    """What a correct accumulated step carries for the aux loss on one layout."""

    coef: float
    microbatch: list[float]  # each microbatch's aux loss
    full: float  # the full batch's aux loss (the reference objective's)
    grads: dict[str, torch.Tensor]  # coef * gradient of the mean over microbatches
    gap_grad: float  # |grads - full-batch aux grads| / |full-batch aux grads|: inherent, information

    @property
    def mean(self) -> float:
        return sum(self.microbatch) / len(self.microbatch)

    @property
    def contribution(self) -> float:
        return self.coef * self.mean

    @property
    def gap(self) -> float:
        """Mean over microbatches against the full batch: inherent, information only."""
        return self.mean / self.full - 1.0 if self.full else math.nan

    def target_grads(self, reference_grads: Mapping) -> Mapping:
        return SummedGrads(reference_grads, self.grads)


class AuxAccumulator:
    """Builds a LayoutAux from the router logits of each microbatch's forward."""

    def __init__(self, ctx: "AuditContext", k: int):
        self.ref, self.params, self.k = ctx.reference.aux, ctx.params, k
        self.acc = GradAccumulator(ctx.params)
        self.values: list[float] = []

    def add(self, outputs, mb: "Microbatch") -> None:
        logits = router_logits(outputs)
        if logits is None:
            raise RuntimeError("the model returned router logits on the full batch but not on a microbatch")
        aux = load_balancing_loss(logits, mb.attention_mask, self.ref.spec)
        self.acc.add(grads_of(aux, self.params), self.ref.spec.coef / self.k)
        self.values.append(float(aux.detach()))

    def result(self) -> LayoutAux:
        from .grads import compare_grads

        grads = {n: torch.zeros_like(self.ref.grads[n]) if g is None else g for n, g in self.acc.items()}
        gap = compare_grads(self.ref.grads, grads.items()).rel_err
        return LayoutAux(self.ref.spec.coef, self.values, self.ref.value, grads, gap)


def layout_aux(ctx: "AuditContext", layout: "Layout") -> LayoutAux | None:
    """The layout's aux target: the one the shared forward built, else from a forward of each
    microbatch here (for step paths, which run the model their own way)."""
    if ctx.reference.aux is None:
        return None
    if ctx.aux_target is not None and ctx.aux_target[0] == layout:
        return ctx.aux_target[1]
    from .forward import forward
    from .layouts import microbatches

    acc = AuxAccumulator(ctx, len(layout.groups))  # world_size * k microbatches: DDP averages the ranks
    for mb in microbatches(ctx.batch, layout):
        outputs, _ = forward(ctx.model, mb, ctx.device)
        acc.add(outputs, mb)
    ctx.aux_target = (layout, acc.result())
    return ctx.aux_target[1]


def carried_aux(m, reference) -> tuple[float, bool]:
    """(aux the step carried, inferred?): the path's own account, else what the loss implies
    when its cross-entropy part is the reference's."""
    if m.aux is not None:
        return m.aux, False
    return (m.loss - reference.loss) / m.aux_target.coef, True


def aux_fields(m, reference) -> dict:
    """The report's aux columns for a case judged with the router aux loss (none otherwise)."""
    t = m.aux_target
    if t is None:
        return {}
    carried, inferred = carried_aux(m, reference)
    return {
        "ce_loss": m.loss - t.coef * carried, "reference_ce_loss": reference.loss,
        "aux_loss": carried, "aux_inferred": inferred, "layout_aux_loss": t.mean,
        "microbatch_aux_losses": list(t.microbatch), "reference_aux_loss": t.full, "aux_coef": t.coef,
        "aux_gap": t.gap, "aux_grad_gap": t.gap_grad,
    }


def aux_info(m, reference) -> str:
    """The aux numbers for a case's detail, the inherent gap marked as information."""
    t = m.aux_target
    carried, inferred = carried_aux(m, reference)
    return (f"aux: step carried {carried:.6g}{' (inferred from the loss)' if inferred else ''}, "
            f"mean over microbatches {t.mean:.6g}, full batch {t.full:.6g}; inherent gap {t.gap:+.2%} "
            f"(gradient {t.gap_grad:.1e}), information, not a finding")
