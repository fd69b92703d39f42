"""Preparing a scan for explanation: its series, nodules and crops, as training made them; no model.

Nodules are selected, masked and cropped by ``ctcdam.lidc.scan_nodules`` with the preprocessing settings the
checkpoint was trained with. A nodule of the training manifest whose scan is read from the checkpoint's own DICOM
root is not cut again: its crop is read from the manifest, so the maps are computed on the very voxels the model
was trained on; other nodules (fewer readers than training requires, another data root, a new scan) are cropped
with the trained settings. With the model's input settings in the spec, the model inputs (every slice of every
view, through the training transforms) are made here too, so a cohort's worker processes take that work off the
model's process; torch and MONAI are imported only then. A known-cause training manifest's cause masks come with
the nodules it holds, on the CT's voxels (``ctcdam.workflows.explain_causes``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctcdam.data.views import centre_index, view_axis, view_stack

from ctcdam.lidc.scan_nodules import PreprocessConfig, ScanNodule, crop, load_scan, scan_nodules
from ctcdam.manifest.schema import ManifestError, read_crop, read_manifest
from ctcdam.workflows.explain_causes import CauseSource, scan_cause_masks
from ctcdam.workflows.sources import check_scan_present

log = logging.getLogger(__name__)


def training_crop_files(data: Mapping[str, Any], lidc_root: Path) -> dict[str, dict[tuple[str, str], str]]:
    """Crop files of a checkpoint's training manifest (its ``ctcdam.data`` entry) by scan id, then by (series UID,
    nodule id): empty unless the scans are read from the checkpoint's own DICOM root (another root's voxels may
    differ) and the manifest is still readable."""
    recorded, manifest = data.get("lidc_root"), data.get("manifest")
    if not recorded or not manifest or Path(recorded).resolve() != Path(lidc_root).resolve():
        return {}
    try:
        frame = read_manifest(manifest)
    except (FileNotFoundError, ManifestError) as error:
        log.warning("training crops unavailable, cropping again with the trained settings: %s", error)
        return {}
    series = frame["series_uid"] if "series_uid" in frame.columns else [""] * len(frame)
    files: dict[str, dict[tuple[str, str], str]] = {}
    for scan_id, series_uid, nodule_id, file in zip(frame["scan_id"], series, frame["nodule_id"], frame["image_file"]):
        files.setdefault(str(scan_id), {})[(str(series_uid or ""), str(nodule_id))] = file
    return files


def crops_of_series(files: Mapping[tuple[str, str], str], series_uid: str) -> dict[str, str]:
    """The training crops of one series by nodule id (a manifest without series UIDs matches any series)."""
    return {nodule: file for (series, nodule), file in files.items() if series in ("", series_uid)}


@dataclass(frozen=True)
class PrepareSpec:
    """What preparing a scan needs: the DICOM root, the trained preprocessing settings, the training crops (and the
    cause masks of a known-cause training manifest) and, to make the model inputs as well, the model's input
    settings (a ``ctcdam.data.transforms.InputConfig``), the views and whether every slice (the 3D map) or only the
    centre ones are explained."""

    lidc_root: Path
    config: PreprocessConfig
    training_crops: Mapping[str, Mapping[tuple[str, str], str]] = field(default_factory=dict)  # by scan id
    causes: CauseSource = field(default_factory=CauseSource)
    input_config: Any = None
    views: tuple[str, ...] = ()
    volume: bool = True


def model_inputs(crop_hu: np.ndarray, input_config: Any, views: Sequence[str],
                 volume: bool) -> tuple[Any, dict[str, np.ndarray]]:
    """The model inputs of one (z, y, x) HU crop, a (n, 3, H, W) tensor: every slice of every view (``volume``) or
    each view's centre slice; and per view the slice indices they are, in view order."""
    import torch

    from ctcdam.data.transforms import to_model_input  # deferred: MONAI and timm take seconds to import

    crop_hu = np.asarray(crop_hu, dtype=np.float32)
    rows = {view: np.arange(crop_hu.shape[view_axis(view)]) if volume else np.array([centre_index(crop_hu.shape, view)])
            for view in views}
    images = torch.cat([to_model_input(view_stack(crop_hu, view)[rows[view]], input_config) for view in views])
    return images, rows


@dataclass(frozen=True)
class PreparedNodule:
    """A nodule ready for the model: identity, the readers' labels, its consensus mask and its HU crop."""

    index: int  # 1-based position among the scan's explained nodules
    nodule_id: str
    centroid_lps: tuple[float, float, float]
    in_training_population: bool
    labels: Mapping[str, Any]
    note: str
    mask: sitk.Image  # the consensus mask on the scan's own voxels
    crop: sitk.Image
    from_training: bool  # the crop was read from the training manifest, not cut again
    inputs: np.ndarray | None = None  # the model inputs (model_inputs, as float32), when the spec asked for them
    rows: Mapping[str, np.ndarray] | None = None
    causes: Mapping[str, sitk.Image] = field(default_factory=dict)  # known-cause masks by cause name (on the CT)


@dataclass(frozen=True)
class PreparedScan:
    """A scan loaded and cropped: its CT, its nodules, the clusters that cannot be cropped, and what it cost."""

    scan_id: str
    ct: sitk.Image
    nodules: tuple[PreparedNodule, ...]
    skipped: tuple[dict[str, str], ...]
    seconds: Mapping[str, float]  # load (series, clusters, consensus) and crop


def _note(nodule: ScanNodule) -> str:
    """Why training leaves the nodule out (if it does) and the notes of its labels."""
    problem = nodule.selection_problem
    return "; ".join([*(["unlabelled: " + problem] if problem else []), *nodule.notes])


def prepare_scan(scan_id: str, spec: PrepareSpec) -> PreparedScan:
    """Load a scan and take its nodules' crops as training did; every croppable cluster is kept, those outside the
    training population too, and every other cluster is listed with the reason."""
    start = time.perf_counter()
    check_scan_present(scan_id, spec.lidc_root)
    loaded = load_scan(scan_id, spec.lidc_root, spec.config)
    nodules, rejected = scan_nodules(loaded.scan, scan_id, loaded.series, spec.config, training_population_only=False)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    series_uid = str(loaded.scan.series_instance_uid)
    files = crops_of_series(spec.training_crops.get(scan_id, {}), series_uid)
    causes = scan_cause_masks(spec.causes, scan_id, series_uid, loaded.scan, loaded.series.image,
                              [(n.nodule_id, n.mask.image) for n in nodules]) if spec.causes else {}
    prepared = []
    for index, nodule in enumerate(nodules, start=1):
        file = files.get(nodule.nodule_id)
        image = read_crop(file).image() if file is not None else crop(loaded.series, nodule, spec.config).hu
        inputs, rows = (None, None) if spec.input_config is None else model_inputs(
            sitk.GetArrayFromImage(image), spec.input_config, spec.views, spec.volume)
        if inputs is not None:
            inputs = inputs.numpy()  # plain bytes across the process boundary (no shared-memory tensors)
        prepared.append(PreparedNodule(
            index=index, nodule_id=nodule.nodule_id, centroid_lps=nodule.mask.centroid,
            in_training_population=nodule.in_training_population, labels=dict(nodule.labels), note=_note(nodule),
            mask=nodule.mask.image, crop=image, from_training=file is not None, inputs=inputs, rows=rows,
            causes=causes.get(nodule.nodule_id, {})))
    skipped = tuple({"nodule_id": r.nodule_id, "reason": r.reason} for r in rejected)
    return PreparedScan(scan_id=scan_id, ct=loaded.series.image, nodules=tuple(prepared), skipped=skipped,
                        seconds={"load": load_s, "crop": time.perf_counter() - start})
