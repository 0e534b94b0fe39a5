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
from typing import Sequence

import torch
import torch.nn.functional as F

from .accumulate import GradientSum, Hooks
from .grads import Params, compare_grads, grads_of

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
    grads: dict[str, torch.Tensor] | None  # coef * gradient of the mean over microbatches (None: released)
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
    """Builds a LayoutAux from the router logits of each microbatch's forward (all ranks'
    microbatches: DDP averages the ranks, so the step's aux is their mean). The aux loss's
    gradient goes straight from the backward into one GradientSum (accumulate.py), through the
    hooks the caller holds on the parameters: no working gradient of the whole model."""

    def __init__(self, ref: ReferenceAux, params: Params, k: int):
        self.ref, self.params, self.k = ref, params, k
        self.sum = GradientSum(params)
        self.values: list[float] = []

    def hooks(self) -> Hooks:
        """Hooks for a caller that holds none (the judge's own forwards)."""
        return Hooks(self.params, [self.ref.grads[n] for n, _ in self.params])

    def add(self, outputs, attention_mask: torch.Tensor, hooks: Hooks) -> None:
        logits = router_logits(outputs)
        if logits is None:
            raise RuntimeError("the model returned router logits on the full batch but not on a microbatch")
        aux = load_balancing_loss(logits, attention_mask, self.ref.spec)
        hooks.backward(aux, [(self.sum, self.ref.spec.coef / self.k)])
        self.values.append(float(aux.detach()))

    def result(self) -> LayoutAux:
        unit = self.sum.unit or 1.0  # the sum holds unit x its tensors: scaled in place, once
        grads = {n: torch.zeros_like(self.ref.grads[n]) if g is None else g.mul_(unit) for n, g in self.sum.items()}
        self.sum.unit = 1.0
        gap = compare_grads(self.ref.grads, grads.items()).rel_err
        return LayoutAux(self.ref.spec.coef, self.values, self.ref.value, grads, gap)


def carried_aux(loss: float, aux: float | None, reference_loss: float, coef: float) -> tuple[float, bool]:
    """(aux the step carried, inferred?): the path's own account, else what the loss implies
    when its cross-entropy part is the reference's."""
    if aux is not None:
        return aux, False
    return (loss - reference_loss) / coef, True
