"""Build flavours of torch-like distributions: a CPU build, a CUDA line, ROCm, XPU.

torch names a build by its local version label on its own index (``2.13.0+cpu`` from
https://download.pytorch.org/whl/cpu, ``+cu128`` from .../cu128); the package index's default
Linux build carries no label and is a CUDA build whose line is that of the ``nvidia-cuda-runtime``
(or ``cuda-toolkit``) it requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .pip_text import normalize

FLAVOUR_INDEX = "https://download.pytorch.org/whl/{label}"  # torch's own index of one build
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")  # built per flavour, labelled +cpu, +cu128, ...
_CUDA_RUNTIME = re.compile(r"^(nvidia-cuda-runtime(-cu\d+)?|cuda-toolkit)$")


@dataclass(frozen=True)
class Flavour:
    """How a torch-like distribution was built: ``cpu``, ``cuda`` (with its line), ``rocm``, ``xpu``."""

    kind: str
    line: str = ""  # "12.8" for CUDA, "6.4" for ROCm
    label: str = ""  # the local version label of that build on torch's own index: "cpu", "cu128"

    def __str__(self) -> str:
        return {"cpu": "a CPU build", "cuda": f"a CUDA {self.line} build", "rocm": f"a ROCm {self.line} build",
                "xpu": "an XPU build"}.get(self.kind, f"a {self.kind} build")

    @property
    def index(self) -> str:
        return FLAVOUR_INDEX.format(label=self.label)


def label_flavour(label: str) -> Flavour | None:
    """``cpu`` -> CPU, ``cu128`` -> CUDA 12.8, ``rocm6.4`` -> ROCm 6.4, ``xpu``; else None."""
    if label in ("cpu", "xpu"):
        return Flavour(label, "", label)
    cuda = re.fullmatch(r"cu(\d+)(\d)", label)
    if cuda:
        return Flavour("cuda", f"{cuda[1]}.{cuda[2]}", label)
    if re.fullmatch(r"rocm\d+(\.\d+)*", label):
        return Flavour("rocm", label[4:], label)
    return None


def cuda_line(distributions: dict[str, str]) -> str | None:
    """The CUDA line (``13.0``) of the CUDA runtime among ``distributions``, if any."""
    for name, version in distributions.items():
        if _CUDA_RUNTIME.match(normalize(name)):
            parts = version.split(".")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                return f"{parts[0]}.{parts[1]}"
    return None


def flavour(name: str, version: str, distributions: dict[str, str]) -> Flavour | None:
    """The build of ``name`` at ``version`` among ``distributions`` (what is installed with it):
    its local label, or, for an unlabelled torch-like distribution, the line of the CUDA runtime
    beside it. None: a distribution with no flavour to keep."""
    _, _, label = version.partition("+")
    if label:
        return label_flavour(label)
    if normalize(name) not in TORCH_FAMILY:
        return None
    line = cuda_line(distributions)
    return Flavour("cuda", line, "cu" + line.replace(".", "")) if line else None
