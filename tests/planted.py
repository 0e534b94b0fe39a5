"""Planted bugs that the suite demands lossaudit finds."""

from lossaudit.reductions import StepTokens


def nanogpt(step: StepTokens):
    """nanoGPT's ``loss = loss / gradient_accumulation_steps`` on each microbatch's mean
    ("exact would have been a sum"): a user's reduction, audited like any other."""
    return [1.0 / (step.k * n) if n else float("inf") for n in step.counts]


def correct(step: StepTokens):
    """The right recipe: each microbatch's token sum over the step's token count."""
    return [1.0 / step.total] * step.k


class AuxLoop:
    """A user's MoE accumulation loop: cross entropy summed over the step's target count (right)
    plus coef * the model's aux loss times ``aux_weight(k)`` per microbatch. ``aux_weight=1``
    adds every microbatch's aux in full (the bug: k times the mean); ``1/k`` is the mean."""

    def __new__(cls, aux_weight):
        from lossaudit.aux import layout_aux
        from lossaudit.grads import GradAccumulator, compare_grads, grads_of
        from lossaudit.paths.base import LogitPath, Measurement

        class _AuxLoop(LogitPath):
            name = "planted-aux"

            def start(self, ctx, layout, step):
                self.ctx, self.layout, self.step = ctx, layout, step
                self.acc, self.loss, self.aux = GradAccumulator(ctx.params), 0.0, 0.0

            def microbatch(self, index, mb, outputs, losses, num_items_rejected):
                w = aux_weight(self.step.k)
                loss = losses.sum() / self.step.total + self.ctx.reference.aux.spec.coef * w * outputs.aux_loss
                self.acc.add(grads_of(loss, self.ctx.params))
                self.loss += float(loss.detach())
                self.aux += w * float(outputs.aux_loss.detach())

            def finish(self):
                target = layout_aux(self.ctx, self.layout)
                grads = compare_grads(target.target_grads(self.ctx.reference.grads), self.acc.items())
                return [Measurement(self.name, None, self.layout, self.loss, grads, self.step.counts,
                                    aux=self.aux, aux_target=target)]

        return _AuxLoop()

# A sweep auditor with planted failures, by model type; the other types are audited for real.
def sweep_auditor(job):
    import os
    import time

    from lossaudit.sweep import audit_model

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
