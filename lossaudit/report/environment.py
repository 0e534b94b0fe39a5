"""The environment a report was made in: what a baseline comparison diffs first."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# the training stacks whose releases decide what a step path trains (None: not installed)
STACKS = ("peft", "lightning", "deepspeed", "axolotl", "ms-swift")


def environment(*, device: str, dtype: str, seed: int) -> dict:
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "trl": _version("trl"),
        **{package: _version(package) for package in STACKS},
        "lossaudit": _version("lossaudit"),
        "platform": platform.platform(),
        "device": device,
        "dtype": dtype,
        "seed": seed,
    }
