"""What a path is, what it measures, and the registry of paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..grads import GradDiff
from ..layouts import Layout, Microbatch
from ..registry import Registry

if TYPE_CHECKING:
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
    error: str | None = None
    extra: dict = field(default_factory=dict)


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

    def run(self, ctx: AuditContext, layout: Layout) -> list[Measurement]:
        raise NotImplementedError


@dataclass(frozen=True)
class PathSpec:
    name: str
    build: Callable[["CheckConfig"], LogitPath | StepPath]
    tasks: tuple[str, ...]  # tasks the path applies to
    doc: str = ""


PATHS: Registry[PathSpec] = Registry("path")
