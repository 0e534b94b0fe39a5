"""DeepSpeed ZeRO under the Trainer and accelerate on N ranks (issue 24).

What the user chooses: ``--data-parallel zero1|zero2|zero3`` (lossaudit writes the config: the
stage and ``"auto"`` for the micro batch, the accumulation steps and clipping, which the Trainer
fills in from the audit's own settings: B/k, k and no clipping), or their own DeepSpeed config
through ``--trainer-arg deepspeed=ds_config.json`` (the Trainer path).

How the gradient is read: ZeRO keeps flattened fp32 partitions and steps its optimizer on them
(stage 1 and 2 partition the optimizer state and gradients, stage 3 the parameters too), so an
optimizer hook on the model's parameters sees nothing of the update. ``FullGradients`` wraps
``DeepSpeedEngine.step`` while a step runs: at the accumulation boundary, after the window's
last backward (the ranks' gradients are reduced then) and before the optimizer steps, every
rank reads every parameter's whole gradient with ``deepspeed.utils.safe_get_full_grad`` (a
collective: an all-reduce of the fragments on stages 1-2, an all-gather on stage 3; every rank
reads every parameter in the same order). The gradient read is what SGD(lr=1) without
clipping would apply; the optimizer and a clipping the user's config sets are not part of it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..core.grads import trainable
from . import require

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}  # --data-parallel values that mean DeepSpeed ZeRO


def zero_config(stage: int, *, k: int | None = None, micro_batch: int | None = None) -> dict:
    """The DeepSpeed config lossaudit writes for ``--data-parallel zeroN``. For the Trainer,
    "auto" lets it fill in what the audit sets (micro batch B/k, k accumulation steps, clipping
    off); accelerate fills nothing in without a prepared dataloader, so the accelerate path gives
    ``k`` and ``micro_batch``. ZeRO steps a client optimizer (SGD) only when allowed."""
    return {
        "train_micro_batch_size_per_gpu": "auto" if micro_batch is None else micro_batch,
        "gradient_accumulation_steps": "auto" if k is None else k,
        "gradient_clipping": "auto" if k is None else 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
    }


def stage_of(config) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a dict or a JSON file), None when it is unreadable."""
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else None


def problems(config) -> list[str]:
    """What ``--data-parallel zeroN`` and ``--trainer-arg deepspeed=...`` can be audited with, told
    before any model is built."""
    wrapper = getattr(config, "data_parallel", "ddp")
    own = dict(config.trainer_args).get("deepspeed")
    if wrapper not in ZERO_STAGES and own is None:
        return []
    what = f"--data-parallel {wrapper}" if wrapper in ZERO_STAGES else "--trainer-arg deepspeed"
    found = []
    if wrapper in ZERO_STAGES and own is not None:
        found.append(f"--data-parallel {wrapper} and --trainer-arg deepspeed: give one (lossaudit's ZeRO config, "
                     f"or your own)")
    if not (isinstance(config.world_size, int) and config.world_size > 1):
        found.append(f"{what}: DeepSpeed runs on ranks here; give --world-size 2 or more")
    allowed = ("trainer", "accelerate") if wrapper in ZERO_STAGES else ("trainer",)
    others = [p for p in (config.paths or ()) if p not in allowed]
    if config.paths is None:
        found.append(f"{what}: runs on --path {' or --path '.join(allowed)}; select it")
    elif others:
        found.append(f"{what}: runs on --path {' or --path '.join(allowed)}, not --path {','.join(others)}")
    if config.dtype == "float64":
        found.append(f"{what}: DeepSpeed trains float32, bfloat16 or float16 parameters, not --dtype float64")
    if own is not None:
        found += _own_config_problems(own)
    if not found:
        require("deepspeed", what)  # exit 3, naming the extra
    return found


def _own_config_problems(own) -> list[str]:
    if isinstance(own, str) and not Path(own).is_file():
        return [f"--trainer-arg deepspeed={own}: no such file"]
    try:
        config = json.loads(Path(own).read_text()) if isinstance(own, str) else own
    except (OSError, ValueError) as exc:
        return [f"--trainer-arg deepspeed={own}: not readable as JSON ({exc})"]
    if not isinstance(config, dict):
        return [f"--trainer-arg deepspeed={own}: not a JSON object"]
    if (config.get("fp16") or {}).get("enabled") in (True, "true", "auto"):
        # the gradient is read before the step, where fp16's loss scale is still in it
        return [f"--trainer-arg deepspeed={own}: fp16 (dynamic loss scaling) is not audited: the gradient is read "
                f"before the optimizer step unscales it; set fp16.enabled false (bf16 and fp32 are)"]
    return []


class FullGradients:
    """The whole gradient each DeepSpeed engine held at its accumulation boundary, read just
    before its optimizer step (see the module's doc). ``UpdateProbe``'s interface: ``watch`` is
    a no-op (the engine, not the optimizer, is watched), ``gradient()`` the last step's gradient
    (None everywhere if no step ran), ``steps`` how many optimizer steps the engines took."""

    def __init__(self, model: torch.nn.Module):
        self.params = trainable(model)
        self.names = [n for n, _ in self.params]
        self.steps = 0
        self.read: dict[str, torch.Tensor | None] | None = None
        self._patch = contextlib.ExitStack()
        self._patch.enter_context(self._engine_step_wrapped())

    @contextlib.contextmanager
    def _engine_step_wrapped(self):
        from deepspeed.runtime.engine import DeepSpeedEngine

        original = DeepSpeedEngine.step
        reader = self

        def step(engine, *args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                reader.steps += 1
                reader.read = reader._full(engine)
            return original(engine, *args, **kwargs)

        DeepSpeedEngine.step = step
        try:
            yield
        finally:
            DeepSpeedEngine.step = original

    def _full(self, engine) -> dict[str, torch.Tensor | None]:
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in engine.module.named_parameters():  # the same order on every rank
            if not p.requires_grad:
                continue
            g = safe_get_full_grad(p)
            out[name] = None if g is None else g.detach().to("cpu", copy=True).view(_full_shape(p))
        return out

    def watch(self, optimizer) -> None:  # the engine is watched, not the optimizer
        pass

    def gradient(self) -> list[tuple[str, torch.Tensor | None]]:
        read = self.read or {}
        return [(n, read.get(n)) for n in self.names]

    def restore(self) -> None:
        """Stop watching. The model was trained (ZeRO-3 partitioned it): it is never reused."""
        self._patch.close()


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    """A parameter's whole shape (ZeRO-3 keeps it in ``ds_shape``; ``p.shape`` is a stub)."""
    return getattr(p, "ds_shape", None) or p.shape
