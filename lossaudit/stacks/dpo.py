"""``--trainer-class trl:DPOTrainer`` (issue 22): what one optimizer step of TRL's DPO needs, and
the objective it declares (``paths/trainer_class.py`` runs the step).

DPO's objective is a pair mean (``core/aggregation.PairMean``): per pair
``-log sigmoid(beta ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))``, each log-probability
the sum over the completion's tokens, averaged over the pairs. trl 1.16's ``DPOTrainer`` computes
it per microbatch as the mean over the microbatch's pairs and declares ``loss_is_scaled_for_ga =
False``, so the Trainer divides each microbatch by the accumulation steps: a mean of microbatch
pair means, the pair mean when the microbatches hold as many pairs each (the Trainer's fixed
per-device batch).

The class gets the pair batch (``core/pairs.py``) as the text rows its own dataset preparation
reads (``prompt``, ``chosen``, ``rejected``: token ``<i>`` is id i, words split on spaces, each
completion ending with EOS so that nothing is appended), ``per_device_train_batch_size`` counted in
pairs, and ``ref_model``: a frozen copy of the initial weights, as TRL builds its reference from
the policy's checkpoint (a tiny model has none to load it from). With
``--trainer-arg precompute_ref_log_probs=true`` TRL computes the same constants before the step.

Audited: the sigmoid loss (``loss_type`` sigmoid, the default) with the reverse-KL divergence,
no length-weighting (``ld_alpha``), WPO weighting or label smoothing; any other setting is refused
(exit 2) rather than judged against a loss it does not compute. trl 1.16 turns ``padding_free``
off with a warning (DPO's padding-free path is "temporarily unavailable"): the step then pads.
"""

from __future__ import annotations

import copy

import torch

from ..core.aggregation import DPO_BETA, PairMean
from ..core.errors import UsageError
from ..core.layouts import Layout
from ..core.pairs import microbatch_pairs, prompt_length

TRAINER = "DPOTrainer"
# DPOConfig fields whose non-default values compute another loss than the audited sigmoid pair mean
AUDITED = {"loss_type": ("sigmoid", ["sigmoid"]), "f_divergence_type": ("reverse_kl",), "ld_alpha": (None,),
           "use_weighting": (False,), "label_smoothing": (0, 0.0), "loss_weights": (None, [1.0], [1])}


def trains_pairs(cls: type) -> bool:
    return any(base.__name__ == TRAINER for base in cls.__mro__)


def declared_aggregation(user_args: dict) -> PairMean:
    """The objective DPOTrainer computes under ``user_args`` (--trainer-arg), or UsageError."""
    for key, allowed in AUDITED.items():
        if key in user_args and user_args[key] not in allowed:
            raise UsageError(f"--trainer-arg {key}={user_args[key]}: lossaudit audits DPO's sigmoid loss "
                             f"({key}={allowed[0]!r}); this setting computes another loss")
    beta = user_args.get("beta", DPO_BETA)
    try:
        return PairMean(beta)
    except ValueError as exc:
        raise UsageError(f"--trainer-arg beta={beta}: {exc}") from None


def pair_settings(settings: dict) -> dict:
    """The audit's Trainer settings with the per-device batch counted in pairs (TRL's unit)."""
    return {**settings, "per_device_train_batch_size": settings["per_device_train_batch_size"] // 2}


def _text(ids) -> str:
    return " ".join(f"<{int(i)}>" for i in ids)


def dataset_rows(ctx, layout: Layout) -> list[dict]:
    """The layout's pairs, microbatch by microbatch, as DPO's text rows."""
    out = []
    for group in layout.groups:
        for chosen, rejected in microbatch_pairs(len(group)):
            c, r = (ctx.batch.samples[group[i]] for i in (chosen, rejected))
            n = prompt_length(c)
            out.append({"prompt": _text(c.input_ids[:n]), "chosen": " " + _text(c.input_ids[n:]),
                        "rejected": " " + _text(r.input_ids[n:])})
    return out


def trainer_kwargs(model: torch.nn.Module) -> dict:
    """``ref_model``: the initial weights, frozen (TRL prepares it in evaluation mode)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return {"ref_model": ref}
