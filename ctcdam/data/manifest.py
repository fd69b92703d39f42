"""Reading the preprocessing manifest and its crops, with a clear error for every kind of bad input."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ctcdam.targets import BIOMARKER_COLUMNS, BIOMARKERS

#: Columns training needs (the manifest written by ctcdam.lidc.preprocess has more).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "scan_id",
    "patient_id",
    "nodule_id",
    "malignancy_label",
    "image_path",
    *BIOMARKER_COLUMNS.values(),
)
_ID_COLUMNS = ("scan_id", "patient_id", "nodule_id")


class ManifestError(ValueError):
    """A manifest or crop that cannot be used, named by file, row and column."""


def _row_name(frame: pd.DataFrame, i: int) -> str:
    # CSV line numbers: the header is line 1, data row i is line i + 2
    return f"row {i + 2} (nodule {frame['nodule_id'].iloc[i]!r})"


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check a manifest: required columns, labels in {0, 1, empty}, finite biomarkers, existing crop files.

    Adds ``image_file`` (absolute crop path) and ``label`` (1.0, 0.0 or NaN for nodules without a malignancy label).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (run pipelines/preprocess.py first)")
    frame = pd.read_csv(path, dtype={c: str for c in (*_ID_COLUMNS, "malignancy_label")}, keep_default_na=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise ManifestError(f"manifest {path} has no rows")
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
    for name in BIOMARKERS:
        column = BIOMARKER_COLUMNS[name]
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(
                f"manifest {path}: {_row_name(frame, i)} has no finite value in column {column} ({frame[column].iloc[i]!r})"
            )
        frame[column] = values.astype(float)

    root = path.parent
    image_file = [str((root / p).resolve()) if not Path(p).is_absolute() else p for p in frame["image_path"].astype(str)]
    for i, file in enumerate(image_file):
        if not Path(file).is_file():
            raise ManifestError(f"manifest {path}: {_row_name(frame, i)}: image file {file} does not exist")
    frame = frame.assign(image_file=image_file, label=label.astype(float))
    return frame.reset_index(drop=True)


@dataclass(frozen=True)
class CropGeometry:
    """Shape (z, y, x) and voxel spacing (z, y, x) in mm shared by all crops of a manifest."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @property
    def size_mm(self) -> tuple[float, float, float]:
        """Physical extent of a crop along (z, y, x)."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing_mm))  # type: ignore[return-value]


def read_crop(file: str | Path) -> tuple[np.ndarray, CropGeometry]:
    """A (z, y, x) HU crop from an image file and its geometry; NaN/inf values raise naming the file.

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
    spacing_xyz = image.GetSpacing()
    return array, CropGeometry(shape=tuple(array.shape), spacing_mm=tuple(float(s) for s in spacing_xyz[::-1]))


def load_crops(frame: pd.DataFrame) -> tuple[np.ndarray, CropGeometry]:
    """All crops of a manifest frame as one (n, z, y, x) array; every crop must share shape and spacing."""
    arrays, geometry = [], None
    for i, file in enumerate(frame["image_file"]):
        array, geo = read_crop(file)
        if geometry is None:
            geometry = geo
        elif geo.shape != geometry.shape or not np.allclose(geo.spacing_mm, geometry.spacing_mm, atol=1e-4):
            raise ManifestError(
                f"crop {file} ({_row_name(frame, i)}) has shape {geo.shape} and spacing {geo.spacing_mm}, "
                f"unlike the first crop ({geometry.shape}, {geometry.spacing_mm}); preprocess all crops with one setting"
            )
        arrays.append(array)
    if geometry is None:
        raise ManifestError("no crops to load: the manifest selection is empty")
    dtype = np.result_type(*[a.dtype for a in arrays])
    return np.stack(arrays).astype(dtype, copy=False), geometry


def biomarker_matrix(frame: pd.DataFrame) -> np.ndarray:
    """(n, 8) biomarker values in ctcdam.targets.BIOMARKERS order, original units."""
    return frame[[BIOMARKER_COLUMNS[name] for name in BIOMARKERS]].to_numpy(dtype=np.float64)
