"""The axolotl release table of docs/frameworks.md, from runs in isolated environments: for each
PYTHON (an interpreter of an environment holding one axolotl release and lossaudit),
``lossaudit check llama --path trainer --trainer-class axolotl.core.trainers.base:AxolotlTrainer``
as a user first types it, then one markdown row per release from its report.json.

    python benchmarks/axolotl_releases.py OUT_DIR PYTHON [PYTHON ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SPEC = "axolotl.core.trainers.base:AxolotlTrainer"
KS = (1, 2, 4)


def run(python: str, out: Path) -> dict:
    release = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('axolotl'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    folder = out / f"axolotl-{release}"
    start = time.monotonic()
    done = subprocess.run([python, "-m", "lossaudit", "check", "llama", "--path", "trainer", "--trainer-class", SPEC,
                           "--microbatches", ",".join(map(str, KS)), "--out", str(folder), "--overwrite"],
                          capture_output=True, text=True)
    report = json.loads((folder / "report.json").read_text())
    worst = {k: max(c["grad_rel_err"] for c in report["cases"] if c["microbatches"] == k) for k in KS}
    accepts = {c.get("trainer_accepts_loss_kwargs") for c in report["cases"]}
    env = report["environment"]
    return {"release": release, "exit": done.returncode, "worst": worst, "accepts": accepts, "env": env,
            "wall_s": time.monotonic() - start}


def row(r: dict) -> str:
    env = r["env"]
    errs = " | ".join(f"{r['worst'][k]:.1e}" for k in KS)
    verdict = {0: "clean", 1: "finding"}.get(r["exit"], f"exit {r['exit']}")
    accepts = ", ".join(str(a) for a in sorted(r["accepts"], key=str))
    return (f"| {r['release']} | {env['python']} | {env['torch']} | {env['transformers']} | {accepts} | {errs} | "
            f"{verdict} (exit {r['exit']}) |")


def main(argv: list[str]) -> int:
    out, pythons = Path(argv[0]), argv[1:]
    out.mkdir(parents=True, exist_ok=True)
    print("| axolotl | Python | torch | transformers | model_accepts_loss_kwargs | "
          + " | ".join(f"grad rel err k={k}" for k in KS) + " | lossaudit |")
    print("|" + "---|" * (6 + len(KS)))
    for python in pythons:
        print(row(run(python, out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
