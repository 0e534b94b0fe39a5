"""What an audit holds in memory beyond a plain training step, as a formula, and two meters:
what the process holds (``ResidentMeter``: peak resident memory, the measure of ``--max-memory``
on the CPU, where RAM is the limit) and what its tensors hold (``LiveTensorBytes``: every storage
an operator returns, counted until freed, as ``torch.cuda.max_memory_allocated`` on a GPU).

A plain training step on the full batch peaks at ``T = W + G + A``: the weights, their gradient
(``P x b`` bytes for P trainable parameters in a dtype of b bytes) and what the forward keeps for
the backward. ``audit_peak_bytes`` predicts the audit's peak from a measured T; beyond it:

- the reference gradient, kept all run: ``P x b``;
- while one layout's logit paths run (``reduction``, ``model``, ``loss-fn`` and the correct
  reduction the harness runs on every layout): one gradient sum per distinct sum, ``P x b``
  each (accumulate.py: the model's dtype; proportional reductions share one, so num_items and
  sum cost one together). The backward hands each parameter's gradient to the sums and frees it
  at once, and the last backward of a microbatch frees what its forward saved as it goes, so
  the first sum stands where a training step keeps its gradient: it costs nothing beyond the
  step. Where a path has a loss of its own (a non-uniform reduction such as sequence_mean, the
  model's loss, a user's loss function), the correct gradient of the microbatch is kept while
  that path's backward runs, to measure the path's weight: ``P x b``;
- from a layout's second microbatch on, each gradient arrives beside the sum's tensor it is
  added into: the largest tensor's (``arriving_bytes``), less what that microbatch's smaller
  activations leave free;
- the comparison widens pieces of at most ``grads.chunk`` elements (2^24 on a GPU, 2^20 on
  the CPU): a few of those;
- while a step path runs (``trainer``, ``accelerate``): the reference beside the step's own
  peak. The update the probe reads is the step's gradient itself (``paths/probe.py``: lossaudit's
  step paths step plain SGD, whose update is -grad), no tensor beyond it; where a step misses its
  target, another objective's reference beside both (whole, or in ``blocks`` one block's).

The model path's own loss adds its float32 logits and their softmax (``logits_bytes``) to a
microbatch's forward: with k=1 that microbatch is the full batch.

``tests/audit/test_memory_measured.py`` holds the prediction to within 10 % of the measured
peak resident memory of real audits, on a shape whose parameters dominate and on one whose
activations do; ``benchmarks/bench_audit.py`` measures the same on the CPU shapes of issue 28.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.grads import CHUNK, CPU_CHUNK

GIB = 2 ** 30


@dataclass(frozen=True)
class AuditShape:
    """What the audit's memory depends on, in bytes or counts."""

    parameters: int  # P: trainable parameters
    param_bytes: int  # b: bytes per parameter in the model's dtype (2 for bf16); a gradient sum's too
    sums: int  # gradient sums alive together while logit paths run (sums_held)
    keeps_correct: bool = False  # a path with a loss of its own runs: the correct gradient is kept for it
    largest_tensor: int = 0  # elements of the largest parameter tensor
    logits_bytes: int = 0  # the model path's float32 logits and softmax over one microbatch (0 without it)
    step_path: bool = False  # a trainer or accelerate path runs
    device: str = "cuda"  # the device type: the comparison's pieces are smaller on the CPU (grads.chunk)
    weight_bytes: int = 0  # W: every parameter and buffer (0: taken as P x b)
    split: int = 4  # the fewest microbatches of a layout with more than one (0: no such layout)
    blocks: int = 1  # blocks of parameters the logit paths run in (harness.run_layout, under --max-memory)

    @property
    def wide_bytes(self) -> int:
        """Bytes of an element the comparison widens to: float32, or float64's 8."""
        return max(4, self.param_bytes)


def logit_phase_bytes(s: AuditShape, train_step_peak: int | None = None) -> int:
    """Beyond the training step while logit paths run: reference + every sum but the first
    + the kept correct gradient + what a gradient arriving into a full sum adds + comparison
    temporaries (+ the model path's own float32 loss): the reference stands where the step
    keeps its gradient, so what is beyond is the sums and the kept correct gradient, in
    ``blocks`` of parameters one block's (about 1/blocks of each)."""
    pb = s.parameters * s.param_bytes
    held = (s.sums + s.keeps_correct) * pb // max(s.blocks, 1)  # the sums and the kept correct gradient
    return held + arriving_bytes(s, train_step_peak) + comparison_bytes(s) + s.logits_bytes


def arriving_bytes(s: AuditShape, train_step_peak: int | None = None) -> int:
    """From a layout's second microbatch on, each gradient the backward produces stands beside
    the sum's tensor it is added into until it is freed: at most the largest tensor's (the
    embedding's or the output layer's), which a training step's first gradient does not have.
    But a microbatch of a layout split in k holds about 1/k of the full batch's activations:
    given the training step's peak (W + its gradient + activations A), what it does not hold,
    A (1 - 1/k), pays for that gradient first."""
    arriving = s.largest_tensor * s.param_bytes if s.split else 0
    if train_step_peak is None or not arriving:
        return arriving
    pb = s.parameters * s.param_bytes
    activations = max(train_step_peak - (s.weight_bytes or pb) - pb, 0)
    return max(arriving - int(activations * (1 - 1 / s.split)), 0)


def step_phase_bytes(s: AuditShape, train_step_peak: int | None = None) -> int:
    """Beyond the training step while a step path runs: the reference (the logit paths' sums are
    freed by then; the update the probe reads is the step's own gradient), and, where the step
    misses its target (an expected recipe such as accelerate's ``naive`` does), another
    objective's reference taken beside both (``Judge.other_objectives``): a whole gradient, or,
    in ``blocks``, one block's."""
    if not s.step_path:
        return 0
    pb = s.parameters * s.param_bytes
    return pb + pb // max(s.blocks, 1) + arriving_bytes(s, train_step_peak) + comparison_bytes(s)


def comparison_bytes(s: AuditShape) -> int:
    """compare_grads and the hooks' dot products, per piece: both sides widened and their
    difference, at most CHUNK elements each. (The gradient a hook is handed is the one a
    training step would keep; the first sum takes it as it is.)"""
    return 3 * min(s.largest_tensor, CHUNK if s.device == "cuda" else CPU_CHUNK) * s.wide_bytes


def audit_extra_bytes(s: AuditShape, train_step_peak: int | None = None) -> int:
    """Bytes the audit may hold beyond a plain training step's peak on the same batch (without
    that peak: the gradient arriving into a full sum counted whole, an upper bound)."""
    return max(logit_phase_bytes(s, train_step_peak), step_phase_bytes(s, train_step_peak))


def audit_peak_bytes(train_step_peak: int, s: AuditShape) -> int:
    """The audit's peak by the memory model: a training step's peak plus ``audit_extra_bytes``."""
    return train_step_peak + audit_extra_bytes(s, train_step_peak)


def shape_of(model: torch.nn.Module, *, sums: int, keeps_correct: bool = False, logits_bytes: int = 0,
             step_path: bool = False, split: int = 4, blocks: int = 1) -> AuditShape:
    """The AuditShape of ``model`` (its trainable parameters, dtype and largest tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return AuditShape(
        parameters=sum(p.numel() for p in params),
        param_bytes=params[0].element_size(),
        sums=sums,
        keeps_correct=keeps_correct,
        largest_tensor=max(p.numel() for p in params),
        logits_bytes=logits_bytes,
        step_path=step_path,
        device=params[0].device.type,
        weight_bytes=sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
        split=split,
        blocks=blocks,
    )


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return resident_peak_bytes()


def resident_peak_bytes() -> int:
    """The process's peak resident memory since it started or since ``reset_resident_peak``
    (Linux: VmHWM; elsewhere ru_maxrss, which cannot be reset: then an upper bound)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def reset_resident_peak() -> bool:
    """Start the peak over from what the process holds now (Linux 4.0+: clear_refs 5). Whether
    it could: where not, ``resident_peak_bytes`` keeps the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing):
    what is allocated afterwards into memory freed before then shows in the resident set, so a
    peak measured in a process that has run before (a test suite, a notebook) is not read low."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class ResidentMeter:
    """What a process holds on the CPU beyond ``start`` (its resident memory when the meter was
    made, by default): the measure of ``--max-memory`` on the CPU, where RAM is the limit.
    Freed blocks go back to the system only above glibc's mmap threshold: set
    ``MALLOC_MMAP_THRESHOLD_`` (bytes) for a peak that is not an allocator's cache."""

    def __init__(self, start: int | None = None):
        if start is None:
            release_free_heap()
            start = resident_bytes()
        self.start = start
        self.resettable = reset_resident_peak()

    def peak(self) -> int:
        return max(resident_peak_bytes() - self.start, 0)

    def now(self) -> int:
        return max(resident_bytes() - self.start, 0)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages and their peak, counted at the dispatcher: every storage an
    operator returns (forward and backward) counts from its creation until it is freed.

        with LiveTensorBytes() as meter:
            meter.count_existing(model)  # the weights, created before
            ...
        meter.peak
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def count_existing(self, *objects) -> None:
        """Count tensors made before the meter started: modules' parameters, buffers and grads, or tensors."""
        for obj in objects:
            tensors = [t for t in obj.parameters()] + [t for t in obj.buffers()] if isinstance(obj, torch.nn.Module) \
                else [obj]
            tensors += [t.grad for t in tensors if getattr(t, "grad", None) is not None]
            for t in tensors:
                self._count(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


CONSTANT_WEIGHTS = {"num_items", "sum"}  # the same weight on every microbatch: one sum serves both
UNIFORM_REDUCTIONS = {"mean_of_means"} | CONSTANT_WEIGHTS  # a scalar weight per microbatch: no backward of their own
OWN_BACKWARD_PATHS = ("model", "loss-fn")  # a loss of their own: a backward and a sum each


def sums_held(paths, reductions) -> int:
    """Gradient sums alive together while one layout's logit paths run: one for num_items, the
    correct reduction, which runs on every layout (sum shares it), one per other reduction of
    the ``reduction`` path (mean_of_means shares it too where every microbatch holds as many
    targets: counted apart here), and one per path with a loss of its own. Freed when the
    layout is judged."""
    own = [r for r in reductions if r not in CONSTANT_WEIGHTS] if "reduction" in paths else []
    return 1 + len(own) + sum(p in OWN_BACKWARD_PATHS for p in paths)


def keeps_correct(paths, reductions) -> bool:
    """Whether a path with a loss of its own runs (a non-uniform reduction, the model's loss, a
    user's loss function): the microbatch's correct gradient is then kept during its backward."""
    return any(p in OWN_BACKWARD_PATHS for p in paths) or \
        ("reduction" in paths and bool(set(reductions) - UNIFORM_REDUCTIONS))


def model_loss_bytes(batch_size: int, length: int, vocab: int) -> int:
    """The model path's own loss over a full-batch microbatch (k=1): float32 logits and their log-softmax."""
    return 2 * batch_size * length * vocab * 4
