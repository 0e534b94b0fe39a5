"""Planted bugs that the suite demands lossaudit finds."""

from lossaudit.reductions import StepTokens


def nanogpt(step: StepTokens):
    """nanoGPT's ``loss = loss / gradient_accumulation_steps`` on each microbatch's mean
    ("exact would have been a sum"): a user's reduction, audited like any other."""
    return [1.0 / (step.k * n) if n else float("inf") for n in step.counts]


def correct(step: StepTokens):
    """The right recipe: each microbatch's token sum over the step's token count."""
    return [1.0 / step.total] * step.k
