"""``lossaudit explain``: the reduction math on examples small enough to follow by hand.

Every number printed comes from the library's own computation (``tokens.token_losses``,
the ``REDUCTIONS`` registry's weights, the reference, the reduction path's gradients), so
the walkthrough shows what an audit does, not a re-derivation of it.

1. A three-token example as backpropagation tutorials give it (the softmax output P of a
   simplified GPT-2 in the online book chapter "How LLMs learn (3 of 4): Back propagation"):
   "AI rocks <EOS>", targets [rocks, <EOS>, none], loss 1.2639.
2. A bigram model whose logits table is log P (so it predicts exactly P), on three sequences
   cut into two microbatches holding 1 and 5 target tokens.
With ``--model``, step 2 runs on a real tiny model's batch instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..core.batch import Batch, BatchSpec, Sample, make_batch
from ..core.grads import GradDiff, trainable
from ..core.errors import UsageError
from .harness import run_layout
from .judge import Guard, Judge
from ..core.layouts import Layout, group
from ..models.loading import load_model
from ..paths.base import AuditContext
from ..paths.reduction import ReductionPath
from ..core.reductions import DEFAULT_REDUCTIONS, REDUCTIONS, Reduction
from ..core.reference import Reference, compute_reference, step_tokens
from ..core.tokens import IGNORE_INDEX, count_targets, target_mask, token_losses

VOCAB = ("AI", "rocks", "<EOS>")
AI, ROCKS, EOS = range(3)
# The example's softmax output: row t is the next-token distribution after position t.
P = torch.tensor([[0.4114, 0.2532, 0.3354], [0.2524, 0.4323, 0.3153], [0.3280, 0.2986, 0.3734]],
                 dtype=torch.float64)


@dataclass(frozen=True)
class SeedExample:
    labels: torch.Tensor  # (1, 3) as a causal LM holds them
    losses: list[float]  # -log p(target) per target token, from tokens.token_losses
    count: int  # tokens.count_targets
    loss: float


def seed_example() -> SeedExample:
    """Input [AI, rocks, <EOS>]; a causal LM's labels are the inputs, position t scoring t+1."""
    labels = torch.tensor([[IGNORE_INDEX, ROCKS, EOS]])  # nothing predicts the first token
    losses = token_losses(P.log()[None], labels, "causal-lm")  # softmax(log P) = P
    mask = target_mask(labels, "causal-lm")
    count = count_targets(labels, "causal-lm")
    return SeedExample(labels, [float(x) for x in losses[mask]], count, float(losses.sum()) / count)


class Bigram(torch.nn.Module):
    """logits[t] = W[token t]: with W = log P it reproduces the example's probabilities, and its
    gradient is a 3x3 table a person can read."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(P.log().clone())

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.W[input_ids])  # (B, T, 3)


def _sequence(ids: list[int], masked: int) -> Sample:
    ids_t = torch.tensor(ids)
    labels = ids_t.clone()
    labels[: max(masked, 1)] = IGNORE_INDEX
    return Sample(ids_t, labels)


def bigram_step() -> tuple[AuditContext, Layout]:
    """Three sequences, two microbatches: [1 target] and [2 + 3 targets]."""
    batch = Batch((
        _sequence([AI, ROCKS, EOS], masked=2),  # prompt "AI rocks" masked: only <EOS> is a target
        _sequence([AI, ROCKS, EOS], masked=1),
        _sequence([ROCKS, AI, ROCKS, EOS], masked=1),
    ), "causal-lm", pad_id=EOS)
    model = Bigram()
    params = trainable(model)
    reference = compute_reference(model, batch, params, torch.device("cpu"))
    ctx = AuditContext(model, batch, reference, params, torch.device("cpu"), config=None)
    return ctx, Layout(2, "contiguous", "right", ((0,), (1, 2)))


def model_step(name: str, *, seed: int = 0) -> tuple[AuditContext, Layout]:
    """A real tiny model's small batch, split into two microbatches of uneven target counts."""
    loaded = load_model(name, seed=seed)
    if loaded.task != "causal-lm":
        raise UsageError(f"explain --model needs a causal-lm model; {name!r} is {loaded.task}")
    model = loaded.model.to(torch.float32).train()
    batch = make_batch(BatchSpec(batch_size=4, max_length=10, min_length=4, seed=seed),
                       vocab_size=loaded.vocab_size, pad_id=loaded.pad_id)
    params = trainable(model)
    reference = compute_reference(model, batch, params, torch.device("cpu"))
    ctx = AuditContext(model, batch, reference, params, torch.device("cpu"), config=None, loaded=loaded)
    return ctx, Layout(2, "imbalanced", "right", group(batch, 2, "imbalanced"))


@dataclass
class SequenceWeights:
    microbatch: int  # 0-based
    sequence: int  # 0-based index in the batch
    losses: list[float]  # per target token, float64 from the reference's logits
    weights: dict[str, list[float]]  # reduction -> weight of each of those tokens


@dataclass
class Walkthrough:
    ctx: AuditContext
    layout: Layout
    counts: list[int]  # target tokens per microbatch
    microbatch_losses: list[float]  # token mean of each microbatch
    sequences: list[SequenceWeights]
    losses: dict[str, float]  # reduction -> the step's loss, from the reduction path's forward
    grads: dict[str, GradDiff]  # reduction -> gradient against the full-batch token mean
    step_grads: dict[str, list[torch.Tensor | None]]  # reduction -> accumulated gradient


def walk(ctx: AuditContext, layout: Layout, names=DEFAULT_REDUCTIONS) -> Walkthrough:
    reductions = [REDUCTIONS.get(n) for n in names]
    step_grads = {}
    measured = run_layout(ctx, layout, [ReductionPath.of(r) for r in reductions], Guard(Judge(ctx)),
                          lambda o: step_grads.setdefault(o.label.reduction, [None if g is None else g * o.gradient_factor
                                                                              for _, g in o.gradient]))
    measured = {m.label.reduction: m for m in measured}
    step = step_tokens(ctx.batch, layout)
    return Walkthrough(
        ctx, layout, step.counts, ctx.reference.microbatch_losses(ctx.batch, layout),
        _sequence_weights(ctx.batch, ctx.reference, layout, reductions),
        {n: measured[n].loss for n in names}, {n: measured[n].grads for n in names}, step_grads,
    )


def _sequence_weights(batch: Batch, reference: Reference, layout: Layout,
                      reductions: list[Reduction]) -> list[SequenceWeights]:
    """Each target token's weight under each reduction, read from the registry's weights."""
    step = step_tokens(batch, layout)
    per_token = {}
    for r in reductions:  # a float weight applies to every target token of its microbatch
        per_token[r.name] = [w * m.to(torch.float64) if not isinstance(w, torch.Tensor) else w.to(torch.float64)
                             for w, m in zip(r.weights(step), step.masks)]
    out = []
    for m, (indices, mask) in enumerate(zip(layout.groups, step.masks)):
        for row, i in enumerate(indices):
            own = target_mask(batch.samples[i].labels[None], batch.task)[0]
            out.append(SequenceWeights(
                m, i, [float(x) for x in reference.sequence_losses[i][own]],
                {name: [float(x) for x in w[m][row][mask[row]]] for name, w in per_token.items()},
            ))
    return out


# ---- text -------------------------------------------------------------------------------


def seed_text(ex: SeedExample) -> str:
    losses = iter(ex.losses)
    rows = []
    for t, token in enumerate((AI, ROCKS, EOS)):
        target = int(ex.labels[0, t + 1]) if t + 1 < ex.labels.shape[1] else IGNORE_INDEX
        if target == IGNORE_INDEX:
            rows.append(f"  {t + 1:<9}{VOCAB[token]:<8}{'(none)':<8}{'-':<11}-")
        else:
            loss = next(losses)
            rows.append(f"  {t + 1:<9}{VOCAB[token]:<8}{VOCAB[target]:<8}{math.exp(-loss):<11.4f}{loss:.4f}")
    terms = " + ".join(f"{x:.4f}" for x in ex.losses)
    return "\n".join([
        "1. One sequence: \"AI rocks <EOS>\", P from a worked example of backpropagation (the online",
        "   book chapter \"How LLMs learn (3 of 4): Back propagation\", a simplified GPT-2)",
        "",
        "  input [AI, rocks, <EOS>]; position t predicts token t+1, so the targets are",
        "  [rocks, <EOS>, none] and each target's loss is -log of the probability P gives it.",
        "",
        f"  {'position':<9}{'token':<8}{'target':<8}{'p(target)':<11}-log p",
        *rows,
        "",
        f"  target tokens N = {ex.count}",
        f"  loss = ({terms}) / {ex.count} = {ex.loss:.4f}",
    ])


def _token_name(ctx: AuditContext, token: int) -> str:
    return VOCAB[token] if isinstance(ctx.model, Bigram) else str(token)


def _targets(ctx: AuditContext, i: int) -> list[str]:
    sample = ctx.batch.samples[i]
    own = target_mask(sample.labels[None], ctx.batch.task)[0]
    return [_token_name(ctx, int(t)) for t in sample.labels[1:][own]]


def walkthrough_text(w: Walkthrough, title: str) -> str:
    names = list(w.losses)
    ctx = w.ctx
    out = [title, ""]
    for s in w.sequences:
        tokens = " ".join(_token_name(ctx, int(t)) for t in ctx.batch.samples[s.sequence].input_ids)
        out.append(f"  sequence {s.sequence + 1} (microbatch {s.microbatch + 1}): {tokens}"
                   f"  -> targets: {' '.join(_targets(ctx, s.sequence)) or '(none)'}")
    out += ["", f"  {'microbatch':<12}{'sequences':<12}{'target tokens':<15}token-mean loss"]
    for m, (indices, n, loss) in enumerate(zip(w.layout.groups, w.counts, w.microbatch_losses)):
        out.append(f"  {m + 1:<12}{', '.join(str(i + 1) for i in indices):<12}{n:<15}{loss:.4f}")
    out += [f"  N = {sum(w.counts)} target tokens in the step; full-batch token mean {ctx.reference.loss:.4f}", "",
            "  weight of each target token under each reduction (the registry's weights):",
            "  " + f"{'mb':<4}{'seq':<5}{'target':<8}{'loss':<9}" + "".join(f"{n:>15}" for n in names)]
    for s in w.sequences:
        for j, (target, loss) in enumerate(zip(_targets(ctx, s.sequence), s.losses)):
            out.append(f"  {s.microbatch + 1:<4}{s.sequence + 1:<5}{target:<8}{loss:<9.4f}"
                       + "".join(f"{s.weights[n][j]:>15.4f}" for n in names))
    out += ["", "  the step: loss = sum of weight x token loss; gradient against the full-batch token mean",
            f"  {'reduction':<16}{'sum of weights':>15}{'loss':>10}{'grad rel err':>14}{'cosine':>9}{'scale':>9}"]
    for n in names:
        total = sum(sum(s.weights[n]) for s in w.sequences)
        g = w.grads[n]
        out.append(f"  {n:<16}{total:>15.4f}{w.losses[n]:>10.4f}{g.rel_err:>14.2e}{g.cosine:>9.4f}{g.scale:>9.4f}")
    return "\n".join(out + [""] + why_text(w))


def percent(x: float) -> str:
    """A relative error as a percentage with two significant digits and no exponent: 0.00016 is
    0.016%, not 0.0%; 0.45 is 45%; 80 is 8000%."""
    value = 100 * x
    if value == 0 or not math.isfinite(value):
        return f"{value:g}%"
    return f"{value:.{max(0, 1 - math.floor(math.log10(abs(value))))}f}%"


def why_text(w: Walkthrough) -> list[str]:
    """Why mean_of_means moves the gradient, in this step's own numbers."""
    if "mean_of_means" not in w.losses or "num_items" not in w.losses:
        return []
    lines = ["  why mean_of_means moves the gradient:"]
    for m, n in enumerate(w.counts):
        first = next((s for s in w.sequences if s.microbatch == m and s.losses), None)
        if first is None:
            lines.append(f"    microbatch {m + 1} holds no target token: its token mean is 0/0 (NaN)")
            continue
        mom, right = first.weights["mean_of_means"][0], first.weights["num_items"][0]
        lines.append(f"    each of the {n} token(s) of microbatch {m + 1} weighs {mom:.4f} = 1/(k x {n}) "
                     f"instead of 1/N = {right:.4f}: {mom / right:.2f}x")
    g = w.grads["mean_of_means"]
    lines += [
        "    The gradient is the same weighted sum of per-token gradients, sum_t w_t grad(loss_t), so",
        "    tokens in microbatches with few targets pull harder and the gradient turns:",
        f"    cosine {g.cosine:.4f} with the token mean's gradient.",
        f"    The loss is {w.losses['mean_of_means']:.4f} against {w.ctx.reference.loss:.4f} "
        f"({percent(abs(w.losses['mean_of_means'] / w.ctx.reference.loss - 1))} off); the gradient is "
        f"{percent(g.rel_err)} off: watch gradients, not only loss curves.",
    ]
    if "sum" in w.grads:
        s = w.grads["sum"]
        lines.append(f"    sum only rescales every weight (cosine {s.cosine:.4f}, {s.scale:.4g}x): a learning-rate "
                     "change, not a reweighting.")
    lines.append("    With equal target counts per microbatch every mean_of_means weight is 1/N and nothing moves.")
    return lines


def gradient_table(w: Walkthrough, name: str) -> str:
    """The bigram's 3x3 gradient dL/dW under one reduction (rows: current token)."""
    (grad,) = w.step_grads[name]
    head = f"  {name:<16}" + "".join(f"{v:>10}" for v in VOCAB)
    rows = [f"  {'after ' + VOCAB[i]:<16}" + "".join(f"{float(x):>10.4f}" for x in grad[i]) for i in range(3)]
    return "\n".join([head, *rows])
