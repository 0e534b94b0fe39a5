"""What a path is, what it measures, and the registry of paths."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..grads import GradDiff
from ..layouts import Layout, Microbatch
from ..objective import Objective
from ..registry import Registry

if TYPE_CHECKING:
    from ..aux import LayoutAux
    from ..batch import Batch
    from ..config import CheckConfig
    from ..models import LoadedModel
    from ..reference import Reference
    from ..reductions import StepTokens


@dataclass
class Measurement:
    """One case before judgement: what a path computed on one layout."""

    path: str
    reduction: str | None
    layout: Layout
    loss: float
    grads: GradDiff | None
    counts: list[int]  # target tokens per microbatch
    expected: bool = False
    note: str = ""  # facts the path knows about itself, for the detail
    error: str | None = None  # the path raised: a one-line reason, the case is an error
    fault: str | None = None  # the first non-finite tensor the harness saw in this layout (logits)
    extra: dict = field(default_factory=dict)

    @classmethod
    def failed(cls, path: str, layout: Layout, batch: "Batch", reason: str) -> "Measurement":
        """The error case of a path that raised on ``layout``."""
        counts = batch.group_targets(layout.groups)
        return cls(path=path, reduction=None, layout=layout, loss=float("nan"), grads=None,
                   counts=counts, error=reason)
    # MoE: the aux loss this step carried (sum of each microbatch's aux times the weight the
    # path gave it), when the path knows it, and the layout's aux target when the path's
    # objective includes the router aux loss (then it is judged against CE + coef * mean aux)
    aux: float | None = None
    aux_target: "LayoutAux | None" = None


@dataclass
class AuditContext:
    """Everything a path needs, built once per run."""

    model: torch.nn.Module
    batch: "Batch"
    reference: "Reference"
    params: list
    device: torch.device
    config: "CheckConfig"
    loaded: "LoadedModel | None" = None
    aux_target: "tuple[Layout, LayoutAux] | None" = None  # the latest layout's, see aux.layout_aux
    objective: Objective = Objective()  # what the reference and every reduction compute per token


class LogitPath:
    """A path fed by the harness's own forward of each microbatch (one forward serves all)."""

    name = ""
    wants_labels = False  # ask the model for its own loss in the shared forward

    def start(self, ctx: AuditContext, layout: Layout, step: "StepTokens") -> None:
        raise NotImplementedError

    def microbatch(self, index: int, mb: Microbatch, outputs, losses: torch.Tensor, num_items_rejected: bool) -> None:
        raise NotImplementedError

    def finish(self) -> list[Measurement]:
        raise NotImplementedError


class StepPath:
    """A path that runs a whole optimizer step its own way (Trainer, accelerate, ...)."""

    name = ""
    with_aux = True  # the step trains on the model's own loss, a MoE router aux loss included

    def run(self, ctx: AuditContext, layout: Layout) -> list[Measurement]:
        raise NotImplementedError

    def target(self, ctx: AuditContext, layout: Layout) -> "tuple[Mapping, LayoutAux | None]":
        """What a correct step on ``layout`` equals: the gradient to compare with, and the aux
        target to set on its Measurement (None unless a MoE model trains with its aux loss)."""
        from ..aux import layout_aux

        aux = layout_aux(ctx, layout) if self.with_aux else None
        return (aux.target_grads(ctx.reference.grads) if aux else ctx.reference.grads), aux

    def run_layouts(self, ctx: AuditContext, layouts: list[Layout], say: Callable[[str], None]) -> list[Measurement]:
        """Every layout of the run. A path that pays a start-up cost once per run (spawning
        data-parallel ranks) overrides this; the default runs one layout after another."""
        measurements = []
        for i, layout in enumerate(layouts):
            say(f"[{i + 1}/{len(layouts)}] {self.name}: {layout.name}")
            measurements += self.run_guarded(ctx, layout)
        return measurements

    def run_guarded(self, ctx: AuditContext, layout: Layout) -> list[Measurement]:
        """``run``, with an exception turned into this layout's error case (the run goes on);
        out of memory and lossaudit's own errors still end the run."""
        from ..faults import must_propagate, one_line

        try:
            return self.run(ctx, layout)
        except Exception as exc:
            if must_propagate(exc):
                raise
            return [Measurement.failed(self.name, layout, ctx.batch, f"{self.name} path raised: {one_line(exc)}")]


@dataclass(frozen=True)
class PathSpec:
    name: str
    build: Callable[["CheckConfig"], LogitPath | StepPath]
    tasks: tuple[str, ...]  # tasks the path applies to
    doc: str = ""
    requires: tuple[str, ...] = ()  # optional packages the path imports (left out by default without them)

    def missing(self) -> list[str]:
        import importlib.util

        return [name for name in self.requires if importlib.util.find_spec(name) is None]
    # why the path cannot run under ``config`` (None: it can); default runs leave it out
    unavailable: Callable[["CheckConfig"], str | None] = lambda config: None


PATHS: Registry[PathSpec] = Registry("path")
