"""What each GRPO ``loss_type`` declares, the float64 reference of every optimizer step against
that declaration, and the cause of a step that misses it (``stacks/grpo.py`` runs TRL's trainer).

At ratio 1 (every step runs on the weights its rollouts were scored with) each loss type's
per-token loss has the gradient of ``-c * A_i * log p(token)`` (``c`` = 1, or ``min(1,
epsilon_high)`` for ``cispo``, whose clipped weight is detached; the KL term of ``beta`` has zero
gradient where the policy is its reference). The loss types differ in how they aggregate the
tokens of an optimizer step's window of k microbatches: a per-token weight, the same for every
token of a sequence. The reference is that weighted sum, computed here from the model's logits
(divided by the temperature, as TRL does) in float64, one backward per window. Each row is placed
as TRL's forward placed it: its prompt after the pads TRL put before it (the generation batch's
prompts left-padded to the longest), positions counted from the first column (TRL passes no
position ids), the pads masked; so the logits aggregated are TRL's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.errors import UsageError
from ..core.forward import forward
from ..core.backwards import ADDS_UP
from ..core.grads import GradDiff, compare_grads, dots, grads_of
from ..core.layouts import Layout, Microbatch, pad
from ..core.tokens import IGNORE_INDEX, token_losses
from ..audit.tolerance import Tolerance, deviations
from ..audit.config import parse_value
from ..core.batch import Batch
from ..stacks.trl import resolve_trainer_class
from ..stacks.grpo import LOSS_TYPES, PROMPT_LENGTHS, Rollouts, draw_rollouts, grpo_problems, is_grpo
from .base import Label, Outcome, StepPath
from .grpo_step import default_loss_type, generations, max_completion_length, plan, run_grpo, settings_for

# weights(microbatches, lengths, max_completion_length) -> per-token weight of each sequence of
# the window, in window order (microbatches: the sequence ids of each microbatch)
Weights = Callable[[list[list[int]], list[int], int], list[float]]


def _token_mean(mbs, lengths, _max_len):
    n = sum(lengths[i] for mb in mbs for i in mb)
    return [1.0 / n for mb in mbs for _ in mb]


def _sequence_mean(mbs, lengths, _max_len):
    s = sum(len(mb) for mb in mbs)
    return [1.0 / (s * lengths[i]) for mb in mbs for i in mb]


def _microbatch_mean(mbs, lengths, _max_len):
    return [1.0 / (len(mbs) * sum(lengths[j] for j in mb)) for mb in mbs for _ in mb]


def _sum_over_sequences_x_length(mbs, _lengths, max_len):
    s = sum(len(mb) for mb in mbs)
    return [1.0 / (s * max_len) for mb in mbs for _ in mb]


def _sequence_sum_mean(mbs, _lengths, _max_len):
    s = sum(len(mb) for mb in mbs)
    return [1.0 / s for mb in mbs for _ in mb]


@dataclass(frozen=True)
class Declaration:
    aggregation: str  # short name, as --objective spells it where it can
    describe: str  # what the loss type computes over one optimizer step's window
    weights: Weights
    token_mean: bool = False  # the window's token mean (what a window error is measured against)


TOKEN_MEAN = Declaration("token-mean", "the token mean over the optimizer window", _token_mean, token_mean=True)
SEQUENCE_MEAN = Declaration("sequence-mean", "a mean of per-sequence token means over the window", _sequence_mean)
DECLARATIONS = {
    "dapo": TOKEN_MEAN,
    "cispo": TOKEN_MEAN,
    "vespo": TOKEN_MEAN,
    "grpo": SEQUENCE_MEAN,
    "sapo": SEQUENCE_MEAN,
    "bnpo": Declaration("microbatch-mean", "a mean of microbatch token means (TRL: 'the local batch')",
                        _microbatch_mean),
    "dr_grpo": Declaration("sum-over", "a token sum over a constant, sequences x max_completion_length",
                           _sum_over_sequences_x_length),
    "luspo": Declaration("sum-over", "a mean of per-sequence token sums (a sum over the window's sequences)",
                         _sequence_sum_mean),
}


assert set(DECLARATIONS) == set(LOSS_TYPES)


def declaration(loss_type: str) -> Declaration:
    problems = grpo_problems({"loss_type": loss_type})
    if problems:
        raise UsageError(*problems)
    return DECLARATIONS[loss_type]


def coefficient(config) -> float:
    """The per-token loss's factor on ``-A log p`` at ratio 1."""
    if config.loss_type == "cispo":
        high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
        return min(1.0, float(high))
    return 1.0


def describe(config) -> str:
    d = declaration(config.loss_type)
    constant = f" = {config.max_completion_length}" if config.loss_type == "dr_grpo" else ""
    scale = coefficient(config)
    factor = f"{scale:g} x " if scale != 1.0 else ""
    return f"GRPO loss_type={config.loss_type}: per token -{factor}A log p, {d.describe}{constant}"


def declared_weights(microbatches: list[list[int]], rollouts, config) -> list[float]:
    """The per-token weight of each sequence of the window (in window order) the loss type declares."""
    return declaration(config.loss_type).weights(microbatches, rollouts.completion_lengths(),
                                                 config.max_completion_length)


def trl_rows(rollouts, seqs: list[int], left_pads: dict[int, int] | None) -> Microbatch:
    """The sequences ``seqs`` as TRL's forward gets them: ``left_pads[i]`` pads, the prompt, the
    completion, right pads to the longest row; the pads masked; positions 0, 1, ... from the first
    column (TRL passes no position ids, so the model counts them from there); the completion the
    target."""
    left_pads = left_pads or {}
    pad_id = rollouts.batch.pad_id
    rows, labels = [], []
    for i in seqs:
        sample, n = rollouts.batch.samples[i], left_pads.get(i, 0)
        rows.append(torch.cat([torch.full((n,), pad_id, dtype=sample.input_ids.dtype), sample.input_ids]))
        labels.append(torch.cat([torch.full((n,), IGNORE_INDEX, dtype=sample.labels.dtype), sample.labels]))
    mask = pad([torch.cat([torch.zeros(left_pads.get(i, 0), dtype=torch.long),
                           torch.ones(len(rollouts.batch.samples[i].input_ids), dtype=torch.long)]) for i in seqs],
               0, "right")
    positions = torch.arange(mask.shape[1]).expand_as(mask).clone()
    return Microbatch(pad(rows, pad_id, "right"), mask, positions, pad(labels, IGNORE_INDEX, "right"))


def reference_gradient(ctx, rollouts, microbatches: list[list[int]], weights: list[float], config,
                       left_pads: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The gradient of sum_i weights_i x -c A_i sum_t log p(token) over the window's sequences,
    in float64 from the model's logits (one forward and backward of the window, each row placed
    as TRL placed it: ``trl_rows``)."""
    seqs = [i for mb in microbatches for i in mb]
    mb = trl_rows(rollouts, seqs, left_pads)
    outputs, _ = forward(ctx.model, mb, ctx.device)
    logits = outputs.logits / config.temperature if config.temperature != 1.0 else outputs.logits
    per_sequence = token_losses(logits, mb.labels.to(ctx.device), "causal-lm").sum(dim=1)  # -sum log p, (S,)
    advantages = rollouts.advantages[seqs].to(per_sequence)
    w = torch.tensor(weights, dtype=torch.float64).to(per_sequence)
    loss = coefficient(config) * (w * advantages * per_sequence).sum()
    grads = grads_of(loss, ctx.params, retain_graph=False)
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(ctx.params, grads)}


@dataclass(frozen=True)
class Cause:
    """A way a token-mean window can be normalised wrong: per microbatch, the count it divides
    its token sum by, from the generation batch's num_items_in_batch (N), k and
    steps_per_generation."""

    name: str
    divisor: Callable[[int, int, int], float]  # (N, k, steps_per_generation) -> count


WINDOW_CAUSES = (
    Cause("each microbatch divided by its generation batch's average target tokens per window "
          "(num_items_in_batch x k / steps_per_generation)", lambda n, k, spg: n * k / spg),
    Cause("each microbatch divided by its whole generation batch's target tokens (num_items_in_batch), "
          "not its window's", lambda n, k, spg: float(n)),
)


def cause_weights(cause: Cause, microbatches: list[list[int]], num_items: list, config) -> list[float] | None:
    """The per-token weights ``cause`` gives the window, or None where a microbatch had no count."""
    if any(n is None for n in num_items) or len(num_items) != len(microbatches):
        return None
    k, spg = config.gradient_accumulation_steps, config.steps_per_generation
    return [1.0 / cause.divisor(n, k, spg) for mb, n in zip(microbatches, num_items) for _ in mb]


@dataclass
class StepCase:
    """One optimizer step of a GRPO run against its loss type's declaration."""

    step: int  # 0-based, in the run
    microbatches: list[list[int]]  # sequence ids
    tokens: list[int]  # completion tokens per microbatch
    diff: GradDiff
    target: dict[str, torch.Tensor]  # the declared gradient
    cause: str = ""  # for a step that misses: what it computed, where a candidate fits
    weights: list[float] | None = None  # each microbatch's backward against its declared share (None: not resolved)
    unresolved: str = ""  # why not


def microbatch_weights(ctx, rollouts, window, backwards: list[dict], declared: list[float], config,
                       left_pads) -> tuple[list[float] | None, str]:
    """Each microbatch's weight: the least-squares scale of its backward's gradient against its
    correct share (the declared gradient of the window's sequences it held, float64), 1 for a
    step that reaches its declaration; (None, why) where the step's backwards are not one per
    microbatch or do not add up to its update."""
    k, names = len(window.microbatches), [n for n, _ in ctx.params]
    if len(backwards) != k:
        return None, (f"per-microbatch weights not resolved: the step ran {len(backwards)} backwards over {k} "
                      "microbatches (one backward per microbatch is what can be cut)")
    update = dict(window.update)
    parts = [[g.get(n) for n in names] for g in backwards]
    summed = [sum(x for x in col if x is not None) if any(x is not None for x in col) else None for col in zip(*parts)]
    step = [update.get(n) for n in names]
    left, added = dots(step, step), dots(summed, step)
    if not left or abs(added / left - 1.0) > ADDS_UP:
        return None, (f"per-microbatch weights not resolved: the step changed .grad outside its backwards (its "
                      f"backwards add up to {added / left if left else float('nan'):.4g}x its update)")
    weights, start = [], 0
    for mb, part in zip(window.microbatches, parts):
        share = reference_gradient(ctx, rollouts, [mb], declared[start:start + len(mb)], config, left_pads)
        start += len(mb)
        c = [share[n] for n in names]
        weights.append(dots(part, c) / dots(c, c))
    return weights, ""


def gradient_deviation(diff: GradDiff, weights: list[float] | None = None) -> dict[str, float]:
    return {k: v for k, v in deviations(0.0, diff, weights).items() if k != "loss"}


def judge_steps(ctx, rollouts, run, tolerance: Tolerance) -> list[StepCase]:
    """Every step of ``run`` (stacks.grpo.GRPORun) against its declared gradient; a step that
    misses a token-mean declaration is tested against each of WINDOW_CAUSES."""
    config, lengths = run.config, rollouts.completion_lengths()
    cases, k = [], config.gradient_accumulation_steps
    for s, window in enumerate(run.steps):
        declared = declared_weights(window.microbatches, rollouts, config)
        target = reference_gradient(ctx, rollouts, window.microbatches, declared, config, run.left_pads)
        diff = compare_grads(target, window.update)
        case = StepCase(s, window.microbatches, [sum(lengths[i] for i in mb) for mb in window.microbatches], diff, target)
        case.weights, case.unresolved = microbatch_weights(ctx, rollouts, window, run.backwards[s * k:(s + 1) * k],
                                                           declared, config, run.left_pads)
        if tolerance.exceeded(gradient_deviation(diff, case.weights)):
            case.cause = step_cause(ctx, rollouts, window, config, case, tolerance, run.left_pads,
                                    generation_tokens(run, lengths, s))
        cases.append(case)
    return cases


def generation_tokens(run, lengths: list[int], step: int) -> list[int]:
    """The target tokens of the generation batch each microbatch of optimizer step ``step`` came
    from (steps_per_generation x num_iterations consecutive microbatches of the run share one),
    counted from the drawn completions: what num_items_in_batch should hold."""
    config = run.config
    k, span = config.gradient_accumulation_steps, config.steps_per_generation * config.num_iterations
    every = [mb for window in run.steps for mb in window.microbatches]
    out = []
    for j in range(step * k, step * k + len(run.steps[step].microbatches)):
        g = j // span
        out.append(sum(lengths[i] for i in {i for mb in every[g * span:(g + 1) * span] for i in mb}))
    return out


def step_cause(ctx, rollouts, window, config, case: StepCase, tolerance: Tolerance, left_pads=None,
               generation: list[int] | None = None) -> str:
    d = declaration(config.loss_type)
    tokens = sum(case.tokens)
    if d.token_mean:
        for cause in WINDOW_CAUSES:
            weights = cause_weights(cause, window.microbatches, window.num_items, config)
            if weights is None:
                continue
            fit = compare_grads(reference_gradient(ctx, rollouts, window.microbatches, weights, config, left_pads),
                                window.update)
            if not tolerance.exceeded(gradient_deviation(fit)):
                counts = sorted(set(window.num_items))
                k, spg = config.gradient_accumulation_steps, config.steps_per_generation
                spans = (f" (a mean of the window's {k // spg} generation batches' token means)"
                         if cause is WINDOW_CAUSES[0] and spg < k and k % spg == 0 else "")
                miscount = ""
                if generation is not None and list(window.num_items) != list(generation):
                    real = sorted(set(generation))
                    miscount = (f"num_items_in_batch {counts[0] if len(counts) == 1 else counts} is not the target "
                                f"tokens of its generation batch ({real[0] if len(real) == 1 else real}): the count "
                                "handed to the loss is wrong; with it, ")
                return (f"{miscount}{cause.name}{spans}: num_items_in_batch={counts[0] if len(counts) == 1 else counts}, "
                        f"k={config.gradient_accumulation_steps}, steps_per_generation={config.steps_per_generation}; "
                        f"the window holds {tokens} target tokens: gradient {case.diff.scale:.4g}x its own token mean")
    weights = (f"; each microbatch's gradient x its declared share: [{', '.join(f'{w:.4g}' for w in case.weights)}]"
               if case.weights else "")
    return (f"the step is {case.diff.scale:.4g}x {d.describe} (1 - cosine {1 - case.diff.cosine:.2g}){weights}; "
            f"the window holds {tokens} target tokens in {len(case.tokens)} microbatches {case.tokens}")


def rollouts_for(config, loaded, user_args: dict) -> Rollouts:
    """The run's rollouts, from the seed: enough prompts for every k of the run, prompts of
    PROMPT_LENGTHS tokens, completions of ``--min-length - 2 .. --max-length - 6`` tokens (at most
    TRL's max_completion_length)."""
    spec, b = config.batch_spec, config.batch_spec.batch_size
    ks = [k for k in config.ks if b % k == 0] or [1]
    g = generations(user_args, [b // k * int(user_args.get("steps_per_generation") or k) for k in ks])
    prompts = max(plan(k, b // k, user_args, g).prompts for k in ks)
    limit = int(user_args.get("max_completion_length") or max_completion_length())
    longest = max(2, min(spec.max_length - PROMPT_LENGTHS[1], limit))
    return draw_rollouts(prompts=prompts, generations=g, vocab_size=loaded.vocab_size, pad_id=loaded.pad_id,
                         eos_id=loaded.eos_id, max_completion=longest,
                         min_completion=min(longest, max(2, spec.min_length - PROMPT_LENGTHS[0])), seed=spec.seed)


class GRPOPath(StepPath):
    """``--trainer-class`` naming TRL's GRPOTrainer (or a subclass): one run of the trainer per k
    (B/k completions per microbatch, k accumulation steps), every optimizer step a case judged
    against its own window's declared gradient. The loss a policy-gradient step reports at ratio 1
    (the advantages' weighted mean, not a function of the log-probabilities) is shown, not judged."""

    name = "trainer"

    def __init__(self, trainer_class: type, user_args: dict):
        self.trainer_class, self.user_args = trainer_class, user_args
        self.loss_type = user_args.get("loss_type") or default_loss_type(trainer_class)
        problems = grpo_problems({**user_args, "loss_type": self.loss_type})
        if problems:
            raise UsageError(*problems)
        self.label = Label("trainer", f"{trainer_class.__name__}:{self.loss_type}", gradient_only=True)

    def run_layouts(self, ctx, layouts, guard, say):
        b = ctx.config.batch_spec.batch_size  # completions per optimizer step
        rollouts = rollouts_for(ctx.config, ctx.loaded, self.user_args)
        cases = []
        for k in sorted({layout.microbatches for layout in layouts}):
            say(f"trainer: {self.trainer_class.__name__} loss_type={self.loss_type}, k={k}")
            whole = Layout(k, "trl-generation", "right", (tuple(range(len(ctx.batch))),), 1)  # for an error case
            if any(layout.world_size > 1 for layout in layouts):
                cases.append(guard.judge.failed(self.label, whole, f"--trainer-class {self.trainer_class.__name__} "
                                                                   "runs in one process (--world-size 1)"))
                continue
            if b % k:
                cases.append(guard.judge.failed(self.label, whole, f"{b} completions do not split into {k} "
                                                                   "microbatches of one size"))
                continue
            outcomes, reason = guard.call(f"the {self.trainer_class.__name__} step at k={k}", self.outcomes,
                                          ctx, rollouts, k, b // k)
            if reason is not None:
                cases.append(guard.judge.failed(self.label, whole, reason))
                continue
            cases += [guard.judge.measure(o) for o in outcomes]
        return cases

    def outcomes(self, ctx, rollouts: Rollouts, k: int, per_device: int) -> list[Outcome]:
        user = {**self.user_args, "loss_type": self.loss_type, "num_generations": rollouts.generations}
        shape = plan(k, per_device, user, rollouts.generations)
        run = run_grpo(ctx, self.trainer_class, rollouts, settings_for(ctx, k, per_device, shape.steps), user)
        tolerance = Tolerance.measure(str(ctx.params[0][1].dtype).removeprefix("torch."), [])
        cases = judge_steps(ctx, rollouts, run, tolerance)
        config, out = run.config, []
        for case, window in zip(cases, run.steps):
            layout = Layout(k, f"trl-step{case.step + 1}of{len(cases)}", "right",
                            tuple(tuple(mb) for mb in case.microbatches), 1)
            extra = {"objective": describe(config), "aggregation": declaration(config.loss_type).aggregation,
                     "optimizer_step": case.step + 1, "steps_per_generation": config.steps_per_generation,
                     "num_generations": config.num_generations, "trainer_num_items": window.num_items,
                     "reference_loss": math.nan, "microbatch_losses": [math.nan] * k, "logged_loss": run.logged_loss}
            note = case.unresolved
            out.append(Outcome(self.label, layout, math.nan, list(window.update), note=note, extra=extra,
                               target=case.target, cause=case.cause or None, weights=case.weights))
        return out


def grpo_batch(config, loaded) -> Batch | None:
    """The run's batch when ``--trainer-class`` names a GRPO trainer: its rollouts' prompt +
    completion sequences (the completion scored), else None."""
    if not config.trainer_class:
        return None
    trainer_class = resolve_trainer_class(config.trainer_class)
    if not is_grpo(trainer_class):
        return None
    return rollouts_for(config, loaded, {k: parse_value(v) for k, v in config.trainer_args}).batch
