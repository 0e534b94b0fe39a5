"""CI's coverage of one axolotl release (the newest, 0.21.0) without its 4.4 GB of pins: an
environment layered over the current one (a .pth line puts the current site-packages behind its
own) holding only tests/data/axolotl-0.21.0-lean.txt, installed with --no-deps (and
--ignore-requires-python: 0.21.0 declares Python >= 3.12, its code runs on 3.11). In it the
axolotl tests run (tests/stacks/test_stacks_axolotl.py: by class, from the config, LoRA, sample
packing) and the CLI as a user types it, clean on 0.21.0. Measured here: 2 min 4 s for the three
tests, building included (wheels in pip's cache; 644 MB installed). Skipped where axolotl is installed (those tests run
directly)."""

import importlib.util
from pathlib import Path

import pytest

from lean_env import ROOT, lean_env, run_in

PINS = ROOT / "tests" / "data" / "axolotl-0.21.0-lean.txt"

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(importlib.util.find_spec("axolotl") is not None,
                                 reason="axolotl is installed: tests/stacks/test_stacks_axolotl.py runs it directly")]


@pytest.fixture(scope="module")
def lean(env_cache) -> Path:
    """The environment's interpreter (built once per cache, kept between runs)."""
    return lean_env(env_cache, PINS, "--ignore-requires-python")


def test_the_environment_imports_its_own_release(lean):
    out = run_in(lean, "-c", "import axolotl, transformers, lossaudit; print(axolotl.__version__, transformers.__version__, "
                           "lossaudit.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    release, transformers, where = out.stdout.split()[-3:]
    assert (release, transformers) == ("0.21.0", "5.20.1") and where.startswith(str(ROOT))


def test_the_axolotl_tests_pass_on_0_21_0(lean):
    out = run_in(lean, "-m", "pytest", "-q", "-m", "heavy", "-p", "no:cacheprovider", "tests/stacks/test_stacks_axolotl.py")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


def test_the_cli_as_a_user_types_it_is_clean_on_0_21_0(lean, tmp_path):
    out = run_in(lean, "-m", "lossaudit", "check", "llama", "--path", "trainer", "--trainer-class",
               "axolotl.core.trainers.base:AxolotlTrainer", "--microbatches", "1,2", "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "no findings" in out.stdout
