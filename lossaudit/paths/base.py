"""What a path is and what it produces. A path only measures: for each layout it returns
outcomes (a loss, a gradient, notes), and ``judge.py`` decides what they mean.

Two kinds:

- a ``LogitPath`` is fed the harness's own forward of each microbatch (one forward serves every
  logit path) and says which scalar it would backward there (a ``Contribution``); the harness
  takes the gradients, sums them over the step and measures each microbatch's weight;
- a ``StepPath`` runs a whole optimizer step its own way (Trainer, accelerate, a user's loop)
  and returns the step's gradient.

A path declares what it is with flags (``expected``, ``trains_aux``, ``calibrates``,
``formula``); the judge reads the flags, never the path's name. A path that cannot run a layout
raises (``Unavailable`` for a known limit, anything else for a failure): the guard in
``judge.py`` turns that into the layout's error case.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from ..core.backwards import Backwards
from ..core.layouts import Layout, Microbatch
from ..core.objective import Objective
from ..core.reductions import Reduction, StepTokens
from ..core.registry import Registry
from ..stacks.model_state import ModelState

if TYPE_CHECKING:
    from ..core.batch import Batch
    from ..core.grads import GradDiff
    from ..audit.config import CheckConfig
    from ..models.loading import LoadedModel
    from ..core.reference import Reference

GradientStream = Iterable[tuple[str, "torch.Tensor | None"]]


class Unavailable(Exception):
    """The code under audit cannot express this layout; the message is the one-line reason."""


@dataclass(frozen=True)
class AuditContext:
    """Everything a path needs, built once per run and never changed."""

    model: torch.nn.Module
    batch: "Batch"
    reference: "Reference | None"  # None on a spawned data-parallel rank (it only runs steps)
    params: list
    device: torch.device
    config: "CheckConfig | None"
    loaded: "LoadedModel | None" = None
    objective: Objective = Objective()  # what the reference and every reduction compute per token
    memory: Any = None  # on the CPU, audit.memory.ResidentMeter: what the process holds since the audit began


@dataclass(frozen=True)
class Label:
    """Which case an outcome is, and the flags the judge reads."""

    path: str
    reduction: str | None = None  # a reduction, recipe or user function's name
    expected: bool = False  # known to differ from the token mean: shown, never a finding
    trains_aux: bool = False  # trains the model's own loss: a MoE model's router aux loss included
    calibrates: bool = False  # lossaudit's own correct reduction: its error is the run's noise floor
    formula: Reduction | None = None  # the known reduction it computes (predicts its loss, and NaN)
    cause: str = ""  # for an expected label: why it differs (the reduction's doc)
    gradient_only: bool = False  # its loss is not comparable (GRPO at ratio 1): judged on its gradient alone


@dataclass
class Outcome:
    """What one path measured on one layout; nothing judged yet."""

    label: Label
    layout: Layout
    loss: float
    gradient: GradientStream  # the step's gradient, parameter by parameter
    note: str = ""  # facts the path knows about itself (what the library passed, ...)
    extra: dict = field(default_factory=dict)  # more report columns
    aux: float | None = None  # MoE: the router aux loss the step carried, when the path knows it
    weights: list[float] | None = None  # per microbatch, x the token-mean weight (logit paths)
    gradient_factor: float = 1.0  # the step's gradient is this x the stream (a sum shared by proportional paths)
    scale: float | None = None  # the gradient's scale from exact per-microbatch products (a 16-bit sum's own is rounded)
    projections: list[float] | None = None  # step paths: each microbatch's backward . the reference (core/backwards.py)
    loss_compared: bool = True  # False: the code under audit reported no loss (NaN); judged on its gradient alone
    # a step with a target of its own (a GRPO optimizer step: its window's declared gradient),
    # and, where the path knows what the step computed, its cause (None: causes.py names one)
    target: "Mapping[str, torch.Tensor] | None" = None
    cause: str | None = None
    # the comparison already made, block of parameters by block (harness.run_layout under a
    # memory budget): the gradient itself is gone then
    compared: "GradDiff | None" = None


@dataclass(frozen=True)
class Contribution:
    """What a logit path backwards on one microbatch: ``scale`` x d ``loss`` / d params."""

    loss: torch.Tensor  # a scalar with a graph to the parameters
    scale: float = 1.0
    aux: float | None = None  # MoE: router aux this microbatch carried, times its weight


@dataclass(frozen=True)
class MicrobatchView:
    """One microbatch as the harness ran it, shared by every logit path."""

    index: int
    mb: Microbatch
    outputs: Any  # the model's outputs (its own ``loss`` when a path asked for labels)
    losses: torch.Tensor  # (B, T') float64 per-target objective, 0 where no target
    token_sum: torch.Tensor  # losses.sum(): its gradient / N is this microbatch's correct share
    step: StepTokens
    num_items_rejected: bool  # the model's forward refused num_items_in_batch


class LogitPath:
    """A path fed by the harness's shared forward. One object is one label."""

    label = Label("")
    wants_labels = False  # ask the model for its own loss in the shared forward
    # for planning passes (passes.py), before any layout: the same weight on every microbatch
    # (it shares the correct reduction's sum); a loss of its own, with a backward of its own
    constant_weights = False
    own_backward = True

    def start(self, ctx: AuditContext, layout: Layout, step: StepTokens) -> None:
        """Before the layout's first microbatch (user code may run here: it is guarded)."""

    def microbatch(self, view: MicrobatchView) -> Contribution:
        raise NotImplementedError

    def uniform_weights(self) -> list[float] | None:
        """After ``start``: the scale ``microbatch`` will give the token sum on each microbatch,
        when known in advance. Paths whose weights are proportional share one gradient sum."""
        return None

    def note(self) -> str:
        """After the layout: facts for the detail."""
        return ""


class StepPath:
    """A path that runs a whole optimizer step its own way."""

    name = ""
    label = Label("")
    # runs the user's code on the model itself (a step function, a LightningModule): the model is
    # recorded before the first layout and put back after each (stacks/model_state.py)
    changes_model = False

    def run(self, ctx: AuditContext, layout: Layout) -> list[Outcome]:
        raise NotImplementedError

    cuts_backwards = False  # ``run`` resolves its own microbatches (sets Outcome.projections)

    def labels(self, layout: Layout) -> list[Label]:
        """The labels ``run`` returns on ``layout`` (an error case needs them when it raises)."""
        return [self.label]

    def run_resolved(self, ctx: AuditContext, layout: Layout) -> list[Outcome]:
        """``run`` in this process with each of its backwards cut and projected on the reference
        (core/backwards.py), so that its outcome carries a weight per microbatch, or a note why not."""
        if self.cuts_backwards or layout.world_size > 1 or ctx.reference is None:
            return self.run(ctx, layout)
        with Backwards(ctx.model, ctx.params, [ctx.reference.grads[n] for n, _ in ctx.params]) as watched:
            outcomes = self.run(ctx, layout)
        if len(outcomes) == 1 and outcomes[0].projections is None:
            o = outcomes[0]
            o.gradient = list(o.gradient)
            o.projections, why = watched.resolve(layout.microbatches, [g for _, g in o.gradient])
            o.note = "; ".join(x for x in (o.note, why) if x)
        return outcomes

    def run_layouts(self, ctx: AuditContext, layouts: list[Layout], guard, say: Callable[[str], None]) -> list:
        """Every layout of the run, each behind ``guard`` (judge.Guard), judged as it ends. A
        path that pays a start-up cost once per run (spawning data-parallel ranks) overrides this."""
        state = ModelState(ctx.model) if self.changes_model else None
        cases = []
        for i, layout in enumerate(layouts):
            say(f"[{i + 1}/{len(layouts)}] {self.label.path}: {layout.name}")
            try:
                cases += guard.step(self, ctx, layout)
            finally:
                if state is not None:
                    state.restore()
        return cases


@dataclass(frozen=True)
class PathSpec:
    name: str
    build: Callable[["CheckConfig"], "list[LogitPath] | list[StepPath]"]
    tasks: tuple[str, ...]  # tasks the path applies to
    doc: str = ""
    requires: tuple[str, ...] = ()  # optional packages the path imports (left out by default without them)
    # why the path cannot run under ``config`` (None: it can); default runs leave it out
    unavailable: Callable[["CheckConfig"], str | None] = lambda config: None
    # whether its code can compute an objective the run declares (--objective, a trainer class's):
    # under one other than the token mean, default runs leave out the paths that cannot
    declares: Callable[["CheckConfig", Objective], bool] = lambda config, objective: False

    def missing(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


PATHS: Registry[PathSpec] = Registry("path")
