"""What an audit costs next to the training passes it cannot avoid (issues 6 and 18).

    python benchmarks/bench_audit.py --size tiny
    python benchmarks/bench_audit.py --size 50m --microbatches 1,2,4
    python benchmarks/bench_audit.py --size 1b --device cuda --dtype bfloat16 --path reduction,trainer,accelerate --json 1b.json
    python benchmarks/bench_audit.py --size 8b --device cuda --dtype bfloat16 --json 8b.json --timeout 150

The model (a Llama of the given shape, random weights, fixed seed) is built directly on the
device in its dtype. Each mode runs in a fresh child process (so its peak memory is its own),
on the same model, batch (8 x 512 for 1b/8b) and layouts (k in {1,4} by default), after one
warm-up forward/backward whose memory is released before the peak counter is reset:

--path reduction (the default):
- passes:  the minimal work: one full-batch forward/backward, then one forward/backward per
           microbatch of every layout (the audit's layouts, from lossaudit.core.layouts);
- train:   one plain training step (full batch forward, backward, SGD step): the memory bar;
- audit:   ``check --path reduction --reductions num_items`` (one reduction: any other would
           run beside num_items, which the harness runs on every layout);
- audit3:  the same with ``--reductions mean_of_means,num_items,sum``.
--path default: ``check`` with every default path and reduction, within ``--max-memory`` (on CUDA
           by default 94 % of the device; 74.5 GiB is an 80 GB card's): its peak against 75 GiB.
--path trainer / --path accelerate, each against its own minimal passes:
- trainer_passes:    one plain transformers.Trainer step per layout (no reference, probe or comparison);
- trainer:           ``check --path trainer``;
- accelerate_passes: every accelerate recipe's step per layout, without the audit;
- accelerate:        ``check --path accelerate``.

Peak memory is torch.cuda.max_memory_allocated on CUDA (weights included). On the CPU it is
what the process holds: its peak resident memory (VmHWM, reset after the warm-up) beyond what
it held with torch, transformers, accelerate and lossaudit imported, before the model was built
and the model's code (lossaudit.audit.memory.ResidentMeter; the weights included), with MALLOC_MMAP_THRESHOLD_ set
in the child so that freed blocks go back to the system. Time on the CPU is the process's CPU
time (steadier than wall time on a shared machine). ``--max-memory-train X`` gives the default
mode a --max-memory of X times the train mode's measured peak (the train mode runs first),
``--max-memory-audit X`` the audit and audit3 modes (on the CPU less what the process held
beyond the weights when the audit began, so that the cap holds the peak as measured here);
what the audit said to fit it (passes,
blocks of parameters) is printed under the mode, and a refusal (exit 2: the budget cannot hold
the audit) is the mode's result.
A mode that runs out of memory or past --timeout is a result ("out of memory", "timeout"),
not a crash. It prints the ratio table and, with --json, writes it with the date, device and
library versions. Timings on a shared or busy machine are noisy: use --repeat.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

SIZES = {  # Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab, max_length)
    "tiny": None,  # lossaudit's own tiny Llama config (the model `check llama` builds)
    "50m": (512, 8, 8, 8, 1376, 32000, 128),
    "200m": (1024, 12, 16, 16, 2816, 32000, 64),  # issue 28's CPU shape: parameters dominate, as on the 8B GPU one
    "1b": (2048, 16, 32, 8, 8192, 128256, 512),  # Llama-3.2-1B-shaped
    "8b": (4096, 32, 32, 8, 14336, 128256, 512),  # Llama-3-8B-shaped
}
MODES = {
    "reduction": ("passes", "train", "audit", "audit3"),
    "trainer": ("trainer_passes", "trainer"),
    "accelerate": ("accelerate_passes", "accelerate"),
    "default": ("default",),
}
AUDITS = {  # mode -> (path, reductions)
    "audit": ("reduction", ("num_items",)),  # the correct reduction: the harness runs no other beside it
    "audit3": ("reduction", ("mean_of_means", "num_items", "sum")),
    "trainer": ("trainer", ("num_items",)),
    "accelerate": ("accelerate", ("num_items",)),
    "default": (None, None),  # every default path and reduction, within --max-memory
}
# (name, numerator, denominator, what is divided, target from issue 18 or None)
RATIOS = (
    ("audit/passes", "audit", "passes", "seconds", 1.15),
    ("audit3/audit", "audit3", "audit", "seconds", 1.10),
    ("peak audit/train", "audit", "train", "peak_bytes", 1.4),
    ("peak audit3/train", "audit3", "train", "peak_bytes", None),
    ("peak default/train", "default", "train", "peak_bytes", None),  # within --max-memory-train where given
    ("trainer/trainer_passes", "trainer", "trainer_passes", "seconds", 1.5),
    ("peak trainer/trainer_passes", "trainer", "trainer_passes", "peak_bytes", None),
    ("accelerate/accelerate_passes", "accelerate", "accelerate_passes", "seconds", 1.5),
    ("peak accelerate/accelerate_passes", "accelerate", "accelerate_passes", "peak_bytes", None),
)
GIB = 2 ** 30
MMAP_THRESHOLD = 1 << 16  # bytes: glibc serves larger blocks with mmap and gives them back when freed


# ---- the child: one mode in a fresh process ------------------------------------------------

def llama_config(size: str):
    from transformers import LlamaConfig

    from lossaudit.models.tiny import tiny_config

    if SIZES[size] is None:
        config = tiny_config("llama")
        return config, 32
    hidden, layers, heads, kv, inter, vocab, max_length = SIZES[size]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=max_length, pad_token_id=0, use_cache=False), max_length


def build(size: str, seed: int, device, dtype):
    """The model, built on ``device`` in ``dtype`` (never float32 on the CPU first)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lossaudit.models.loading import LoadedModel

    config, max_length = llama_config(size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    return LoadedModel(model, "llama" if size == "tiny" else f"llama-{size}", "causal-lm", "tiny"), max_length


def check_config(args, loaded, max_length, mode: str):
    from lossaudit.audit.config import CheckConfig

    path, reductions = AUDITS.get(mode, ("reduction", ("num_items",)))
    layouts = {k: v for k, v in (("paddings", args.paddings), ("groupings", args.groupings)) if v}
    return CheckConfig(model=loaded.name, paths=(path,) if path else None, reductions=reductions,
                       microbatches=args.microbatches, batch_size=args.batch_size, max_length=max_length, seed=args.seed,
                       device=args.device, dtype=args.dtype, max_memory=args.max_memory, **layouts)


def child(args) -> dict:
    """One mode in this (fresh) process."""
    import torch
    from accelerate import Accelerator  # noqa: F401  (imported before the baseline, as every library a mode uses)
    from transformers import Trainer  # noqa: F401

    import lossaudit.audit.harness  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (the model's code: a library, not the audit's)
    from lossaudit.audit.memory import resident_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    args.resident_start = resident_bytes()  # the interpreter with its libraries: what no mode holds
    device = torch.device(args.device)
    loaded, max_length = build(args.size, args.seed, device, getattr(torch, args.dtype))
    return measure(args, loaded, max_length, args.mode)


def measure(args, loaded, max_length, mode: str) -> dict:
    """One mode on ``loaded``: its time, then its peak. On CUDA one run gives both (the peak
    counter is reset after the warm-up); on the CPU the peak is metered in a second run (the
    meter sees every operator, which slows it)."""
    import torch

    device = torch.device(args.device)
    config = check_config(args, loaded, max_length, mode)
    result = {"mode": mode, "parameters": loaded.parameters}
    try:
        warm_up(loaded, config, device)
        _sync(device)
        if getattr(args, "cap_bytes", None) and device.type == "cpu":
            config = held_to(args, loaded, config)
            result["max_memory_gib"], result["cap_bytes"] = config.max_memory, args.cap_bytes
        meter = cpu_meter(args, device)  # the peak starts over here, after the warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        result["cases"] = MEASURE[mode](loaded, config, device)
        _sync(device)
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu_start  # this process's CPU time: steadier on a shared CPU
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else meter.peak()
        if meter is not None:
            result["peak_resettable"] = meter.resettable
        if SAID:
            result["said"] = list(SAID)
    except Exception as exc:
        from lossaudit.audit.faults import is_out_of_memory
        from lossaudit.core.errors import UsageError

        oom = is_out_of_memory(exc) or "out of memory" in str(exc)
        result["error"] = "out of memory" if oom else f"refused (exit 2): {exc}" if isinstance(exc, UsageError) else \
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def held_to(args, loaded, config):
    """``config`` with the --max-memory that holds the audit's peak, as this benchmark measures
    it on the CPU (beyond the interpreter with its libraries), to ``args.cap_bytes``: lossaudit
    counts from what the process holds when the audit begins, less the weights, so what the
    process held beyond the weights then (the warm-up's leftovers) comes off the cap."""
    import dataclasses

    from lossaudit.audit.memory import resident_bytes

    weights = sum(t.untyped_storage().nbytes() for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    residue = max(resident_bytes() - args.resident_start - weights, 0)
    return dataclasses.replace(config, max_memory=max(args.cap_bytes - residue, 1) / GIB)


def in_process(args, modes: list[str]):
    """Every mode in this process on one model (``--in-process``: no start-up per mode), the
    allocator emptied and the peak counter reset between modes. Yields (mode, result)."""
    import torch

    from lossaudit.audit.memory import resident_bytes

    args.resident_start = resident_bytes()
    device = torch.device(args.device)
    loaded, max_length = build(args.size, args.seed, device, getattr(torch, args.dtype))
    for mode in modes:
        yield mode, measure(args, loaded, max_length, mode)
        loaded.model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cpu_meter(args, device):
    """On the CPU, what the process holds beyond the interpreter with its libraries (measured
    before the model was built), its peak counted from now; None on CUDA."""
    from lossaudit.audit.memory import ResidentMeter, resident_bytes

    if device.type == "cuda":
        return None
    return ResidentMeter(start=getattr(args, "resident_start", None) or resident_bytes())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(loaded, config, device) -> None:
    """One full-batch forward/backward (kernels, cuBLAS handles, the allocator), then every
    byte of it released and the peak counter reset: a mode's peak is its own. The Trainer and
    accelerate are imported here too, so that no mode's time holds their first import."""
    import torch
    from accelerate import Accelerator  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from lossaudit.audit.harness import batch_for
    from lossaudit.core.layouts import full_batch

    _backward(loaded, full_batch(batch_for(loaded, config.batch_spec)), device)
    loaded.model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _backward(loaded, mb, device) -> None:
    """Forward, the token-mean loss (lossaudit's float64 token losses, as the audit), backward into .grad."""
    from lossaudit.core.forward import forward
    from lossaudit.core.tokens import target_mask, token_losses

    outputs, _ = forward(loaded.model, mb, device)
    losses = token_losses(outputs.logits, mb.labels.to(device), loaded.task)
    (losses.sum() / max(int(target_mask(mb.labels, loaded.task).sum()), 1)).backward()


def _layouts(loaded, config):
    from lossaudit.audit.harness import batch_for
    from lossaudit.core.layouts import plan_layouts

    batch = batch_for(loaded, config.batch_spec)
    return batch, plan_layouts(batch, config.ks, paddings=config.paddings, groupings=config.groupings)


def passes(loaded, config, device) -> int:
    """The forward/backward passes no audit can skip."""
    from lossaudit.core.layouts import full_batch, microbatches

    batch, layouts = _layouts(loaded, config)
    _backward(loaded, full_batch(batch), device)
    for layout in layouts:
        for mb in microbatches(batch, layout):
            _backward(loaded, mb, device)
    return len(layouts)


def train(loaded, config, device) -> int:
    """One plain training step: the memory bar."""
    import torch

    from lossaudit.core.layouts import full_batch

    batch, _ = _layouts(loaded, config)
    _backward(loaded, full_batch(batch), device)
    torch.optim.SGD(loaded.model.parameters(), lr=1e-6).step()
    return 0


SAID: list[str] = []  # what the audit said about fitting its memory (passes, blocks of parameters)


def run_audit(loaded, config, device) -> int:
    from lossaudit.audit.harness import audit

    def say(line: str) -> None:
        if "to fit" in line:
            SAID.append(line)
    return len(audit(config, say, loaded=loaded).cases)


def trainer_passes(loaded, config, device) -> int:
    """One plain transformers.Trainer step per layout (as the trainer path's, without the audit)."""
    batch, layouts = _layouts(loaded, config)
    gc.freeze()  # as the trainer path: the Trainer's full collection at start would see every object
    try:
        for layout in layouts:
            trainer_step(loaded.model, batch, layout, device)
    finally:
        gc.unfreeze()
    return len(layouts)


def trainer_step(model, batch, layout, device) -> None:
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from lossaudit.core.forward import model_inputs
    from lossaudit.core.layouts import collate

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def collator(indices):
        mb = collate(batch, tuple(indices), layout.padding)
        return {**model_inputs(model, mb, torch.device("cpu")), "labels": mb.labels}

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out:
        trainer_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=len(layout.groups[0]),
            gradient_accumulation_steps=layout.microbatches, max_steps=1, learning_rate=1e-6,
            lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=device.type == "cpu", report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=0, dataloader_pin_memory=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
        trainer = InOrder(model=model, args=trainer_args, data_collator=collator,
                          train_dataset=[i for g in layout.groups for i in g],
                          optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)))
        trainer.remove_callback(PrinterCallback)  # as the trainer path: no metrics printed
        trainer.train()
    model.zero_grad(set_to_none=True)


def accelerate_passes(loaded, config, device) -> int:
    """Every accelerate recipe's step per layout (the loops under audit), without the audit."""
    from functools import partial

    import torch
    from accelerate import Accelerator

    from lossaudit.core.forward import model_inputs
    from lossaudit.core.layouts import collate
    from lossaudit.paths.accelerate import DEFAULT_RECIPES, LOOPS, RECIPES, TokenCounts, _call
    from lossaudit.core.tokens import count_targets

    batch, layouts = _layouts(loaded, config)
    model = loaded.model
    steps = 0
    for layout in layouts:
        mbs = [collate(batch, g, layout.padding) for g in layout.groups]
        batches = [(model_inputs(model, mb, device), mb.labels.to(device)) for mb in mbs]
        total = sum(count_targets(mb.labels, loaded.task) for mb in mbs)
        counts = TokenCounts(layout.microbatches, 1, total, total)
        for recipe in (RECIPES.get(n) for n in DEFAULT_RECIPES):
            accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False,
                                      gradient_accumulation_steps=layout.microbatches)
            prepared, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-6))
            loss_fn = partial(_call, recipe.loss, task=loaded.task, counts=counts)
            LOOPS[recipe.loop](accelerator, prepared, optimizer, batches, loss_fn)
            accelerator.sync_gradients = True
            model.zero_grad(set_to_none=True)
            steps += 1
    return steps


MEASURE = {"passes": passes, "train": train, "audit": run_audit, "audit3": run_audit,
           "trainer_passes": trainer_passes, "trainer": run_audit,
           "accelerate_passes": accelerate_passes, "accelerate": run_audit, "default": run_audit}
ABSOLUTE = (("peak default (GiB)", "default", 75.0),)  # (name, mode, target): issue 18's 8B bar on an 80 GB card


# ---- the parent: every mode, the ratios, the table -----------------------------------------

def run_child(args, mode: str, timeout: float | None = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", args.size,
               "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--microbatches", ",".join(map(str, args.microbatches)),
               *(["--paddings", ",".join(args.paddings)] if args.paddings else []),
               *(["--groupings", ",".join(args.groupings)] if args.groupings else []),
               *(["--threads", str(args.threads)] if args.threads else []),
               *(["--max-memory", str(args.max_memory)] if args.max_memory else []),
               *(["--cap-bytes", str(args.cap_bytes)] if getattr(args, "cap_bytes", None) else [])]
    start = time.perf_counter()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))}
    child_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)  # its own group: a timeout ends all of it
    timeout = args.timeout if timeout is None else timeout
    try:
        stdout, stderr = child_process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child_process.pid, signal.SIGKILL)
        child_process.communicate()
        return {"mode": mode, "error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = stdout.strip().splitlines()
    if child_process.returncode != 0 or not lines:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        error = "out of memory" if "out of memory" in stderr.lower() else f"exit {child_process.returncode}: {tail[-400:]}"
        return {"mode": mode, "error": error}
    result = json.loads(lines[-1])
    result["process_seconds"] = wall
    return result


def environment(args) -> dict:
    import torch
    import transformers

    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        device = f"{args.device} ({props.name}, {props.total_memory / GIB:.1f} GiB)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import accelerate

        versions["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, **versions,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def ratios(results: dict, cpu: bool = False) -> dict:
    """Each ratio of RATIOS; on the CPU the time ratios also in CPU time ("... (cpu time)")."""
    out = {}
    for name, num, den, key, _target in RATIOS:
        a, b = results.get(num, {}), results.get(den, {})
        for k, label in ((key, name), *((("cpu_seconds", f"{name} (cpu time)"),) if cpu and key == "seconds" else ())):
            if k in a and k in b and "error" not in a and "error" not in b and b[k]:
                out[label] = a[k] / b[k]
    return out


def _cell(result: dict | None, key: str) -> str:
    if not result:
        return "-"
    if "error" in result:
        at = f" at {_bytes(result['peak_bytes'])}" if key == "peak_bytes" and result.get("peak_bytes") else ""
        return result["error"].split(":")[0] + at
    return f"{result[key]:.2f} s" if key == "seconds" else _bytes(result[key])


def _bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def table(summary: dict) -> str:
    """The issue's table (one row for this model), then the step paths' rows."""
    r, q = summary["results"], summary["ratios"]
    n = summary.get("parameters")
    name = f"{summary['size']} ({n / 1e9:.2f} G params)" if n and n >= 1e8 else (f"{summary['size']} ({n:,} params)" if n else summary["size"])
    ratio = lambda key: f"{q[key]:.2f}" if key in q else "-"  # noqa: E731
    lines = []
    if "passes" in r:
        lines += ["| model | minimal passes | audit, 1 reduction | audit / passes | audit, 3 reductions | 3 / 1 "
                  "| peak: training step | peak: audit 1 | peak: audit 3 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {name} | {_cell(r.get('passes'), 'seconds')} | {_cell(r.get('audit'), 'seconds')} "
                  f"| {ratio('audit/passes')} | {_cell(r.get('audit3'), 'seconds')} | {ratio('audit3/audit')} "
                  f"| {_cell(r.get('train'), 'peak_bytes')} | {_cell(r.get('audit'), 'peak_bytes')} "
                  f"| {_cell(r.get('audit3'), 'peak_bytes')} |"]
    steps = [p for p in ("trainer", "accelerate") if p in r or f"{p}_passes" in r]
    if steps:
        lines += ["", "| model | path | its minimal passes | audit | audit / passes | peak: passes | peak: audit |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in steps:
            lines.append(f"| {name} | {p} | {_cell(r.get(f'{p}_passes'), 'seconds')} | {_cell(r.get(p), 'seconds')} "
                         f"| {ratio(f'{p}/{p}_passes')} | {_cell(r.get(f'{p}_passes'), 'peak_bytes')} "
                         f"| {_cell(r.get(p), 'peak_bytes')} |")
    return "\n".join(lines)


def _modes(text: str) -> tuple[str, ...]:
    paths = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [p for p in paths if p not in MODES]
    if unknown or not paths:
        raise argparse.ArgumentTypeError(f"--path: expected some of {', '.join(MODES)}, got {text!r}")
    return paths


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--path", dest="paths", type=_modes, default=("reduction",),
                   help="reduction, trainer, accelerate (comma-separated; default reduction)")
    p.add_argument("--modes", type=lambda s: tuple(x for x in s.split(",") if x), help="only these modes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--microbatches", type=_ints, default=(1, 4))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paddings", type=lambda s: tuple(x for x in s.split(",") if x), help="only these paddings (default: lossaudit's)")
    p.add_argument("--groupings", type=lambda s: tuple(x for x in s.split(",") if x), help="only these groupings (default: lossaudit's)")
    p.add_argument("--threads", type=int, help="torch threads in each mode (default: torch's)")
    p.add_argument("--repeat", type=int, default=1, help="runs per mode; the fastest counts")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mode (child process) before it is killed")
    p.add_argument("--budget", type=float, help="seconds for all modes: a mode gets at most what is left, "
                   "and one that cannot start in time is recorded as skipped")
    p.add_argument("--in-process", action="store_true",
                   help="every mode in one process on one model, the allocator emptied between modes "
                        "(no start-up per mode; no per-mode timeout)")
    p.add_argument("--max-memory", type=float, help="GiB the audit may hold (lossaudit's --max-memory; without it "
                   "lossaudit plans within 1.4x the reference's peak, on CUDA within 94 %% of the device): 74.5 is an "
                   "80 GB card's")
    p.add_argument("--max-memory-train", type=float, help="give the default mode a --max-memory of this many times "
                   "the train mode's measured peak (1.9: issue 28's bar); the train mode must run before it")
    p.add_argument("--max-memory-audit", type=float, help="give the audit and audit3 modes a --max-memory of this "
                   "many times the train mode's measured peak (1.4: issue 28's bar for one reduction)")
    p.add_argument("--json", help="also write the results to this file (after every mode)")
    p.add_argument("--cap-bytes", type=int, help=argparse.SUPPRESS)  # the child's cap, as measured here (held_to)
    p.add_argument("--child", choices=[m for ms in MODES.values() for m in ms], dest="mode", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    modes = [m for p in args.paths for m in MODES[p] if not args.modes or m in args.modes]
    results = {}
    for mode, result in (in_process(args, modes) if args.in_process else children(args, modes)):
        results[mode] = result
        said = result["error"] if "error" in result else \
            f"{result['seconds']:8.2f} s   peak {_bytes(result['peak_bytes'])}"
        print(f"  {mode:18s} {said}", file=sys.stderr, flush=True)
        for line in result.get("said", []):
            print(f"  {'':18s} {line}", file=sys.stderr, flush=True)
        summary = summarise(args, results)
        if args.json:  # after every mode: a run ended from outside still leaves what it measured
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    print(f"{args.size} ({summary['parameters'] or 0:,} parameters, {args.dtype}, batch {args.batch_size}, k in "
          f"{set(args.microbatches)}) on {summary['device']}, torch {summary['torch']}, "
          f"transformers {summary['transformers']}")
    print(table(summary))
    for name, value in {**summary["ratios"], **summary["absolute"]}.items():
        target = summary["targets"].get(name.removesuffix(" (cpu time)"))
        if name == "peak default/train" and args.max_memory_train:
            target = args.max_memory_train
        if name in ("peak audit/train", "peak audit3/train") and args.max_memory_audit:
            target = args.max_memory_audit
        print(f"  {name:34s} {value:6.2f}" + (f"   (target <= {target})" if target else ""))
    return 0


def children(args, modes: list[str]):
    """Each mode in a fresh child process (the fastest of --repeat runs), within --timeout and
    --budget. Yields (mode, result)."""
    deadline = time.monotonic() + args.budget if args.budget else None
    done, given = {}, args.max_memory
    for mode in modes:
        args.max_memory, args.cap_bytes = given, None
        ratio = args.max_memory_train if mode == "default" else args.max_memory_audit if mode in ("audit", "audit3") else None
        if ratio and "peak_bytes" in done.get("train", {}) and "error" not in done["train"]:
            args.max_memory = ratio * done["train"]["peak_bytes"] / GIB
            if args.device == "cpu":  # the child sets --max-memory from it (held_to)
                args.cap_bytes = int(ratio * done["train"]["peak_bytes"])
        runs = []
        for _ in range(args.repeat):
            left = args.timeout if deadline is None else min(args.timeout, deadline - time.monotonic())
            runs.append(run_child(args, mode, left) if left >= 5 else {"mode": mode, "error": "skipped: out of --budget"})
        good = [r for r in runs if "error" not in r]
        best = min(good, key=lambda r: r["cpu_seconds" if args.device == "cpu" else "seconds"]) if good else runs[-1]
        if args.max_memory and "max_memory_gib" not in best:
            best["max_memory_gib"] = args.max_memory
        done[mode] = best
        yield mode, best


def summarise(args, results: dict) -> dict:
    parameters = next((r["parameters"] for r in results.values() if "parameters" in r), None)
    return {"size": args.size, "dtype": args.dtype, "parameters": parameters, "batch_size": args.batch_size,
            "microbatches": list(args.microbatches), "paths": list(args.paths),
            "processes": "one" if args.in_process else "one per mode",
            "layouts": next((r["cases"] for m, r in results.items() if m == "passes" and "cases" in r), None),
            "max_memory_gib": args.max_memory, **environment(args), "results": results,
            "ratios": ratios(results, cpu=not args.device.startswith("cuda")),
            "absolute": {name: results[mode]["peak_bytes"] / GIB for name, mode, _ in ABSOLUTE
                         if "error" not in results.get(mode, {"error": 1}) and "peak_bytes" in results[mode]},
            "targets": {name: target for name, *_, target in RATIOS + ABSOLUTE if target is not None}}


if __name__ == "__main__":
    sys.exit(main())
