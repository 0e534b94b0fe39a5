"""The ``lightning`` path: one ``lightning.Trainer(accumulate_grad_batches=k)`` optimizer step per
layout (``stacks/lightning.py`` runs it and reads the gradient at ``on_before_optimizer_step``).

Without ``--lightning-module`` the built-in recipes run, one label each: ``naive`` (shown as
expected: the mean of microbatch means, Lightning#20350) and ``token_count``. With
``--lightning-module MODULE:FACTORY`` the user's module runs instead, labelled with its name.
"""

from __future__ import annotations

from ..core.layouts import Layout, microbatches
from ..core.registry import load_callable
from ..stacks.lightning import DEFAULT_RECIPES, RECIPES, LightningRecipe, run_recipe, run_user_module
from ..core.tokens import TASKS
from .base import PATHS, Label, Outcome, PathSpec, StepPath, Unavailable


def resolve_factory(spec):
    """``MODULE:FACTORY``, or a callable the Python API passed."""
    return spec if callable(spec) else load_callable(spec, "Lightning module factory")


def spec_name(spec) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__qualname__", type(spec).__name__)


class LightningPath(StepPath):
    name = "lightning"

    def __init__(self, recipe: LightningRecipe | None = None, factory=None, spec=None):
        self.recipe, self.factory = recipe, factory
        self.changes_model = factory is not None  # the user's module may change the model it wraps
        if recipe is not None:
            self.label = Label("lightning", recipe.name, expected=recipe.expected,
                               cause=recipe.doc if recipe.expected else "")
        else:
            self.label = Label("lightning", spec_name(spec))

    @classmethod
    def build(cls, config) -> list["LightningPath"]:
        if config.lightning_module:
            return [cls(factory=resolve_factory(config.lightning_module), spec=config.lightning_module)]
        return [cls(RECIPES.get(name)) for name in DEFAULT_RECIPES]

    def run(self, ctx, layout: Layout) -> list[Outcome]:
        if layout.world_size > 1:
            raise Unavailable("the lightning path runs in one process (--world-size 1)")
        mbs = microbatches(ctx.batch, layout)
        if self.recipe is not None:
            step = run_recipe(ctx.model, mbs, self.recipe, task=ctx.batch.task, device=ctx.device)
        else:
            step = run_user_module(ctx.model, mbs, self.factory, device=ctx.device)
        return [Outcome(self.label, layout, step.loss, step.gradient, note="; ".join(step.notes), extra=step.extra)]


PATHS.register(
    "lightning",
    PathSpec("lightning", LightningPath.build, TASKS,
             "one lightning.Trainer(accumulate_grad_batches=k) step per layout: naive and token_count "
             "recipes, or --lightning-module", requires=("lightning",),
             unavailable=lambda config: None if config.lightning_module or "lightning" in (config.paths or ())
             else "runs when asked for: --path lightning or --lightning-module"),
)
