"""Crash-safe writes for the whole package: atomic files, atomic folders, stale-temporary cleanup.

Every output goes to a temporary name beside its final one and is published with ``os.replace``, so a
process killed at any instant leaves either the finished file (or folder) or nothing of it under the final
name. A temporary is named ``.<stem>.tmp-<host>-<pid>-<random><suffixes>`` (files keep their suffixes, so
writers that choose a format by name, ``.nii.gz`` or ``.png``, still work); ``remove_stale_temporaries``
deletes those left behind by processes of this host that are no longer alive.

Write errors that the user can fix (disk full, read-only folder, no permission) are raised as
``OutputError``, one sentence naming the path.

Fault injection, for the deterministic kill tests (off unless both variables are set)::

    CTCDAM_FAULT_COUNTER=/path/file  one byte is appended to this file at every write point, by every process
    CTCDAM_FAULT_AT=k                at the k-th write point (counted over all processes) the fault happens
    CTCDAM_FAULT=kill|enospc|erofs   the fault: SIGKILL of the process (default), or OSError ENOSPC / EROFS

A file has two write points (its temporary is complete; it is published), a folder three (its staging
folder is complete; the previous version is set aside; it is published).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"
#: errno values of write failures that are the environment's, not the program's: reported as one sentence.
_USER_FIXABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}

FAULT_COUNTER_ENV = "CTCDAM_FAULT_COUNTER"
FAULT_AT_ENV = "CTCDAM_FAULT_AT"
FAULT_KIND_ENV = "CTCDAM_FAULT"


class OutputError(OSError):
    """An output could not be written for a reason the user can fix (disk full, read-only, permissions)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _owner_tag() -> str:
    # Host and pid: shards on several machines may share one output folder over a network file system.
    host = socket.gethostname().split(".")[0].replace("-", "_") or "host"
    return f"{host}-{os.getpid()}"


def temporary_name(path: Path, *, keep_suffixes: bool = True) -> Path:
    """A unique hidden temporary beside ``path`` (keeping its suffixes, for writers that choose a format by name)."""
    path = Path(path)
    # Only short suffixes are formats (".nii", ".gz"); a DICOM UID folder name is all dots.
    suffixes = "".join(s for s in path.suffixes if len(s) <= 5 and not s[1:].isdigit()) if keep_suffixes else ""
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    return path.with_name(f".{stem}{_TMP_MARK}{_owner_tag()}-{uuid.uuid4().hex[:8]}{suffixes}")


def write_point(what: Path | str) -> None:
    """Count one write point and trigger the injected fault there when asked (see the module docstring)."""
    counter = os.environ.get(FAULT_COUNTER_ENV)
    target = os.environ.get(FAULT_AT_ENV)
    if not counter:
        return
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
        count = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if not target or count != int(target):
        return
    kind = os.environ.get(FAULT_KIND_ENV, "kill")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}[kind]
    raise OSError(code, os.strerror(code), str(what))


def _output_error(error: OSError, path: Path) -> OSError:
    if error.errno in _USER_FIXABLE:
        return OutputError(error.errno, f"cannot write {path}: {os.strerror(error.errno)}")
    return error


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically, on failure it is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            write_point(path)
            os.replace(tmp, path)
        except OSError as error:
            raise _output_error(error, path) from error
        write_point(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces the folder ``path`` as a whole, on failure it goes.

    A previous folder stays intact until the new one is complete; between setting it aside and publishing
    the new one a kill leaves no folder under the final name (a rerun redoes the unit).
    """
    path = Path(path)
    staging = temporary_name(path, keep_suffixes=False)
    previous = path.with_name(f".{path.name}{_OLD_MARK}{_owner_tag()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            yield staging
            write_point(path)
            if path.exists():
                os.replace(path, previous)
                write_point(path)
            os.replace(staging, path)
        except OSError as error:
            raise _output_error(error, path) from error
        write_point(path)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if previous.exists() and not path.exists():
            os.replace(previous, path)  # put the old version back: a failed write loses nothing
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write text to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def json_safe(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null, numpy scalars plain numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Write JSON (NaN/inf as null) atomically."""
    return write_text(path, json.dumps(json_safe(data), indent=indent) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_image(path: str | Path, image: Any, *, compress: bool = True) -> Path:
    """Write a SimpleITK image (format from the suffix) atomically."""
    import SimpleITK as sitk  # deferred: most callers of this module never write images

    with atomic_file(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _owner_of(name: str) -> tuple[str, int] | None:
    for mark in (_TMP_MARK, _OLD_MARK):
        if mark in name:
            host, _, rest = name.split(mark, 1)[1].partition("-")
            pid_text = rest.split("-", 1)[0]
            return (host, int(pid_text)) if pid_text.isdigit() else None
    return None


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary or set-aside name made by this module."""
    return path.name.startswith(".") and _owner_of(path.name) is not None


def remove_stale_temporaries(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Remove the temporaries under ``folder`` left by dead processes of this host; return what was removed.

    A set-aside previous folder whose final name is missing is put back instead (its replacement never
    arrived), so an interrupted rewrite of a finished unit loses nothing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _owner_tag().rsplit("-", 1)[0]
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    removed: list[Path] = []
    for candidate in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
        owner = _owner_of(candidate.name)
        if owner is None or owner[0] != host or owner[1] == os.getpid() or _pid_alive(owner[1]):
            continue
        if _OLD_MARK in candidate.name:
            final = candidate.with_name(candidate.name[1:].split(_OLD_MARK, 1)[0])
            if not final.exists():
                os.replace(candidate, final)
                continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed
