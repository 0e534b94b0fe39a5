"""Run a function over many items, each in a worker process that may crash, hang or eat
memory without taking the caller down.

Workers are reused (a worker pays its imports once, not once per item), each runs under a
memory cap (``RLIMIT_AS``) and each item under a timeout. A worker that dies, runs past its
timeout or runs out of memory is killed and replaced, and its item gets an ``Outcome``
naming what happened; the other items go on.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable

from ..core.errors import EnvironmentProblem

# Outcome.failure values
TIMEOUT, MEMORY, CRASH, ERROR = "timeout", "memory", "crash", "error"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 120.0  # per item, from the moment a ready worker receives it
    memory_bytes: int | None = None  # address-space cap of each worker (RLIMIT_AS)
    items_per_worker: int = 40  # then a fresh worker: leaks of one model do not pile up
    start_timeout_s: float = 120.0  # imports of a fresh worker


@dataclass
class Outcome:
    item: Any
    value: Any = None  # what the function returned
    failure: str | None = None  # TIMEOUT, MEMORY, CRASH or ERROR; None when it returned
    detail: str = ""
    seconds: float = 0.0


def resolve(name: str) -> Callable:
    """``module:function`` to the function (spawned workers import it by name)."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def _worker_main(conn: Connection, function: str, setup: str | None, memory_bytes: int | None) -> None:
    """A worker: cap memory, import once, then answer items until told to stop (None)."""
    if memory_bytes:
        import resource  # lazy: Unix only

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if setup:
        resolve(setup)()
    fn = resolve(function)
    conn.send(("ready", None))
    while (item := conn.recv()) is not None:
        try:
            conn.send(("ok", fn(item)))
        except BaseException as exc:  # the item failed, the worker reports it and stops if unsound
            kind = MEMORY if _is_memory_error(exc) else ERROR
            last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
            where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            conn.send((kind, f"{type(exc).__name__}: {message}{where}"))
            if kind == MEMORY:
                return


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    done: int = 0
    item: Any = None
    started: float = 0.0
    deadline: float = field(default=float("inf"))

    @property
    def busy(self) -> bool:
        return self.item is not None


class WorkerPool:
    def __init__(self, function: str, *, jobs: int, limits: Limits, setup: str | None = None):
        self.function, self.setup, self.limits = function, setup, limits
        self.jobs = max(1, jobs)
        self.context = mp.get_context("spawn")  # no inherited threads or half-imported state
        self.workers: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker_main, daemon=True,
                                       args=(child, self.function, self.setup, self.limits.memory_bytes))
        process.start()
        child.close()
        return _Worker(process, parent, deadline=time.monotonic() + self.limits.start_timeout_s)

    def _stop(self, worker: _Worker, *, kill: bool) -> None:
        if worker.process.is_alive():
            if kill:
                worker.process.kill()
            else:
                try:
                    worker.conn.send(None)
                except OSError:
                    worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()

    def _replace(self, worker: _Worker, *, kill: bool) -> None:
        self._stop(worker, kill=kill)
        self.workers[self.workers.index(worker)] = self._start()

    def run(self, items: Iterable, on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Outcomes in the order items finish; ``on_outcome`` sees each as it arrives."""
        pending = deque(items)
        outcomes: list[Outcome] = []
        self.workers = [self._start() for _ in range(min(self.jobs, len(pending)))]
        try:
            while pending or any(w.busy for w in self.workers):
                self._assign(pending)
                for outcome in self._collect():
                    outcomes.append(outcome)
                    if on_outcome:
                        on_outcome(outcome)
        finally:
            for worker in self.workers:
                self._stop(worker, kill=worker.busy)
        return outcomes

    def _assign(self, pending: deque) -> None:
        for worker in self.workers:
            if worker.ready and not worker.busy and pending:
                worker.item, worker.started = pending.popleft(), time.monotonic()
                worker.deadline = worker.started + self.limits.timeout_s
                worker.conn.send(worker.item)

    def _collect(self) -> list[Outcome]:
        now = time.monotonic()
        deadline = min(w.deadline for w in self.workers)
        timeout = None if deadline == float("inf") else max(0.0, deadline - now)
        ready = wait([w.conn for w in self.workers], timeout=timeout)
        outcomes = []
        for worker in list(self.workers):
            if worker.conn in ready:
                outcomes += self._receive(worker)
            elif time.monotonic() >= worker.deadline:
                outcomes += self._expire(worker)
        return outcomes

    def _receive(self, worker: _Worker) -> list[Outcome]:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            return self._died(worker)
        if kind == "ready":
            worker.ready, worker.deadline = True, float("inf")
            return []
        outcome = Outcome(worker.item, payload if kind == "ok" else None, None if kind == "ok" else kind,
                          "" if kind == "ok" else payload, time.monotonic() - worker.started)
        worker.item, worker.deadline, worker.done = None, float("inf"), worker.done + 1
        if kind == MEMORY or worker.done >= self.limits.items_per_worker:
            self._replace(worker, kill=kind == MEMORY)
        return [outcome]

    def _died(self, worker: _Worker) -> list[Outcome]:
        worker.process.join(timeout=10)
        code = worker.process.exitcode
        if not worker.busy:
            raise EnvironmentProblem(f"a sweep worker could not start (exit status {code}); "
                                     "is the memory cap too small for torch and transformers?")
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        # a process killed for memory (the kernel's OOM killer) shows as SIGKILL we did not send
        failure = MEMORY if code == -signal.SIGKILL else CRASH
        outcome = Outcome(worker.item, None, failure, f"the worker process died ({how})",
                          time.monotonic() - worker.started)
        self._replace(worker, kill=True)
        return [outcome]

    def _expire(self, worker: _Worker) -> list[Outcome]:
        if not worker.busy:
            raise EnvironmentProblem(f"a sweep worker did not start within {self.limits.start_timeout_s:.0f} s")
        outcome = Outcome(worker.item, None, TIMEOUT, f"no answer within {self.limits.timeout_s:.0f} s; killed",
                          time.monotonic() - worker.started)
        self._replace(worker, kill=True)
        return [outcome]
