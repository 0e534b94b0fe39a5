"""Tolerances: what a case may differ from its target by, per metric, from the dtype and the
noise measured in the same run.

A normalisation bug moves a few things precisely even where rounding is coarse: the gradient's
least-squares **scale** against the reference, its **direction** (1 - cosine), the **loss**,
and, on a logit path, each microbatch's **weight** (its gradient projected on the correct one).
The relative L2 error of the gradient is dominated by per-element rounding in bfloat16, so it
alone would hide a few-percent bug there. Each metric gets its own tolerance: the dtype's
floor, raised to a factor times the noise of lossaudit's own correct reduction on every layout
of this run (measured whatever paths were asked for), capped at the dtype's cap. A model
noisier than a cap fails even its correct reduction, which is a finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (floor, cap) per metric and dtype. float64's are float32-sized on purpose: transformers keeps
# some layers (RMSNorm's variance, rotary tables) and its loss (``logits.float()``) in float32
# whatever the model's dtype.
# bfloat16's scale and weight caps stay under 1 %, so a 1 % rescale is always found.
BOUNDS = {
    "grad": {"float64": (1e-10, 1e-6), "float32": (1e-5, 1e-3), "bfloat16": (1e-2, 1e-1), "float16": (2e-3, 2e-2)},
    "scale": {"float64": (1e-7, 1e-6), "float32": (1e-5, 1e-3), "bfloat16": (2e-3, 8e-3), "float16": (5e-4, 4e-3)},
    "direction": {"float64": (1e-12, 1e-10), "float32": (1e-9, 1e-5), "bfloat16": (5e-5, 5e-3), "float16": (5e-6, 1e-3)},
    # a correct bfloat16 loss function's weights wander ~1e-3 from the harness's (its own upstream
    # gradient rounds differently in the backward); the floor keeps 4x that, under a 1 % bug
    "weights": {"float64": (1e-7, 1e-6), "float32": (1e-5, 1e-3), "bfloat16": (4e-3, 8e-3), "float16": (1e-3, 4e-3)},
}
# the router aux loss a MoE step carried, against the mean over microbatches it should: both
# from the same router logits, so only the loss code's own rounding separates them
BOUNDS["aux"] = {"float64": (1e-6, 1e-4), "float32": (1e-4, 1e-3), "bfloat16": (1e-2, 5e-2), "float16": (5e-3, 2e-2)}
BOUNDS["loss"] = BOUNDS["grad"]  # the loss shares the gradient's tolerance, as it always has
FACTOR = {"grad": 5.0, "loss": 5.0, "aux": 3.0, "scale": 3.0, "direction": 10.0, "weights": 3.0}
METRICS = tuple(BOUNDS)
NAMES = {"grad": "gradient relative error", "loss": "loss relative error", "scale": "|scale - 1|",
         "direction": "1 - cosine", "weights": "max |microbatch weight - 1|",
         "aux": "|carried aux / mean aux - 1|"}
# kept for readers of the per-dtype table: the gradient (and loss) error's floor and cap
FLOOR = {dtype: bounds[0] for dtype, bounds in BOUNDS["grad"].items()}
CAP = {dtype: bounds[1] for dtype, bounds in BOUNDS["grad"].items()}
NOISE_FACTOR = FACTOR["grad"]


def deviations(loss_rel_err: float, grads, weights: list[float] | None, aux_ratio: float | None = None) -> dict[str, float]:
    """Each metric's distance from a perfect match (0 is exact). ``grads``: a GradDiff or None;
    ``aux_ratio``: the router aux a MoE step reported carrying over the mean it should carry."""
    out = {"loss": loss_rel_err}
    if aux_ratio is not None:
        out["aux"] = abs(aux_ratio - 1.0)
    if grads is not None:
        out["grad"] = grads.rel_err
        out["scale"] = abs(grads.scale - 1.0)
        out["direction"] = 1.0 - grads.cosine
    if weights:
        out["weights"] = max(abs(w - 1.0) for w in weights)
    return out


@dataclass(frozen=True, slots=True)
class Tolerance:
    dtype: str
    tolerances: dict  # metric -> tolerance
    noise: dict  # metric -> worst deviation of the correct reduction over all layouts
    loss_noise: float = 0.0  # the loss's own (the "loss" noise above shares the gradient's)

    @classmethod
    def measure(cls, dtype: str, calibration: list[dict[str, float]]) -> "Tolerance":
        """From the deviations of lossaudit's own correct reduction on every layout."""
        noise = {}
        for metric in METRICS:
            values = [d[metric] for d in calibration if metric in d and math.isfinite(d[metric])]
            noise[metric] = max(values, default=0.0)
        loss_noise = noise["loss"]
        noise["grad"] = noise["loss"] = max(noise["grad"], noise["loss"])  # one relative-error noise floor
        tolerances = {}
        for metric, by_dtype in BOUNDS.items():
            floor, cap = by_dtype[dtype]
            tolerances[metric] = min(max(floor, FACTOR[metric] * noise[metric]), cap)
        return cls(dtype, tolerances, noise, loss_noise)

    @property
    def rtol(self) -> float:
        """The loss's and the gradient's relative-error tolerance."""
        return self.tolerances["grad"]

    def exceeded(self, deviation: dict[str, float]) -> list[str]:
        """The metrics a case misses by more than their tolerance (NaN misses)."""
        return [m for m, value in deviation.items() if not value <= self.tolerances[m]]

    def describe(self, deviation: dict[str, float]) -> str:
        """Which metrics a case misses, by how much, against which tolerance."""
        return "beyond tolerance: " + ", ".join(f"{NAMES[m]} {deviation[m]:.2g} > {self.tolerances[m]:.2g}"
                                                for m in self.exceeded(deviation))

    def to_dict(self) -> dict:
        floor, cap = BOUNDS["grad"][self.dtype]
        return {"dtype": self.dtype, "rtol": self.rtol, "noise_floor": self.noise["grad"], "floor": floor, "cap": cap,
                "metrics": {m: {"tolerance": self.tolerances[m], "noise": self.noise[m], "floor": BOUNDS[m][self.dtype][0],
                                "cap": BOUNDS[m][self.dtype][1], "factor": FACTOR[m]} for m in METRICS}}
