"""What an audit costs next to the training passes it cannot avoid (issue 6).

    python benchmarks/bench_audit.py --size tiny
    python benchmarks/bench_audit.py --size 50m --microbatches 1,2,4
    python benchmarks/bench_audit.py --size 1b --device cuda --dtype bfloat16

Each measurement runs in a fresh child process (so peak memory is its own) on the same
model (a Llama of the given shape, random weights, fixed seed) and the same batch and layouts:

- passes:  the minimal work: one full-batch forward/backward, then one forward/backward per
           microbatch of every layout (the audit's layouts, from lossaudit.layouts);
- train:   one plain training step (full batch forward, backward, SGD step): the memory bar;
- audit:   ``check --path reduction --reductions mean_of_means``;
- audit3:  the same with ``--reductions mean_of_means,num_items,sum``.

It prints the ratios issue 6 sets targets for: audit/passes (<= 1.3), audit3/audit (<= 1.25),
peak memory audit/train. Timings on a shared or busy machine are noisy: use --repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date

SIZES = {  # Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab, max_length)
    "tiny": None,  # lossaudit's own tiny Llama (the model `check llama` builds)
    "50m": (512, 8, 8, 8, 1376, 32000, 128),
    "1b": (2048, 16, 32, 8, 8192, 128256, 512),  # Llama-3.2-1B-shaped
    "8b": (4096, 32, 32, 8, 14336, 128256, 512),  # Llama-3-8B-shaped
}
MODES = ("passes", "train", "audit", "audit3")


def build(size: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lossaudit.models import LoadedModel, load_model

    if SIZES[size] is None:
        return load_model("llama", seed=seed), 32
    hidden, layers, heads, kv, inter, vocab, max_length = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=max_length, pad_token_id=0, use_cache=False)
    torch.manual_seed(seed)
    return LoadedModel(LlamaForCausalLM(config), f"llama-{size}", "causal-lm", "tiny"), max_length


def child(args) -> dict:
    import torch

    from lossaudit.config import CheckConfig

    device = torch.device(args.device)
    loaded, max_length = build(args.size, args.seed)
    reductions = ("mean_of_means", "num_items", "sum") if args.mode == "audit3" else ("mean_of_means",)
    config = CheckConfig(model=loaded.name, paths=("reduction",), reductions=reductions, microbatches=args.microbatches,
                         batch_size=args.batch_size, max_length=max_length, seed=args.seed, device=args.device,
                         dtype=args.dtype)
    loaded.model.to(device=device, dtype=getattr(torch, args.dtype)).train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.mode in ("audit", "audit3"):
        from lossaudit.harness import audit

        cases = len(audit(config, loaded=loaded).cases)
    else:
        cases = minimal_passes(loaded, config, device, train_step=args.mode == "train")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"mode": args.mode, "seconds": seconds, "peak_bytes": peak, "cases": cases,
            "parameters": loaded.parameters}


def minimal_passes(loaded, config, device, *, train_step: bool) -> int:
    """The forward/backward passes no audit can skip (or, ``train_step``, one optimizer step)."""
    import torch

    from lossaudit.forward import forward
    from lossaudit.harness import batch_for
    from lossaudit.layouts import full_batch, microbatches, plan_layouts
    from lossaudit.tokens import target_mask, token_losses

    model = loaded.model
    batch = batch_for(loaded, config.batch_spec)

    def backward(mb):
        outputs, _ = forward(model, mb, device)
        losses = token_losses(outputs.logits, mb.labels.to(device), loaded.task)
        (losses.sum() / max(int(target_mask(mb.labels, loaded.task).sum()), 1)).backward()

    backward(full_batch(batch))
    if train_step:
        torch.optim.SGD(model.parameters(), lr=1e-3).step()
        return 0
    layouts = plan_layouts(batch, config.ks, paddings=config.paddings, groupings=config.groupings)
    for layout in layouts:
        for mb in microbatches(batch, layout):
            backward(mb)
    return len(layouts)


def run_child(args, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--size", args.size, "--device", args.device,
               "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.microbatches:
        command += ["--microbatches", ",".join(map(str, args.microbatches))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_audit: {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(args) -> dict:
    import torch
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    return {"date": date.today().isoformat(), "device": f"{args.device} ({device}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--microbatches", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs per mode; the fastest counts")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", choices=MODES, dest="mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in MODES:
        runs = [run_child(args, mode) for _ in range(args.repeat)]
        results[mode] = min(runs, key=lambda r: r["seconds"])
        print(f"  {mode:7s} {results[mode]['seconds']:8.2f} s   peak {results[mode]['peak_bytes'] / 2**30:7.2f} GiB",
              file=sys.stderr)
    ratios = {
        "audit/passes": results["audit"]["seconds"] / results["passes"]["seconds"],
        "audit3/audit": results["audit3"]["seconds"] / results["audit"]["seconds"],
        "peak audit/train": results["audit"]["peak_bytes"] / results["train"]["peak_bytes"],
        "peak audit3/train": results["audit3"]["peak_bytes"] / results["train"]["peak_bytes"],
    }
    summary = {"size": args.size, "dtype": args.dtype, "parameters": results["audit"]["parameters"],
               "layouts": results["passes"]["cases"], **environment(args), "results": results, "ratios": ratios}
    print(f"{args.size} ({summary['parameters']:,} parameters, {summary['layouts']} layouts, {args.dtype}) "
          f"on {summary['device']}, torch {summary['torch']}, transformers {summary['transformers']}")
    targets = {"audit/passes": 1.3, "audit3/audit": 1.25}
    for name, value in ratios.items():
        bar = f"   (target <= {targets[name]})" if name in targets else ""
        print(f"  {name:18s} {value:6.2f}{bar}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
