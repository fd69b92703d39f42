"""Atomic writes: every output goes to a temporary name in the same folder, then ``os.replace``."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import SimpleITK as sitk


def _temporary_name(path: Path) -> Path:
    # The temporary keeps the real suffixes (".nii.gz") so writers that choose a format by name still work.
    suffixes = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffixes}")


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` atomically."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV (no index) atomically."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        frame.to_csv(tmp, index=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def write_image_atomic(path: Path, image: sitk.Image) -> None:
    """Write a SimpleITK image (format from the suffix, compressed) atomically."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)
