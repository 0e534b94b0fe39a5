"""Run one function on N data-parallel ranks through ``torch.distributed``: started here, or
the processes a launcher started (``torchrun --nproc-per-node N -m lossaudit check ...``).

``run_ranks(fn, payload, world_size)`` spawns N fresh interpreters (torch.multiprocessing,
start method ``spawn``), joins them into one process group (gloo on CPU, nccl on CUDA, rank
r on ``cuda:r``) through a file store in a private temporary directory, calls
``fn(rank, world_size, payload, device)`` in each, and returns what each rank returned.

The payload travels by ``torch.save`` to that directory, so every rank owns a private copy
of the model and the parent's weights are never touched. A rank that raises, dies or hangs
past the timeout ends the whole run: the other ranks are terminated and joined (no zombies)
and ``RankFailure`` carries one line saying which rank and why.

Under a launcher (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set, as torchrun sets them) nothing is spawned: every process runs the whole audit, and
``run_ranks`` joins the launcher's group (``env://``; nccl on CUDA with rank r on
``cuda:LOCAL_RANK``, gloo on CPU), calls ``fn`` for this process's rank in-process on a
private copy of the payload, and gathers every rank's return value to every rank, so each
process holds the same report; only rank 0 writes it (``is_leader``). A rank whose ``fn``
raises fails every rank with the same one line; one that hangs in a collective ends at the
group's timeout. Multi-node runs are the launcher's business.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from ..core.errors import RankFailure, UsageError

DEFAULT_TIMEOUT_S = 900.0
GRACE_S = 5.0  # how long a terminated rank may take to exit before it is killed

RankFn = Callable[[int, int, Any, torch.device], Any]


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in a group a launcher started."""

    rank: int
    local_rank: int
    world_size: int


def launched() -> Launch | None:
    """The launcher's group this process belongs to (torchrun's environment), or None. Ranks
    spawned by ``run_ranks`` set RANK and WORLD_SIZE but no MASTER_ADDR: they are not launched."""
    if not all(name in os.environ for name in LAUNCHER_ENV):
        return None
    try:
        launch = Launch(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
        port = int(os.environ["MASTER_PORT"])
    except ValueError:
        raise UsageError("the launcher's RANK/LOCAL_RANK/WORLD_SIZE/MASTER_PORT are not integers: "
                         + ", ".join(f"{n}={os.environ[n]!r}" for n in LAUNCHER_ENV if n != "MASTER_ADDR")) from None
    problems = []
    if launch.world_size < 1:
        problems.append(f"WORLD_SIZE={launch.world_size}: must be at least 1")
    elif not 0 <= launch.rank < launch.world_size:
        problems.append(f"RANK={launch.rank}: must be from 0 to WORLD_SIZE-1 ({launch.world_size - 1})")
    if launch.local_rank < 0:
        problems.append(f"LOCAL_RANK={launch.local_rank}: must be at least 0")
    if not 0 < port < 65536:
        problems.append(f"MASTER_PORT={port}: not a port (1 to 65535)")
    if problems:
        raise UsageError("the launcher's environment: " + "; ".join(problems))
    return launch


def joined_world_size(requested: int, device: str) -> int:
    """The world size of a run: ``requested`` (--world-size), or under a launcher the launcher's
    (``requested`` 1, the default, means "the launcher's"; another value must agree with it).
    Under a launcher on CUDA, ``cuda`` becomes this process's local GPU."""
    launch = launched()
    if launch is None:
        return requested
    if requested not in (1, launch.world_size):
        raise UsageError(f"--world-size {requested}: the launcher started {launch.world_size} processes; "
                         f"leave --world-size out under a launcher, or make them agree")
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
    return launch.world_size


def is_leader() -> bool:
    """True but on a launched process of rank > 0: only one process writes and prints."""
    launch = launched()
    return launch is None or launch.rank == 0


def closing_barrier() -> None:
    """Under a launcher, wait until every process has reached the end of its run: a rank that
    exits first with findings (status 1) makes torchrun end the others, the leader included,
    perhaps before it has written the report. Nothing outside a launched group."""
    if launched() is not None and torch.distributed.is_initialized():
        torch.distributed.barrier(group=_OBJECT_GROUPS.get("gloo"))


def run_ranks(fn: RankFn, payload: Any, world_size: int, *, device_type: str = "cpu",
              timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Each rank's return value (``fn`` must be a module-level function: it is pickled)."""
    launch = launched()
    if launch is not None:
        return _run_in_group(fn, payload, launch, world_size, device_type, timeout_s)
    if device_type == "cuda" and world_size > torch.cuda.device_count():
        raise RankFailure(f"{world_size} ranks on CUDA need {world_size} GPUs; {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="lossaudit-ranks-") as tmp:
        workdir = Path(tmp)
        try:
            torch.save(payload, workdir / "payload.pt")
        except Exception as exc:  # an unpicklable model: say so, as a rank would
            raise RankFailure(f"cannot send the job to the ranks: {_one_line(exc)}") from None
        context = mp.start_processes(_rank_main, args=(fn, world_size, str(workdir), device_type, timeout_s),
                                     nprocs=world_size, join=False, start_method="spawn")
        try:
            _join(context, workdir, timeout_s)
        finally:
            _stop(context.processes)
        return [_load(workdir / f"result-{rank}.pt") for rank in range(world_size)]


def _run_in_group(fn: RankFn, payload: Any, launch: Launch, world_size: int, device_type: str,
                  timeout_s: float) -> list[Any]:
    """``fn`` for this launched process's rank; every rank's result, gathered to every rank."""
    if world_size != launch.world_size:
        raise RankFailure(f"{world_size} ranks asked for in a launched group of {launch.world_size}")
    objects = _launched_group(device_type, timeout_s)
    device = torch.device("cuda", launch.local_rank) if device_type == "cuda" else torch.device("cpu")
    try:
        # a private copy, as a spawned rank gets: fn may train a model the payload holds
        outcome = (fn(launch.rank, world_size, copy.deepcopy(payload), device), None)
    except Exception as exc:  # every rank must reach the gather below, or the others wait on it
        outcome = (None, _one_line(exc))
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, outcome, group=objects)
    failed = [(rank, error) for rank, (_, error) in enumerate(gathered) if error is not None]
    if failed:
        raise RankFailure(f"rank {failed[0][0]}: {failed[0][1]}")
    return [result for result, _ in gathered]


_OBJECT_GROUPS: dict[str, Any] = {}  # the process group results travel in, made once per process


def _launched_group(device_type: str, timeout_s: float):
    """Join the launcher's group (once per process) and return a gloo group over the same ranks:
    results (whole gradients) are gathered through host memory, never staged on a GPU."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend_for(device_type), timeout=timedelta(seconds=timeout_s))
        atexit.register(torch.distributed.destroy_process_group)
    if "gloo" not in _OBJECT_GROUPS:
        backend = torch.distributed.get_backend()
        _OBJECT_GROUPS["gloo"] = None if backend == "gloo" else \
            torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return _OBJECT_GROUPS["gloo"]


@dataclass
class PortableModel:
    """A model as ranks can receive it. A transformers model travels as its class, config and
    weights and is rebuilt in the rank: pickling the module itself fails on the local-function
    hooks some models install (transformers 5: output capturing on MoE models)."""

    module: torch.nn.Module | None = None
    cls: type | None = None
    config: Any = None
    state: dict | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "PortableModel":
        config = getattr(model, "config", None)
        if config is None or not hasattr(type(model), "config_class"):
            return cls(module=model)
        return cls(cls=type(model), config=config, state={k: v.detach().cpu() for k, v in model.state_dict().items()})

    def build(self, device: torch.device) -> torch.nn.Module:
        if self.module is not None:
            return self.module.to(device)
        model = self.cls(self.config)
        model.load_state_dict(self.state)
        dtype = next(iter(self.state.values())).dtype if self.state else None
        return model.to(device=device, dtype=dtype if dtype is not None and dtype.is_floating_point else None)


def fresh(model: PortableModel, device: torch.device) -> torch.nn.Module:
    """A copy of ``model`` of its own (a PortableModel holding a module builds that very module):
    for a wrapper that changes the model in place (FSDP2 shards it)."""
    return copy.deepcopy(model).build(device)


def _join(context, workdir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise RankFailure(f"ranks did not finish within {timeout_s:g}s (a rank waiting in a collective?)")
    except ProcessException as exc:  # join() has already terminated the other ranks
        if _torn_down(workdir, len(context.processes)):
            return  # a rank died tearing the group down, after every rank wrote its result
        raise RankFailure(_reason(exc, workdir)) from None


def _torn_down(workdir: Path, world_size: int) -> bool:
    """Every rank passed the closing barrier with its result written and none wrote an error: a
    rank that then dies (gloo's teardown can abort: SIGABRT, "terminate called without an active
    exception") lost nothing."""
    return (all((workdir / f"done-{rank}").exists() for rank in range(world_size))
            and not any(workdir.glob("error-*.txt")))


def _reason(exc: ProcessException, workdir: Path) -> str:
    """The first rank's error: when one rank fails, its peers then fail in their collectives
    ("connection reset by peer"), and whichever the parent notices first is not the cause."""
    written = sorted(workdir.glob("error-*.txt"), key=lambda p: p.stat().st_mtime_ns)
    if written:
        rank = written[0].stem.removeprefix("error-")
        return f"rank {rank}: {written[0].read_text().strip()}"
    return f"rank {exc.error_index}: {_one_line(exc)}"  # died without a word (signal, OOM kill)


def _stop(processes) -> None:
    """Terminate what is still running, then reap every process."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False) if path.exists() else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if isinstance(exc, ProcessException) or not lines:
        return lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}"


def _rank_main(rank: int, fn: RankFn, world_size: int, workdir: str, device_type: str, timeout_s: float) -> None:
    """The body of one spawned rank."""
    workdir_path = Path(workdir)
    # What launchers (torchrun, accelerate launch) would set; libraries read these.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(max(1, _cores() // world_size))  # ranks share the machine's cores
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    with _errors_recorded(workdir_path / f"error-{rank}.txt"):
        torch.distributed.init_process_group(
            backend_for(device_type), init_method=(workdir_path / "store").as_uri(), rank=rank,
            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        # The error is written before the group is torn down: peers fail as soon as it is,
        # and the parent names the rank whose error was written first.
        with _errors_recorded(workdir_path / f"error-{rank}.txt"):
            payload = torch.load(workdir_path / "payload.pt", weights_only=False, map_location="cpu")
            result = fn(rank, world_size, payload, device)
            if result is not None:
                torch.save(result, workdir_path / f"result-{rank}.pt")
            # every rank done before any tears the group down: a rank whose peer closed its
            # connections first could abort in teardown (SIGABRT, "terminate called ...")
            torch.distributed.barrier()
            (workdir_path / f"done-{rank}").touch()  # past the barrier: every rank's result is written
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _errors_recorded(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        path.write_text(_one_line(exc))
        raise
