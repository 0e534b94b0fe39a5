"""The run's objective in one line, as the terminal header and the report's reference sentence
say it (plain text over the report's ``model`` fields: no torch, no pandas)."""

from __future__ import annotations


def says_it_whole(model: dict) -> bool:
    """The objective's own text names its aggregation too (GRPO's loss types: a policy-gradient
    term, judged on the gradient of each optimizer step; ``aggregation_doc`` empty)."""
    return model.get("aggregation_doc") == ""


def objective_line(model: dict) -> str:
    """What the run's paths compute, in one line: the aggregation of the per-token objective, or
    the objective's own text where it says both (``aggregation_doc`` empty: GRPO's loss types)."""
    if says_it_whole(model):
        return f"{model.get('objective')} ({model.get('aggregation')})"
    return f"{model.get('aggregation_doc')} ({model.get('aggregation')}) of {model.get('objective')}"
