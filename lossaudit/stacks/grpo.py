"""TRL's ``GRPOTrainer`` on rollouts drawn from the seed: what ``--trainer-class trl:GRPOTrainer``
runs (``paths/grpo.py`` judges it).

The audit does not depend on sampling. ``draw_rollouts`` draws P prompts of varied length (TRL
left-pads them to the longest of the generation batch) with G completions each, of varied length
and ending with EOS, and one advantage per completion. TRL gets them
through its own ``rollout_func`` hook (prompt and completion ids, no sampling log-probs), a reward
function that returns the drawn advantages as rewards (so TRL's scoring runs), and, after its
scoring, the drawn advantages themselves on the generation batch, with each row's sequence id
beside them (``lossaudit_seq``, a tensor TRL shuffles and splits with the rest). Everything else is
TRL's own: its sampler, its generation batch of ``steps_per_generation`` microbatches, the old
log-probabilities it keeps, ``num_items_in_batch``, the loss and its normalisation.

Every optimizer step of the run is read (``probe.StepUpdates``, SGD lr 1): the weights are put back
after each step, so each step sees the weights its rollouts were scored with (ratio 1) and its
gradient is ``J^T`` of the per-token loss ``-A_i * log p`` under the loss type's aggregation.
Which sequences each microbatch held, and how many pads TRL put before each prompt, are read
from ``compute_loss``'s inputs (the reference places each row as TRL's forward did).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ..core.batch import FIRST_TOKEN_ID, Batch, Sample
from ..core.tokens import IGNORE_INDEX

# the loss types whose declaration lossaudit knows (paths/grpo.py: DECLARATIONS): trl 1.9.0 .. 1.16.0's
LOSS_TYPES = ("bnpo", "cispo", "dapo", "dr_grpo", "grpo", "luspo", "sapo", "vespo")
# settings that change the per-token loss beyond -c A log p at ratio 1: the reference does not model them
UNMODELLED = {
    "top_entropy_quantile": (lambda v: float(v) < 1.0, "masks tokens by their entropy"),
    "entropy_coef": (lambda v: float(v) != 0.0, "adds an entropy bonus"),
    "use_adaptive_entropy": (lambda v: bool(v), "adds an entropy bonus"),
    "use_vllm": (lambda v: bool(v), "samples with vLLM (the audit gives the completions itself)"),
}
SEQ_KEY = "lossaudit_seq"  # the generation batch's column of sequence ids
PROMPT_LENGTHS = (2, 6)  # shortest, longest prompt drawn: TRL left-pads them to the longest of the generation batch


@dataclass(frozen=True)
class Rollouts:
    """P prompts x G completions: sequence ``p * G + g`` is prompt p's g-th completion."""

    batch: Batch  # prompt + completion ids; labels -100 on the prompt (the completion is scored)
    advantages: torch.Tensor  # (P * G,) float32, as TRL holds them
    generations: int

    @property
    def prompts(self) -> int:
        return len(self.batch) // self.generations

    def prompt_ids(self, p: int) -> list[int]:
        sample = self.batch.samples[p * self.generations]
        return sample.input_ids[sample.labels == IGNORE_INDEX].tolist()

    def completion_ids(self, i: int) -> list[int]:
        sample = self.batch.samples[i]
        return sample.input_ids[sample.labels != IGNORE_INDEX].tolist()

    def completion_lengths(self) -> list[int]:
        return [int((s.labels != IGNORE_INDEX).sum()) for s in self.batch.samples]


def draw_rollouts(*, prompts: int, generations: int, vocab_size: int, pad_id: int, eos_id: int | None,
                  max_completion: int, seed: int, min_completion: int = 2,
                  prompt_lengths: tuple[int, int] = PROMPT_LENGTHS) -> Rollouts:
    """Prompts of ``prompt_lengths[0]..prompt_lengths[1]`` tokens, completions of
    ``min_completion..max_completion`` tokens (the last EOS when the model has one), advantages
    centred within each group; no pad id in the text."""
    g = torch.Generator().manual_seed(seed)
    avoid = {pad_id} | ({eos_id} if eos_id is not None else set())
    ok = [t for t in range(FIRST_TOKEN_ID, vocab_size) if t not in avoid]

    def ids(n: int) -> torch.Tensor:
        return torch.tensor(ok)[torch.randint(0, len(ok), (n,), generator=g)]

    samples, advantages = [], []
    for _ in range(prompts):
        prompt = ids(int(torch.randint(prompt_lengths[0], prompt_lengths[1] + 1, (1,), generator=g)))
        for _ in range(generations):
            length = int(torch.randint(min_completion, max_completion + 1, (1,), generator=g))
            completion = ids(length)
            if eos_id is not None:
                completion[-1] = eos_id
            labels = torch.cat([torch.full((len(prompt),), IGNORE_INDEX), completion])
            samples.append(Sample(torch.cat([prompt, completion]), labels))
        group = torch.randn(generations, generator=g, dtype=torch.float64)
        advantages.append(group - group.mean())
    return Rollouts(Batch(tuple(samples), "causal-lm", pad_id), torch.cat(advantages).float(), generations)


def is_grpo(cls: type) -> bool:
    """``cls`` is TRL's GRPOTrainer or a subclass of it."""
    return any(base.__name__ == "GRPOTrainer" and base.__module__.startswith("trl") for base in cls.__mro__)


def grpo_problems(user_args: dict, aggregation=None) -> list[str]:
    """What a GRPO audit refuses before any model is built: a loss type lossaudit does not know, a
    setting its reference does not model, an --objective (the loss type declares the aggregation)."""
    problems = []
    loss_type = user_args.get("loss_type")
    if loss_type is not None and loss_type not in LOSS_TYPES:
        problems.append(f"--trainer-arg loss_type={loss_type}: lossaudit does not know what it declares "
                        f"(known: {', '.join(LOSS_TYPES)})")
    for key, (applies, why) in UNMODELLED.items():
        try:
            refused = key in user_args and applies(user_args[key])
        except (TypeError, ValueError):
            refused = False  # not a value of the right kind: GRPOConfig says so
        if refused:
            problems.append(f"--trainer-arg {key}={user_args[key]}: it {why}, which lossaudit's GRPO reference "
                            "does not model")
    if aggregation is not None:
        problems.append(f"--objective {aggregation.spec}: a GRPO trainer declares its aggregation by its loss_type "
                        "(--trainer-arg loss_type=...)")
    return problems


def prompt_text(p: int) -> str:
    return f"prompt {p}"


def sequence_ids(prompts: list[str], generations: int) -> list[int]:
    """The sequence id of each row of a generation batch: TRL repeats each prompt G times in a
    row; the n-th time prompt p appears in the batch is its completion n mod G."""
    seen: dict[str, int] = {}
    out = []
    for text in prompts:
        n = seen.get(text, 0)
        seen[text] = n + 1
        out.append(int(text.removeprefix("prompt ")) * generations + n % generations)
    return out


def rollout_func(rollouts: Rollouts):
    """TRL's ``rollout_func(prompts, trainer)``: the drawn prompt and completion ids, no sampling
    log-probabilities."""

    def rollout(prompts, trainer=None):
        seqs = sequence_ids(list(prompts), rollouts.generations)
        return {"prompt_ids": [rollouts.prompt_ids(i // rollouts.generations) for i in seqs],
                "completion_ids": [rollouts.completion_ids(i) for i in seqs], "logprobs": None}

    return rollout


def reward_func(rollouts: Rollouts):
    """A reward function with fixed outputs: each completion's drawn advantage."""

    def advantage_reward(prompts, completions, **kwargs):
        return [float(rollouts.advantages[i]) for i in sequence_ids(list(prompts), rollouts.generations)]

    return advantage_reward


_SUBCLASSES: dict[type, type] = {}


def audit_subclass(cls: type) -> type:
    """``cls`` taking the drawn advantages after its scoring and recording which sequences each
    ``compute_loss`` call held (``self.seen_seqs``, one list per microbatch, in order) and the
    pads TRL put before each sequence's prompt (``self.left_pads``: sequence id -> count)."""
    if cls not in _SUBCLASSES:
        class Audited(cls):
            def _generate_and_score_completions(self, inputs):
                out = super()._generate_and_score_completions(inputs)
                seqs = torch.tensor(sequence_ids([x["prompt"] for x in inputs], self.lossaudit_rollouts.generations))
                out["advantages"] = self.lossaudit_rollouts.advantages[seqs].to(out["advantages"].device)
                out[SEQ_KEY] = seqs.to(out["advantages"].device)
                return out

            def compute_loss(self, model, inputs, *args, **kwargs):
                self.seen_seqs.append([int(i) for i in inputs[SEQ_KEY]])
                pads = (inputs["prompt_mask"] == 0).sum(dim=1).tolist()
                self.left_pads.update((int(i), int(n)) for i, n in zip(inputs[SEQ_KEY], pads))
                self.seen_num_items.append(inputs.get("num_items_in_batch"))
                return super().compute_loss(model, inputs, *args, **kwargs)

        Audited.__name__ = Audited.__qualname__ = f"Audited{cls.__name__}"
        _SUBCLASSES[cls] = Audited
    return _SUBCLASSES[cls]


@contextlib.contextmanager
def silenced_experimental():
    was = os.environ.get("TRL_EXPERIMENTAL_SILENCE")
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("TRL_EXPERIMENTAL_SILENCE", None)
        else:
            os.environ["TRL_EXPERIMENTAL_SILENCE"] = was


