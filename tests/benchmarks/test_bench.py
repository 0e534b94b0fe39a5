"""benchmarks/bench_audit.py on the CPU with the tiny Llama: every mode runs the code the GPU
run runs, a failure of a mode (out of memory, timeout) is a result, and the table and JSON
say what the GPU run will be read by."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_audit as bench  # noqa: E402


def args_for(mode, *extra):
    return bench.parse_args(["--child", mode, "--size", "tiny", "--microbatches", "1,4", *extra])


@pytest.fixture(scope="module")
def results():
    """Every mode, each in a fresh child process as the benchmark runs them: a process's resident
    peak is only its own there (in a test process that ran other tests first, freed pages are
    reused and a mode's peak can read as a few kB)."""
    modes = [mode for modes in bench.MODES.values() for mode in modes]
    return dict(bench.children(bench.parse_args(["--size", "tiny", "--microbatches", "1,4"]), modes))


def test_the_model_is_built_on_the_device_in_its_dtype():
    loaded, max_length = bench.build("tiny", 0, torch.device("meta"), torch.bfloat16)
    params = list(loaded.model.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    assert max_length == 32 and loaded.parameters == 115008


@pytest.mark.heavy  # every mode of the benchmark, each after a warm-up (its fixture ran 25+ min on the loaded 2-core machine)
def test_every_mode_runs_on_tiny_cpu(results):
    layouts = results["passes"]["cases"]
    assert layouts == 8  # k=1: 2 paddings; k=4: 2 paddings x 3 groupings
    for mode, r in results.items():
        assert "error" not in r, (mode, r)
        assert r["seconds"] > 0 and r["parameters"] == 115008
        assert r["peak_bytes"] > 115008 * 4, mode  # what the process holds, the weights included
        assert r["peak_resettable"], mode  # each mode's peak starts over after its warm-up (Linux)
    assert results["audit"]["cases"] == layouts and results["audit3"]["cases"] == 3 * layouts
    assert results["trainer_passes"]["cases"] == layouts == results["trainer"]["cases"]
    assert results["accelerate_passes"]["cases"] == 3 * layouts == results["accelerate"]["cases"]  # 3 recipes
    # (what each sum costs is measured in tensor bytes by tests/audit/test_memory_model.py: on the
    # tiny model the process's resident memory moves by more than a sum for other reasons)
    assert results["default"]["cases"] > results["audit3"]["cases"]  # every default path and reduction


def test_an_out_of_memory_mode_is_a_result(monkeypatch):
    def oom(*_args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    monkeypatch.setitem(bench.MEASURE, "passes", oom)
    assert bench.child(args_for("passes"))["error"] == "out of memory"


def test_a_mode_past_its_timeout_is_a_result_and_is_ended():
    args = bench.parse_args(["--size", "tiny"])
    r = bench.run_child(args, "audit", timeout=1.0)
    assert r == {"mode": "audit", "error": "timeout after 1 s"}


def test_ratios_and_table_from_results_with_failures():
    gib = bench.GIB
    results = {"passes": {"seconds": 4.0, "peak_bytes": 30 * gib}, "train": {"seconds": 1.0, "peak_bytes": 39.4 * gib},
               "audit": {"seconds": 5.0, "peak_bytes": 96.3 * gib},
               "audit3": {"mode": "audit3", "error": "out of memory", "peak_bytes": 137.6 * gib}}
    ratios = bench.ratios(results)
    assert ratios == {"audit/passes": 1.25, "peak audit/train": pytest.approx(96.3 / 39.4)}
    table = bench.table({"size": "8b", "parameters": 8_030_261_248, "results": results, "ratios": ratios})
    assert table.splitlines()[2] == ("| 8b (8.03 G params) | 4.00 s | 5.00 s | 1.25 | out of memory | - | 39.4 GiB "
                                     "| 96.3 GiB | out of memory at 137.6 GiB |")


def test_command_line_writes_the_json(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_audit.py"), "--size", "tiny",
                           "--modes", "passes,audit", "--microbatches", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert set(summary["results"]) == {"passes", "audit"} and "audit/passes" in summary["ratios"]
    assert {"date", "device", "torch", "transformers"} <= set(summary)
    assert summary["torch"] == torch.__version__ and summary["device"].startswith("cpu")
    assert "| tiny (115,008 params) |" in done.stdout
