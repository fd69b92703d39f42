"""Where explain reads and writes: the output folder and the default checkpoint (stdlib only, so the CLI
rejects a bad path before it pays for importing torch)."""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from ctcdam.models.runs import TRAIN_OUTPUTS, newest_checkpoint  # noqa: F401  (re-exported for the CLI)


class BundleError(RuntimeError):
    """A bundle cannot be written (the output location is unusable)."""


class ScanNotFoundError(ValueError):
    """The requested scan is not in the data folder (the message lists the closest ids there)."""


def check_scan_present(scan_id: str, lidc_root: Path) -> None:
    """FileNotFoundError for a missing data folder; ScanNotFoundError listing the closest ids for a missing scan."""
    lidc_root = Path(lidc_root)
    if not lidc_root.is_dir():
        raise FileNotFoundError(f"LIDC root {lidc_root} is not a folder (pass --lidc-root DIR)")
    present = sorted(p.name for p in lidc_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if scan_id not in present:
        close = difflib.get_close_matches(scan_id, present, n=3, cutoff=0.0) or present[:3]
        raise ScanNotFoundError(f"scan {scan_id!r} is not under {lidc_root}; closest scan ids there: "
                                f"{', '.join(close) or 'none (the folder holds no scan)'}")


def check_output_root(out_root: Path) -> Path:
    """BundleError with one sentence when ``out_root`` exists and is not a folder (nothing is created)."""
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise BundleError(f"--out {out_root} is a file, not a folder; give a folder for the review bundles")
    return out_root


def prepare_output_root(out_root: Path) -> Path:
    """Check and create the output folder; BundleError with one sentence when it cannot hold bundles."""
    out_root = check_output_root(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BundleError(f"cannot create the output folder {out_root}: {error.strerror or error}") from None
    if not os.access(out_root, os.W_OK):
        raise BundleError(f"the output folder {out_root} is not writable")
    return out_root


def existing_checkpoint(path: Path) -> Path:
    """``path`` if it is a file; FileNotFoundError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with `python pipelines/train.py`)")
    return path
