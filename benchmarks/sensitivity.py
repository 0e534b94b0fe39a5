"""Issue 14's GPU half: on a Llama-shaped model in bfloat16, are a 1 % uniform rescale and a
1 % reweighting between microbatches found, and does the correct loss function pass?

    python benchmarks/sensitivity.py --size 1b --device cuda --dtype bfloat16 --json F

Each planted bug is a compute_loss_func audited on the loss-fn path beside lossaudit's own
reductions (k 1 and 4, right padding, contiguous and imbalanced grouping); the JSON holds each
case's verdict, scale, per-microbatch weights and detail, and the run's tolerances.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch.nn.functional as F

from bench_audit import build

CALLS = {"n": 0}


def _token_sum(outputs, labels):
    logits = outputs.logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels[:, 1:].reshape(-1).to(flat.device), ignore_index=-100, reduction="sum")


def correct(outputs, labels, num_items_in_batch=None):
    return _token_sum(outputs, labels) / num_items_in_batch


def rescale_1pct(outputs, labels, num_items_in_batch=None):
    return _token_sum(outputs, labels) / (num_items_in_batch * 1.01)


def reweight_1pct(outputs, labels, num_items_in_batch=None):
    """1 % more weight on odd calls, 1 % less on even ones: weight moves between microbatches."""
    CALLS["n"] += 1
    return _token_sum(outputs, labels) / num_items_in_batch * (1.01 if CALLS["n"] % 2 else 0.99)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    from lossaudit.audit.config import CheckConfig
    from lossaudit.audit.harness import audit

    loaded, max_length = build(args.size, 0, torch.device(args.device), getattr(torch, args.dtype))
    results = {"size": args.size, "device": args.device, "dtype": args.dtype, "bugs": {}}
    for name in ("correct", "rescale_1pct", "reweight_1pct"):
        started = time.monotonic()
        CALLS["n"] = 0
        config = CheckConfig(model=loaded.name, paths=("reduction", "loss-fn"), loss_fn=f"sensitivity:{name}",
                             reductions=("num_items", "mean_of_means"), microbatches=(1, 4), paddings=("right",),
                             groupings=("contiguous", "imbalanced"), batch_size=args.batch_size,
                             max_length=max_length, device=args.device, dtype=args.dtype)
        report = audit(config, loaded=loaded)
        cases = report.cases[report.cases["path"] == "loss-fn"]
        found = bool((cases["verdict"] == "diverge").any())
        results["bugs"][name] = {
            "found": found, "exit_status": report.exit_status, "seconds": round(time.monotonic() - started, 1),
            "tolerance": report.tolerance.get("metrics"),
            "cases": [{k: row[k] for k in ("microbatches", "grouping", "verdict", "grad_rel_err", "grad_scale",
                                           "grad_cosine", "microbatch_weights", "detail")}
                      for _, row in cases.iterrows()],
        }
        print(f"{name:<14} {'FOUND' if found else 'clean'}  exit {report.exit_status}  "
              f"scales {[round(s, 5) for s in cases['grad_scale']]}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    ok = not results["bugs"]["correct"]["found"] and all(results["bugs"][b]["found"] for b in ("rescale_1pct", "reweight_1pct"))
    print("sensitivity:", "as required" if ok else "NOT as required")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
