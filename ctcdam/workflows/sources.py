"""Where a run's inputs come from: a checkpoint (given, or the newest training run's), the DICOM root a checkpoint
was trained on, a scan in a DICOM root. No torch import, so a command line rejects a bad path before it pays for it."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctcdam.models.runs import TRAIN_OUTPUTS, newest_checkpoint

__all__ = ["TRAIN_OUTPUTS", "ScanNotFoundError", "check_scan_present", "existing_checkpoint", "newest_checkpoint",
           "recorded_lidc_root"]


class ScanNotFoundError(ValueError):
    """The requested scan is not in the data folder (the message lists the closest ids there)."""


def existing_checkpoint(path: Path) -> Path:
    """``path`` if it is a file; FileNotFoundError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with `python pipelines/train.py`)")
    return path


def recorded_lidc_root(data: Mapping[str, Any], checkpoint: Path) -> Path:
    """The DICOM root a checkpoint's data came from (its ``ctcdam.data.lidc_root``); ValueError when it records none."""
    if data.get("lidc_root"):
        return Path(data["lidc_root"])
    raise ValueError(f"checkpoint {checkpoint} does not record the DICOM root of its data (ctcdam.data.lidc_root); "
                     "pass --lidc-root DIR")


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
