"""``lossaudit check MODEL``: audit one model and write its report."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from ..errors import UsageError
from ..gate import OPTIONS as GATE_OPTIONS
from ..gate import Gate, add_gate_arguments
from ..terminal import add_color_argument

HELP = "audit one model"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model_type (built tiny), save_pretrained directory, or cached hub id")
    p.add_argument("--task", help="causal-lm, seq2seq, token-classification, sequence-classification")
    p.add_argument("--path", dest="paths", type=_names, action="extend",
                   help="paths to audit, e.g. model,trainer (repeatable; default all that apply)")
    p.add_argument("--microbatches", type=_ints, help="values of k, e.g. 1,2,4,8")
    p.add_argument("--reductions", type=_names, help="reductions, e.g. mean_of_means,num_items or module:function")
    p.add_argument("--paddings", type=_names, help="padding sides: right,left (default both)")
    p.add_argument("--groupings", type=_names,
                   help="how sequences are grouped into microbatches: contiguous,length_sorted,imbalanced (default all)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--trainer-arg", dest="trainer_args", type=_key_value, action="append", default=[])
    p.add_argument("--loss-fn", metavar="MODULE:FUNCTION",
                   help="your compute_loss_func(outputs, labels, num_items_in_batch=None), audited on its own and in the Trainer")
    p.add_argument("--config-arg", dest="config_args", type=_key_value, action="append", default=[])
    p.add_argument("--step", metavar="MODULE:FUNCTION", help="your training step (path step): "
                   "FUNCTION(model, microbatches) runs forward and backward, leaves .grad, returns the loss")
    p.add_argument("--lightning-module", metavar="MODULE:FACTORY",
                   help="FACTORY(model) -> your LightningModule (path lightning)")
    p.add_argument("--trainer-class", metavar="MODULE:CLASS",
                   help="a transformers.Trainer subclass for the trainer path, e.g. trl:SFTTrainer")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder (save_pretrained) to audit on MODEL")
    p.add_argument("--peft", metavar="METHOD", help="a fresh PEFT adapter on MODEL: lora, prompt_tuning, ...")
    p.add_argument("--peft-arg", dest="peft_args", type=_key_value, action="append", default=[],
                   help="KEY=VALUE for the --peft method's config (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--min-length", type=int, default=4)
    p.add_argument("--empty-sequences", type=int, default=0, help="sequences with no target token")
    p.add_argument("--no-prompt-masking", dest="prompt_masking", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, float64, bfloat16 or float16")
    p.add_argument("--num-layers", type=int, help="keep this many layers (cut a checkpoint's depth for a fast audit)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a pickle checkpoint (pytorch_model.bin) with torch.load(weights_only=True)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code that config.json's auto_map names")
    p.add_argument("--allow-download", action="store_true",
                   help="download a hub id that is not in the local cache (default: the cache only)")
    p.add_argument("--out", type=Path, help="report directory (default reports/MODEL-TASK/)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--baseline", type=Path, metavar="FILE",
                   help="a report.json to compare with after the audit: exit 1 on a regression too")
    p.add_argument("--replace-baseline", action="store_true",
                   help="allow --out to write the new report over the --baseline file")
    add_gate_arguments(p)
    add_color_argument(p)


NOT_CONFIG = {"command", "out", "overwrite", "color", "baseline", "replace_baseline"} | {o.dest for o in GATE_OPTIONS}


def config_from_args(args: argparse.Namespace):
    from ..config import CheckConfig

    options = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    for key in ("paths", "trainer_args", "config_args", "peft_args"):
        options[key] = tuple(options[key]) if options[key] is not None else None
    for key in ("reductions", "paddings", "groupings"):  # None: the config's default
        if options[key] is None:
            del options[key]
    options["trainer_args"] = options["trainer_args"] or ()
    options["config_args"] = options["config_args"] or ()
    options["peft_args"] = options["peft_args"] or ()
    return CheckConfig(**options)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).name or name).strip("-") or "model"


def check_out(out: Path | None, overwrite: bool, name: str = "report.json") -> None:
    """Fail before any work if the report (``name``) cannot be written or would replace one."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if (out / name).exists() and not overwrite:
        raise UsageError(f"--out {out}: already holds a report; pass --overwrite to replace it")
    existing = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a directory")
    if not _can_create_in(existing):
        raise UsageError(f"--out {out}: cannot create files in {existing}")


def _can_create_in(directory: Path) -> bool:
    """Try it: permission bits say nothing to root, nor about read-only file systems."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".lossaudit-probe-"):
            return True
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def check_baseline(args: argparse.Namespace):
    """Load the baseline before any work (a missing or broken one is a usage error), refuse an
    --out that would write onto it unless --replace-baseline, and refuse gate options without it."""
    if args.baseline is None:
        changed = [f"--{o.name}" for o in GATE_OPTIONS
                   if getattr(args, o.dest) != (False if o.flag else o.kwargs()["default"])]
        if changed or args.replace_baseline:
            raise UsageError(f"{', '.join(changed or ['--replace-baseline'])}: only with --baseline FILE")
        return None
    from ..report import Report

    baseline = Report.load(args.baseline)
    if args.out is not None and _same_file(args.out / "report.json", args.baseline) and not args.replace_baseline:
        raise UsageError(f"--out {args.out} would write over the baseline {args.baseline}; "
                         "choose another --out, or pass --replace-baseline to replace it")
    return baseline


def default_out(model: str, task: str) -> Path:
    """reports/MODEL-TASK/, or -2, -3, ... beside it: an earlier report is never replaced."""
    base = Path("reports") / f"{_slug(model)}-{task}"
    out, n = base, 1
    while (out / "report.json").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def run(args: argparse.Namespace) -> int:
    from ..distributed import is_leader, joined_world_size
    from ..harness import audit
    from ..render import write_report
    from ..terminal import print_summary, progress, use_color

    baseline = check_baseline(args)
    replacing = baseline is not None and args.replace_baseline
    check_out(args.out, args.overwrite or replacing)
    args.world_size = joined_world_size(args.world_size, args.device)  # under torchrun: the launcher's ranks
    config = config_from_args(args)
    with progress(color=use_color(sys.stderr, args.color), stream=sys.stderr) as say:
        report = audit(config, say if is_leader() else None)
    if not is_leader():  # under a launcher, rank 0 writes and prints the report
        return report.exit_status
    out = args.out or default_out(config.model, report.model["task"])
    written = write_report(report, out)
    print_summary(report, written, color=use_color(sys.stdout, args.color))
    if baseline is None:
        return report.exit_status
    return gate_status(report, baseline, args, out)


def gate_status(report, baseline, args: argparse.Namespace, out: Path) -> int:
    """The combined rule of check --baseline: exit 1 on a regression against the baseline, and
    exit 1 on a finding of this audit whether or not it is new (check's own rule)."""
    from ..baseline import GatedReport, compare, render_comparison

    comparison = compare(baseline, report, Gate.from_args(args), old_name=str(args.baseline),
                         new_name=str(out / "report.json"))
    print()
    print(render_comparison(comparison))
    status = GatedReport(report, comparison).exit_status
    print(f"exit {status}: {len(comparison.regressions)} regression(s) against the baseline, "
          f"{len(report.findings)} finding(s) in this audit")
    return status
