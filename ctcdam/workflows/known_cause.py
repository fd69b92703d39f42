"""The known-cause benchmark's data: generate the painted set, preprocess it, and write its labels and cause masks.

``known_cause_data()`` returns a manifest that trains and evaluates like any other, but whose malignancy,
spiculation and calcification labels follow the painted signs (``ctcdam.synthetic.known_cause``) and whose rows
name each nodule's cause masks on its crop grid (``cause_spicules_path``, ``cause_calcification_path``,
``cause_vessel_path``). Layout under the cache folder::

    known-cause-lidc/                    the DICOM root (real annotation geometry, painted signs)
    known-cause-preprocessed/            the ordinary preprocessing of it (manifest.csv, crops/, ...)
        known_cause.csv, known_cause.json   the known-cause manifest and its run record
        causes/<scan_id>/<nodule_id>_cause_<name>.nii.gz   one unit folder per scan, published atomically
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from ctcdam import io
from ctcdam.lidc.pylidc_compat import get_scan
from ctcdam.manifest.schema import MANIFEST_FILE, read_run_record, run_record_path
from ctcdam.preprocess.run import run_preprocess
from ctcdam.synthetic.default import DEFAULT_SCANS, ensure_default_dicom
from ctcdam.synthetic.known_cause import (
    CAUSES,
    EXTRA_SCANS,
    KNOWN_CAUSE_VERSION,
    cause_mask_image,
    known_cause_nodules,
)
from ctcdam.workflows.defaults import default_cache_dir

log = logging.getLogger(__name__)

DICOM_DIRNAME = "known-cause-lidc"
PREPROCESSED_DIRNAME = "known-cause-preprocessed"
MANIFEST_NAME = "known_cause.csv"
KNOWN_CAUSE_SCANS: tuple[str, ...] = (*DEFAULT_SCANS, *EXTRA_SCANS)
#: Label columns the signs decide, and the columns the known-cause manifest adds.
SIGN_COLUMNS: tuple[str, ...] = ("sign_spicules", "sign_calcified", "sign_vessel")
CAUSE_COLUMNS: tuple[str, ...] = tuple(f"cause_{name}_path" for name in CAUSES)


@dataclass(frozen=True)
class KnownCauseData:
    """The known-cause set, ready to train on: its DICOM root and its manifest."""

    lidc_root: Path
    manifest: Path


def _record(seed: int, scans: Sequence[str]) -> dict:
    return {"seed": seed, "version": KNOWN_CAUSE_VERSION, "scans": list(scans)}


def write_cause_masks(out_dir: Path, scan_id: str, rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The scan's rows with known-cause labels and cause-mask paths; the masks go into one atomic unit folder."""
    _, signs = known_cause_nodules(get_scan(scan_id), seed)
    by_id = {s.nodule_id: s for s in signs}
    unit = out_dir / "causes" / scan_id
    labelled = []
    with io.atomic_dir(unit) as staging:
        for row in rows.to_dict("records"):
            nodule = by_id[row["nodule_id"]]
            crop = sitk.ReadImage(str(out_dir / row["image_path"]))
            consensus = sitk.ReadImage(str(out_dir / row["mask_path"]))
            for name in CAUSES:
                file = f"{row['nodule_id']}_cause_{name}.nii.gz"
                io.write_image(staging / file, cause_mask_image(nodule, name, crop, consensus))
                row[f"cause_{name}_path"] = (unit / file).relative_to(out_dir).as_posix()
            labelled.append({**row, **nodule.labels()})
    return pd.DataFrame(labelled)


def known_cause_data(
    cache_dir: Path | None = None, *, scans: Sequence[str] = KNOWN_CAUSE_SCANS, seed: int = 0, workers: int | None = None,
) -> KnownCauseData:
    """Generate (if needed), preprocess and label the known-cause set; reused when already complete."""
    cache_dir = Path(cache_dir or default_cache_dir())
    workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    dicom_root = ensure_default_dicom(cache_dir, scan_ids=scans, workers=workers, dirname=DICOM_DIRNAME,
                                      known_cause_seed=seed)
    out_dir = cache_dir / PREPROCESSED_DIRNAME
    manifest_path = out_dir / MANIFEST_NAME
    record = _record(seed, scans)
    if manifest_path.is_file() and (read_run_record(manifest_path) or {}).get("known_cause") == record:
        return KnownCauseData(dicom_root, manifest_path)
    summary = run_preprocess(dicom_root, out_dir, list(scans), resume=True, workers=workers)
    if summary.scans_pending:
        raise RuntimeError(f"{summary.scans_pending} known-cause scan(s) were not preprocessed; rerun to resume")
    manifest = pd.read_csv(out_dir / MANIFEST_FILE, dtype={"annotation_ids": str, "malignancy_label": str})
    parts = [write_cause_masks(out_dir, scan_id, rows, seed) for scan_id, rows in manifest.groupby("scan_id", sort=True)]
    labelled = pd.concat(parts, ignore_index=True)
    # The known-cause manifest carries the preprocessing's run record (settings, DICOM root) plus its own.
    base = read_run_record(out_dir / MANIFEST_FILE) or {}
    io.write_csv(manifest_path, labelled)
    io.write_text(run_record_path(manifest_path), json.dumps({**base, "known_cause": record}, indent=1, sort_keys=True))
    log.info("known-cause set: %d nodules (%d malignant) in %s", len(labelled),
             int(labelled["malignancy_label"].astype(int).sum()), manifest_path)
    return KnownCauseData(dicom_root, manifest_path)
