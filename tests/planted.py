"""Planted bugs that the suite demands lossaudit finds."""

from lossaudit.paths import Contribution, Label, LogitPath
from lossaudit.core.reductions import StepTokens


def nanogpt(step: StepTokens):
    """nanoGPT's ``loss = loss / gradient_accumulation_steps`` on each microbatch's mean
    ("exact would have been a sum"): a user's reduction, audited like any other."""
    return [1.0 / (step.k * n) if n else float("inf") for n in step.counts]


def correct(step: StepTokens):
    """The right recipe: each microbatch's token sum over the step's token count."""
    return [1.0 / step.total] * step.k


class AuxLoop(LogitPath):
    """A user's MoE accumulation loop: cross entropy summed over the step's target count (right)
    plus coef * the model's aux loss times ``aux_weight(k)`` per microbatch. ``aux_weight=1``
    adds every microbatch's aux in full (the bug: k times the mean); ``1/k`` is the mean.
    A path outside the package only says what it backwards: the harness and judge do the rest."""

    label = Label("planted-aux", trains_aux=True)

    def __init__(self, aux_weight):
        self.aux_weight = aux_weight

    def start(self, ctx, layout, step):
        self.coef, self.w = ctx.reference.aux.spec.coef, self.aux_weight(step.k)

    def microbatch(self, view):
        aux = view.outputs.aux_loss
        loss = view.token_sum / view.step.total + self.coef * self.w * aux
        return Contribution(loss, aux=self.w * float(aux.detach()))

# A sweep auditor with planted failures, by model type; the other types are audited for real.
def sweep_auditor(job):
    import os
    import time

    from lossaudit.sweep.run import audit_model

    if job.model_type == "llama":  # a crash that takes the whole process down
        os.abort()
    if job.model_type == "gpt2":  # a hang
        time.sleep(3600)
    if job.model_type == "mixtral":  # eats memory past the worker's cap
        hog = [bytearray(256 << 20) for _ in range(64)]
        return hog
    return audit_model(job)

# Planted accelerate recipes: (model, inputs, labels, task, counts) -> the loss given to
# accelerator.backward. See lossaudit.paths.accelerate.

def _token_sum(model, inputs, labels, task):
    from lossaudit.paths.accelerate import token_sum

    return token_sum(model, inputs, labels, task)


def unnormalised_sum(model, inputs, labels, task, counts):
    """The token sum of each microbatch, never divided by a token count."""
    return _token_sum(model, inputs, labels, task)


def per_rank_mean(model, inputs, labels, task, counts):
    """Each rank divides by its own token count (the count is never gathered): right on one
    process, wrong as soon as ranks hold different numbers of targets and DDP averages them."""
    return _token_sum(model, inputs, labels, task) * counts.k / counts.local


def _shifted_token_losses(outputs, labels):
    """Per-token cross entropy of a causal LM's logits, summed: (sum, target count)."""
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1).to(flat.device)
    total = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum()


def loss_ignoring_num_items(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func that takes num_items_in_batch and ignores it: each microbatch's mean."""
    total, count = _shifted_token_losses(outputs, labels)
    return total / count


def loss_with_num_items(outputs, labels, num_items_in_batch=None):
    """The correct compute_loss_func: the microbatch's token sum over the step's token count."""
    total, count = _shifted_token_losses(outputs, labels)
    return total / (num_items_in_batch if num_items_in_batch is not None else count)


def loss_raising_on_rank_1(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func that fails on data-parallel rank 1 only (RANK as launchers set it)."""
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("planted failure in compute_loss_func on rank 1")
    return loss_with_num_items(outputs, labels, num_items_in_batch)


def llama_ignoring_num_items():
    """A Llama whose forward takes num_items_in_batch, so the Trainer passes it, and drops it:
    each microbatch's loss is its own token mean."""
    from transformers import LlamaForCausalLM

    class LlamaIgnoringNumItems(LlamaForCausalLM):
        # named loss_kwargs: how 4.46.0 recognised a model that takes num_items_in_batch
        def forward(self, *args, num_items_in_batch=None, **loss_kwargs):
            return super().forward(*args, **loss_kwargs)

    return LlamaIgnoringNumItems


def loss_divided_by_gas_again(outputs, labels, num_items_in_batch=None):
    """The correct loss divided once more by the accumulation steps (nanoGPT's habit kept in a
    compute_loss_func): the Trainer does not divide a compute_loss_func's loss, and under DeepSpeed
    it turns the engine's own division off (scale_wrt_gas=False), so this is the only one: 1/k."""
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin
    steps = plugin.deepspeed_config["gradient_accumulation_steps"] if plugin else 1
    return loss_with_num_items(outputs, labels, num_items_in_batch) / steps


def one_process_count(model, inputs, labels, task, counts):
    """Right on one process and without accumulation: the token sum over the step's gathered
    target count, passed to accelerator.backward as it is. accelerate's backward divides by k (under
    DeepSpeed the engine does: scale_wrt_gas) and the ranks are averaged: 1/(k x world size)."""
    return _token_sum(model, inputs, labels, task) / counts.total


class Reweighted1pct:
    """Mixin for a Trainer subclass (a framework's, by class: tests/trainer_classes_*.py), planted
    bug, small: 1 % of the step's weight moved from its last microbatch to its first (the step's
    total unchanged where the two hold as many targets): what bf16 must still find."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        k = self.args.gradient_accumulation_steps
        index = getattr(self, "_planted_index", 0) % k
        self._planted_index = index + 1
        scale = 1.01 if (k > 1 and index == 0) else 0.99 if (k > 1 and index == k - 1) else 1.0
        return (out[0] * scale, out[1]) if return_outputs else out * scale
