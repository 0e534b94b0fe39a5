"""TRL's GRPO across releases: every loss type at steps_per_generation = k and 2k, each
optimizer step's gradient scale against its own declaration, as a Markdown table.

    python -m lossaudit.releases.grpo_table --trl 1.9.0,1.9.1 [--with requests==2.32.3] [--k 2]

Each release runs in its cached isolated environment (``environments.ensure``: the current
environment with trl pinned), the installed one here; every environment measures with this
checkout's lossaudit (``--measure``, one JSON line per step: what ``--trainer-class
trl:GRPOTrainer`` judges, on the default tiny llama and the seed's rollouts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from ..audit.tolerance import Tolerance
from ..core.errors import LossauditError
from ..models.loading import load_model
from ..paths.grpo import DECLARATIONS, judge_steps
from ..paths.grpo_step import loss_type_run
from .environments import Spec, default_cache, ensure, isolated_environ, parse_pin


def measure(k: int, per_device: int, seed: int) -> list[dict]:
    """Every loss type lossaudit declares that the installed GRPOConfig names, at spg = k and 2k."""
    import trl

    help_text = next(f for f in dataclasses.fields(trl.GRPOConfig) if f.name == "loss_type").metadata["help"]
    rows = []
    for loss_type in sorted(t for t in DECLARATIONS if f"'{t}'" in help_text):
        for spg in (k, 2 * k):
            loaded = load_model("llama", seed=seed)
            loaded.model.train()
            ctx, rollouts, run = loss_type_run(loaded, loss_type, spg, k, per_device, seed=seed,
                                               trainer_class=trl.GRPOTrainer)
            for case in judge_steps(ctx, rollouts, run, Tolerance.measure("float32", [])):
                rows.append({"trl": trl.__version__, "loss_type": loss_type, "k": k, "steps_per_generation": spg,
                             "step": case.step + 1, "tokens": case.tokens, "scale": case.diff.scale,
                             "rel_err": case.diff.rel_err, "declared": DECLARATIONS[loss_type].describe,
                             "cause": case.cause})
    return rows


def table(rows: list[dict]) -> str:
    """release x loss type x steps_per_generation -> each step's scale (exact where it matches)."""
    out = ["| trl | loss_type | declared aggregation | steps_per_generation = k | steps_per_generation = 2k |",
           "| --- | --- | --- | --- | --- |"]
    keyed: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        keyed.setdefault((r["trl"], r["loss_type"], r["declared"]), {}).setdefault(
            r["steps_per_generation"] // r["k"], []).append(r)
    for (release, loss_type, declared), by_spg in keyed.items():
        cells = [" / ".join("exact" if s["rel_err"] < 1e-5 else f"{s['scale']:.3f}x" for s in by_spg.get(m, []))
                 or "-" for m in (1, 2)]
        out.append(f"| {release} | {loss_type} | {declared} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def _in_environment(python: Path | str, k: int, per_device: int, seed: int, env: dict | None) -> list[dict]:
    command = [str(python), "-m", "lossaudit.releases.grpo_table", "--measure", "--k", str(k),
               "--per-device", str(per_device), "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2])
    if done.returncode != 0:
        raise LossauditError(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lossaudit.releases.grpo_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--trl", default="", help="TRL releases besides the installed one, e.g. 1.9.0,1.9.1")
    p.add_argument("--with", dest="extra", action="append", default=[], metavar="PKG==VER",
                   help="more pins for every release's environment (trl 1.9.0 imports requests)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--per-device", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env-cache", type=Path, default=None)
    p.add_argument("--measure", action="store_true", help="measure in this environment, JSON lines")
    args = p.parse_args(argv)
    if args.measure:
        for row in measure(args.k, args.per_device, args.seed):
            print(json.dumps(row))
        return 0
    cache = args.env_cache or default_cache()
    rows = []
    for release in [v.strip() for v in args.trl.split(",") if v.strip()]:
        pins = dict(parse_pin(x) for x in [f"trl=={release}", *args.extra])
        env = ensure(Spec.make(pins), cache, say=lambda line: print(line, file=sys.stderr))
        rows += _in_environment(env.python, args.k, args.per_device, args.seed, isolated_environ(env.path))
    rows += _in_environment(sys.executable, args.k, args.per_device, args.seed, None)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
