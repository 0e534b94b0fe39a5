"""The candidate of an upgrade, decided before anything is installed: the build flavour kept,
every other change named, pip's reason for a failure in the line.

Decisions are tested on pip reports: one recorded from a real ``pip install --dry-run --report
torch==2.14.0`` on the package index (a CUDA 13.0 build, tests/releases/data/), the others
written here; no wheel is downloaded. One real dry run of a small distribution checks that pip
is asked the way the recorded reports assume.
"""

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lossaudit.core.errors import EnvironmentProblem, UsageError
from lossaudit.releases import environments as envs
from lossaudit.releases.candidate import Resolution, pip_dry_run, plan
from lossaudit.releases.flavours import Flavour, cuda_line, flavour, label_flavour
from lossaudit.releases.pip_text import normalize

DATA = Path(__file__).parent / "data"
CPU_INDEX, CU128_INDEX = "https://download.pytorch.org/whl/cpu", "https://download.pytorch.org/whl/cu128"
CPU_BASE = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6", "filelock": "4.3.2"}
CUDA_BASE = {"torch": "2.13.0", "nvidia-cuda-runtime-cu12": "12.8.90", "transformers": "5.25.0", "numpy": "2.4.6"}


def pypi_torch() -> dict:
    """The recorded report: torch 2.14.0 from the package index and what it pulls in."""
    return json.loads((DATA / "pip-report-torch-2.14.0-pypi.json").read_text())


def report(versions: dict[str, str], extra: dict | None = None) -> dict:
    """A pip report installing ``versions``, and the installs of ``extra`` (another report: its
    entries, with their requirements, win)."""
    install = list((extra or {}).get("install", []))
    names = {normalize(i["metadata"]["name"]) for i in install}
    install += [{"download_info": {"url": f"https://files.example/{n}-{v}.whl"}, "is_direct": False,
                 "metadata": {"name": n, "version": v}} for n, v in versions.items() if normalize(n) not in names]
    return {"version": "1", "install": install}


class Pip:
    """A DryRun answering from a table: the first rule whose requirement (and, if given, index)
    is asked for gives the answer; every call is recorded."""

    def __init__(self, *rules):
        self.rules, self.calls = rules, []

    def __call__(self, requirements, constraints, indexes):
        self.calls.append((list(requirements), list(constraints), list(indexes)))
        for needs, index, answer in self.rules:
            if needs in requirements and (index is None or index in indexes) and answer.get("when", lambda c: True)(constraints):
                if "report" in answer:
                    return Resolution(0, "", answer["report"])
                return Resolution(1, answer["error"], None)
        return Resolution(1, f"ERROR: No matching distribution found for {requirements[0]}", None)


def spec(pins, base, flavour_change=False):
    return envs.Spec.make(pins, dict(base), "/src/lossaudit", flavour_change=flavour_change)


def reachable(url):
    return None


def unreachable(url):
    return "[Errno -2] Name or service not known"


def sizes(items):
    return {i["name"]: 200_000_000 for i in items}


def test_flavours_read_from_labels_and_from_the_cuda_runtime_beside_torch():
    assert label_flavour("cpu") == Flavour("cpu", "", "cpu") and str(label_flavour("cpu")) == "a CPU build"
    assert str(label_flavour("cu128")) == "a CUDA 12.8 build" and label_flavour("cu128").index == CU128_INDEX
    assert str(label_flavour("rocm6.4")) == "a ROCm 6.4 build" and label_flavour("post1") is None
    recorded = {i["metadata"]["name"]: i["metadata"]["version"] for i in pypi_torch()["install"]}
    assert cuda_line(recorded) == "13.0"  # nvidia-cuda-runtime 13.0.96, cuda-toolkit 13.0.3.0
    assert str(flavour("torch", "2.14.0", recorded)) == "a CUDA 13.0 build"
    assert flavour("torch", "2.13.0", CUDA_BASE) == Flavour("cuda", "12.8", "cu128")
    assert flavour("numpy", "2.4.6", CUDA_BASE) is None  # nothing to keep
    assert flavour("torch", "2.13.0", {"torch": "2.13.0"}) is None  # no label, no CUDA: the index's default


def test_a_cpu_torch_stays_a_cpu_build_from_torchs_cpu_index():
    pip = Pip(("torch==2.14.0+cpu", CPU_INDEX, {"report": report({**CPU_BASE, "torch": "2.14.0+cpu"})}))
    candidate = plan(spec({"torch": "2.14.0"}, CPU_BASE), pip, reachable=reachable, sizes=sizes)
    assert candidate.installs["torch"]["version"] == "2.14.0+cpu" and candidate.indexes == [CPU_INDEX]
    assert candidate.flavours == {"torch": "a CPU build"} and candidate.changes == []
    assert "torch==2.14.0+cpu" in candidate.requirements()
    assert len(pip.calls) == 1  # the package index's CUDA build was never asked for


def test_an_unreachable_cpu_index_stops_before_installing_and_says_what_would_come_instead():
    pip = Pip(("torch==2.14.0", None, {"report": report(CPU_BASE, pypi_torch())}))
    with pytest.raises(UsageError) as info:
        plan(spec({"torch": "2.14.0"}, CPU_BASE), pip, reachable=unreachable, sizes=sizes)
    line = str(info.value)
    added = {normalize(i["metadata"]["name"]) for i in pypi_torch()["install"]} - set(CPU_BASE)
    assert "a CPU build of torch (as torch 2.13.0+cpu here) cannot be had" in line
    assert f"{CPU_INDEX} cannot be reached ([Errno -2] Name or service not known)" in line
    assert "No matching distribution found for torch==2.14.0+cpu" in line
    assert f"torch 2.14.0, a CUDA 13.0 build that adds {len(added)} distributions (" in line
    assert "nvidia-cublas 200 MB" in line and f"{len(added) * 0.2:.1f} GB to download" in line
    assert "nothing was installed (pass --allow-flavour-change to build it)" in line
    assert [call[0][0] for call in pip.calls] == ["torch==2.14.0+cpu", "torch==2.14.0"]
    assert all(call[2] == [] for call in pip.calls)  # the unreachable index is never handed to pip


def test_allowed_the_other_flavour_is_built_and_every_added_distribution_named():
    pip = Pip(("torch==2.14.0", None, {"report": report(CPU_BASE, pypi_torch())}))
    said = []
    candidate = plan(spec({"torch": "2.14.0"}, CPU_BASE, flavour_change=True), pip, reachable=unreachable,
                     sizes=sizes, allow_flavour_change=True, say=said.append)
    assert candidate.flavours == {"torch": "a CUDA 13.0 build"}
    assert "adds nvidia-cublas 13.1.1.3" in candidate.changes and "adds triton 3.8.0" in candidate.changes
    assert "filelock 4.3.2 -> 4.3.2" not in " ".join(candidate.changes)  # unchanged is not named
    assert said and said[0].startswith("--allow-flavour-change: a CPU build of torch")


def test_a_cpu_build_found_in_a_local_wheel_folder_needs_no_index():
    pip = Pip(("torch==2.14.0+cpu", None, {"report": report({**CPU_BASE, "torch": "2.14.0+cpu"})}))
    candidate = plan(spec({"torch": "2.14.0"}, CPU_BASE), pip, reachable=unreachable, sizes=sizes)
    assert candidate.installs["torch"]["version"] == "2.14.0+cpu" and candidate.indexes == []


def test_a_default_cuda_build_stays_on_its_cuda_line():
    moved = report(CUDA_BASE, pypi_torch())  # the index's 2.14.0 is CUDA 13.0 (12.8's runtime stays beside it)
    kept = report(CUDA_BASE | {"torch": "2.14.0+cu128"})
    pip = Pip(("torch==2.14.0+cu128", CU128_INDEX, {"report": kept}), ("torch==2.14.0", None, {"report": moved}))
    candidate = plan(spec({"torch": "2.14.0"}, CUDA_BASE), pip, reachable=reachable, sizes=sizes)
    assert candidate.installs["torch"]["version"] == "2.14.0+cu128" and candidate.flavours == {"torch": "a CUDA 12.8 build"}
    assert candidate.indexes == [CU128_INDEX]
    refused = Pip(("torch==2.14.0", None, {"report": moved}))  # no cu128 build of 2.14.0 anywhere
    with pytest.raises(UsageError, match="a CUDA 12.8 build of torch .* cannot be had: .*a CUDA 13.0 build"):
        plan(spec({"torch": "2.14.0"}, CUDA_BASE), refused, reachable=reachable, sizes=sizes)


PIP_CONFLICT = """\
ERROR: Cannot install tokenizers and transformers==4.46.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    transformers 4.46.0 depends on tokenizers<0.21 and >=0.20
    The user requested (constraint) tokenizers==0.23.3

To fix this you could try to:
"""


def test_a_lifted_constraint_is_named_as_a_change_beyond_the_pins():
    base = {"transformers": "5.25.0", "tokenizers": "0.23.3", "numpy": "2.4.6"}
    lifted = report({"transformers": "4.46.0", "tokenizers": "0.20.3", "numpy": "2.4.6"})
    pip = Pip(("transformers==4.46.0", None, {"error": PIP_CONFLICT, "when": lambda c: "tokenizers==0.23.3" in c}),
              ("transformers==4.46.0", None, {"report": lifted}))
    candidate = plan(spec({"transformers": "4.46.0"}, base), pip, reachable=reachable, sizes=sizes)
    assert candidate.lifted == {"tokenizers"}
    assert candidate.changes == ["tokenizers 0.23.3 -> 0.20.3 (lifted: a pin requires it)"]
    assert candidate.flavours == {}


def test_a_conflict_between_the_pins_themselves_carries_pips_reason():
    conflict = PIP_CONFLICT.replace("(constraint) tokenizers==0.23.3", "tokenizers==0.23.3")
    pip = Pip(("transformers==4.46.0", None, {"error": conflict}))
    with pytest.raises(EnvironmentProblem) as info:
        plan(spec({"transformers": "4.46.0", "tokenizers": "0.23.3"}, CPU_BASE), pip, reachable=reachable)
    assert str(info.value) == ("resolving tokenizers==0.23.3 transformers==4.46.0: the conflict is caused by: "
                               "transformers 4.46.0 depends on tokenizers<0.21 and >=0.20; "
                               "The user requested tokenizers==0.23.3")


def test_a_real_dry_run_installs_nothing_and_reports_the_candidate(tmp_path):
    """pip itself, on one small pure-Python distribution this environment already holds."""
    version = metadata.version("iniconfig")
    with open(tmp_path / "log", "w") as log:
        candidate = plan(spec({"iniconfig": version}, {}), pip_dry_run(log, envs.isolated_environ()),
                         reachable=reachable, sizes=sizes)
    assert candidate.installs["iniconfig"]["version"] == version and candidate.changes == []
    assert "--dry-run" in (tmp_path / "log").read_text()
    assert metadata.version("iniconfig") == version and sys.prefix  # nothing here changed


def test_a_lifted_torch_keeps_its_flavour_too():
    """transformers pinned, and its requirements lift the constraint on a CPU torch: the package
    index's torch would be CUDA, so the preview stops (naming the lift) instead of moving it."""
    conflict = PIP_CONFLICT.replace("tokenizers", "torch").replace("torch==0.23.3", "torch==2.13.0+cpu")
    lifted = report(CPU_BASE | {"transformers": "4.46.0"}, pypi_torch())
    pip = Pip(("transformers==4.46.0", None, {"error": conflict, "when": lambda c: "torch==2.13.0+cpu" in c}),
              ("transformers==4.46.0", None, {"report": lifted}))
    with pytest.raises(UsageError, match=r"torch 2.14.0 is a CUDA 13.0 build, not a CPU build"):
        plan(spec({"transformers": "4.46.0"}, CPU_BASE), pip, reachable=reachable, sizes=sizes)
    assert len(pip.calls) == 2  # the failed resolution is not asked again
