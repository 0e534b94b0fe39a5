"""A model wrapped in a PEFT adapter, as the core sees it (duck-typed: no peft import). What
it scores and why is told in ``stacks/peft.py``, which builds and loads the adapters."""

from __future__ import annotations

import torch

# methods that prepend virtual tokens to the input embeddings (and -100s to the labels)
PREPENDING = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def is_peft_model(model: torch.nn.Module) -> bool:
    """Duck-typed, so callers need not import peft: a PeftModel has an active adapter config."""
    return getattr(model, "active_peft_config", None) is not None


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under the adapter (``model`` itself when it is not wrapped): its
    forward signature says which inputs it takes, since PeftModel.forward takes ``**kwargs``."""
    return model.get_base_model() if is_peft_model(model) else model


def virtual_tokens(model: torch.nn.Module) -> int:
    """Positions the wrapped model prepends to the inputs and, as -100, to the labels (0 for an
    unwrapped model and for methods that prepend nothing)."""
    if not is_peft_model(model):
        return 0
    config = model.active_peft_config
    kind = getattr(config.peft_type, "value", config.peft_type)
    return int(config.num_virtual_tokens) if kind in PREPENDING else 0
