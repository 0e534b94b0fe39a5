"""CI's coverage of ms-swift (4.6.0): it needs transformers<5.20 and trl<1.0, so it runs in an
environment layered over the current one (a .pth line puts the current site-packages behind its
own) holding only tests/data/ms-swift-4.6.0-lean.txt (ms-swift, the releases it pins, and what its
trainer path imports: 19 distributions), installed with --no-deps. In it the ms-swift tests run
(tests/stacks/test_frameworks_swift.py: by class and from the user's --swift-args, its template and
arguments, clean, planted mean-of-means bugs found) and the CLI as a user types it. Skipped where
ms-swift is installed (those tests run directly)."""

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "tests" / "data" / "ms-swift-4.6.0-lean.txt"

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(importlib.util.find_spec("swift") is not None,
                                 reason="ms-swift is installed: tests/stacks/test_frameworks_swift.py runs it directly")]


@pytest.fixture(scope="module")
def lean(env_cache) -> Path:
    """The environment's interpreter (built once per cache, kept between runs)."""
    from lossaudit.releases.environments import isolated_environ

    env = env_cache / f"ms-swift-4.6.0-lean-py{sys.version_info.major}{sys.version_info.minor}"
    python = env / "bin" / "python"
    if not (env / "built").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        (Path(purelib) / "zz_lossaudit_base.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", str(PINS)],
                              capture_output=True, text=True, env=isolated_environ(env), timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        (env / "built").write_text("ok\n")
    return python


def _run(python: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    from lossaudit.releases.environments import isolated_environ

    environ = {**isolated_environ(python.parent.parent), "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT, env=environ, timeout=timeout)


def test_the_environment_imports_its_own_release(lean):
    out = _run(lean, "-c", "import swift, transformers, trl, lossaudit; print(swift.__version__, transformers.__version__, "
                           "trl.__version__, lossaudit.__file__)")
    assert out.returncode == 0, out.stderr[-3000:]
    release, transformers, trl, where = out.stdout.split()[-4:]
    assert (release, transformers, trl) == ("4.6.0", "5.19.0", "0.29.1") and where.startswith(str(ROOT))


def test_the_ms_swift_tests_pass_on_4_6_0(lean):
    out = _run(lean, "-m", "pytest", "-q", "-m", "heavy", "-p", "no:cacheprovider", "tests/stacks/test_frameworks_swift.py")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


def test_the_cli_as_a_user_types_it_is_clean_on_4_6_0(lean, tmp_path):
    out = _run(lean, "-m", "lossaudit", "check", "llama", "--path", "trainer", "--trainer-class",
               "swift.trainers:Seq2SeqTrainer", "--microbatches", "1,4", "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "no findings" in out.stdout
