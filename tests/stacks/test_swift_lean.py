"""CI's coverage of ms-swift (4.6.0): it needs transformers<5.20 and trl<1.0, so it runs in an
environment layered over the current one (a .pth line puts the current site-packages behind its
own) holding only tests/data/ms-swift-4.6.0-lean.txt (ms-swift, the releases it pins, and what its
trainer path imports: 19 distributions), installed with --no-deps. In it the ms-swift tests run
(tests/stacks/test_frameworks_swift.py: by class and from the user's --swift-args, its template and
arguments, clean, planted mean-of-means bugs found) and the CLI as a user types it. Skipped where
ms-swift is installed (those tests run directly)."""

import importlib.util
from pathlib import Path

import pytest

from lean_env import ROOT, lean_env, run_in

PINS = ROOT / "tests" / "data" / "ms-swift-4.6.0-lean.txt"

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(importlib.util.find_spec("swift") is not None,
                                 reason="ms-swift is installed: tests/stacks/test_frameworks_swift.py runs it directly")]


@pytest.fixture(scope="module")
def lean(env_cache) -> Path:
    """The environment's interpreter (built once per cache, kept between runs)."""
    return lean_env(env_cache, PINS)


def test_the_environment_imports_its_own_release(lean):
    out = run_in(lean, "-c", "import swift, transformers, trl, lossaudit; print(swift.__version__, transformers.__version__, "
                           "trl.__version__, lossaudit.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    release, transformers, trl, where = out.stdout.split()[-4:]
    assert (release, transformers, trl) == ("4.6.0", "5.19.0", "0.29.1") and where.startswith(str(ROOT))


def test_the_ms_swift_tests_pass_on_4_6_0(lean):
    out = run_in(lean, "-m", "pytest", "-q", "-m", "heavy", "-p", "no:cacheprovider", "tests/stacks/test_frameworks_swift.py")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


def test_the_cli_as_a_user_types_it_is_clean_on_4_6_0(lean, tmp_path):
    out = run_in(lean, "-m", "lossaudit", "check", "llama", "--path", "trainer", "--trainer-class",
               "swift.trainers:Seq2SeqTrainer", "--microbatches", "1,4", "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "no findings" in out.stdout
