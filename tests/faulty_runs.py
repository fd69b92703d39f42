"""Children for the deterministic kill tests, started by a fork server that preloads this module.

Importing it imports the heavy libraries, the package and pylidc (patched) but opens no database
connection, so each forked child opens its own: pylidc's SQLite session is never shared across a fork.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import SimpleITK  # noqa: F401  (preloaded for the children)
import timm  # noqa: F401
import torch  # noqa: F401

from ctcdam import io
from ctcdam.lidc import pylidc_compat
from ctcdam.preprocess.run import run_preprocess

pylidc_compat.pylidc()


def _with_fault(counter: str, at: int, kind: str) -> None:
    os.environ.update({io.FAULT_COUNTER_ENV: counter, io.FAULT_AT_ENV: str(at), io.FAULT_KIND_ENV: kind})


def faulty_preprocess(lidc_root: str, out: str, counter: str, at: int, kind: str) -> None:
    """Run the preprocessing (resuming) with the fault ``kind`` injected at write point ``at``."""
    _with_fault(counter, at, kind)
    run_preprocess(Path(lidc_root), Path(out), resume=True)


def faulty_pipeline(script: str, argv: Sequence[str], counter: str, at: int, kind: str, stderr: str | None) -> None:
    """Run a ``pipelines/*.py`` command's ``main(argv)`` with the fault injected at write point ``at``."""
    _with_fault(counter, at, kind)
    if stderr is not None:
        sys.stderr = open(stderr, "w", buffering=1)  # noqa: SIM115  (the child's stderr, closed at its exit)
    spec = importlib.util.spec_from_file_location("pipeline_under_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raise SystemExit(module.main(list(argv)))


def _run_child(target: Callable[..., None], args: tuple, at: int) -> int:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    child = context.Process(target=target, args=args)
    child.start()
    child.join(300)
    if child.exitcode is None:
        child.kill()
        raise AssertionError(f"the faulty run (fault at write point {at}) hung")
    return child.exitcode


def run_faulty_preprocess(lidc_root: Path, out: Path, counter: Path, at: int, kind: str = "kill") -> int:
    """Exit code of a forked child running ``faulty_preprocess`` (-9: it was killed)."""
    return _run_child(faulty_preprocess, (str(lidc_root), str(out), str(counter), at, kind), at)


def run_faulty_pipeline(
    script: Path, argv: Sequence[str], counter: Path, at: int, kind: str = "kill", stderr: Path | None = None
) -> int:
    """Exit code of a forked child running ``faulty_pipeline`` (-9: it was killed); its stderr into ``stderr``."""
    args = (str(script), [str(a) for a in argv], str(counter), at, kind, str(stderr) if stderr else None)
    return _run_child(faulty_pipeline, args, at)
