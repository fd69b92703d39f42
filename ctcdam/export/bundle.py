"""The review bundle ``OUT/<scan_id>/`` of an explained scan (DESIGN.md §7).

Everything is written into a staging folder beside ``OUT/<scan_id>`` and renamed to it at the end
(``ctcdam.io.atomic_dir``), so an interrupted run never leaves a half-written bundle under the final name (a
previous bundle stays intact until the new one is complete). Staging folders of runs that died are removed
by the next run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from ctcdam import io
from ctcdam.data.views import VIEWS
from ctcdam.export import naming
from ctcdam.export.colors import TRANSPARENT_BAND, nodule_color, write_color_table
from ctcdam.export.markups import Fiducial, write_fiducials
from ctcdam.export.paths import prepare_output_root
from ctcdam.export.report import write_report
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.review_script import write_review_script
from ctcdam.export.scene import MapVolume, SceneSpec, write_scene, write_scene_bundle
from ctcdam.export.segmentation import Segment, write_segmentation
from ctcdam.export.table import value_text, write_predictions_table
from ctcdam.export.volumes import (
    axis_spacing_ras,
    ct_volume,
    nearest_voxel_centre,
    symmetric_window,
    write_volume,
    written_geometry,
)
from ctcdam.targets import MALIGNANCY

log = logging.getLogger(__name__)


def nodule_map_files(nodule: NoduleResult) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Bundle-relative files of a nodule's 3D maps and view maps."""
    maps = {name: naming.map_file(nodule.index, name) for name in nodule.maps}
    views = {name: {view: naming.map_file(nodule.index, name, view) for view in per_view}
             for name, per_view in nodule.view_maps.items()}
    return maps, views


def predictions_document(scan: ScanResult) -> dict[str, Any]:
    """The ``predictions.json`` content of a scan."""
    nodules = []
    for nodule in scan.nodules:
        maps, views = nodule_map_files(nodule)
        nodules.append({
            "nodule_id": nodule.nodule_id,
            "index": nodule.index,
            "folder": naming.nodule_dir(nodule.index),
            "centroid_lps": list(nodule.centroid_lps),
            "labelled": nodule.in_training_population,
            "note": nodule.note,
            "predictions": dict(nodule.predictions),
            "radiologists": dict(nodule.radiologists),
            "model_outputs": dict(nodule.model_outputs),
            "maps": maps,
            "view_maps": views,
        })
    document = {"scan_id": scan.scan_id, "checkpoint": scan.checkpoint, "method": scan.method,
                "note": scan.note, **dict(scan.details), "nodules": nodules}
    return io.json_safe(document)


def _segments(scan: ScanResult) -> list[Segment]:
    segments = []
    for nodule in scan.nodules:
        tags = {"nodule_id": nodule.nodule_id, "labelled": str(nodule.in_training_population).lower()}
        tags |= {f"pred_{t}": value_text(v) for t, v in nodule.predictions.items()}
        tags |= {f"radiologists_{t}": value_text(v) for t, v in nodule.radiologists.items()}
        segments.append(Segment(segment_id=f"nodule_{nodule.index}", name=f"Nodule {nodule.index}",
                                color=nodule_color(nodule.index), mask=nodule.consensus_mask, tags=tags))
    return segments


def _fiducial(nodule: NoduleResult) -> Fiducial:
    probability = nodule.predictions.get(MALIGNANCY)
    label = f"N{nodule.index}" + (f" p(malig)={probability:.2f}" if probability is not None else "")
    parts = [f"{t}={value_text(v)} (readers {value_text(nodule.radiologists.get(t))})"
             for t, v in nodule.predictions.items()]
    status = "" if nodule.in_training_population else " [unlabelled]"
    return Fiducial(point_id=str(nodule.index), label=label + status,
                    description=f"LIDC nodule {nodule.nodule_id}: " + "; ".join(parts),
                    position_lps=tuple(float(v) for v in nodule.centroid_lps))


def _scene_maps(scan: ScanResult) -> tuple[list[MapVolume], str | None]:
    """The heat maps the scene loads (the 3D maps, or the view maps when there are none) and the foreground file."""
    volumes = []
    for nodule in scan.nodules:
        maps, views = nodule_map_files(nodule)
        if maps:
            entries = [(name, file, nodule.maps[name]) for name, file in maps.items()]
        else:
            entries = [(f"{name} {view}", file, nodule.view_maps[name][view])
                       for name, per_view in views.items() for view, file in per_view.items()]
        volumes += [MapVolume(name=f"N{nodule.index} CDAM {label}", file=file, half_window=symmetric_window(image))
                    for label, file, image in entries]
    if not volumes:
        return volumes, None
    first = scan.nodules[0].index
    preferred = [naming.map_file(first, MALIGNANCY)] + [naming.map_file(first, MALIGNANCY, v) for v in VIEWS]
    files = [volume.file for volume in volumes]
    return volumes, next((file for file in preferred if file in files), files[0])


def _physical_extent(image: sitk.Image) -> float:
    """The longest side (mm) of an image's voxel box."""
    return float(max(n * s for n, s in zip(image.GetSize(), image.GetSpacing())))


def _view_focus(scan: ScanResult, ct_grid: sitk.Image) -> tuple[tuple[float, float, float], float]:
    """Where the slice views open (LPS) and their field of view (mm): the first nodule, whose map is the
    foreground, at twice its crop's size (the map box and as much lung around it); without nodules, the CT."""
    if not scan.nodules:
        centre = ct_grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in ct_grid.GetSize()])
        return nearest_voxel_centre(ct_grid, centre), _physical_extent(ct_grid)
    nodule = scan.nodules[0]
    return nearest_voxel_centre(ct_grid, nodule.centroid_lps), 2.0 * _physical_extent(nodule.crop)


def _write_views(folder: Path, scene_bundle: Path, scan: ScanResult) -> None:
    """``views.png``: the scene's three slice views as 3D Slicer opens them (only where slicer-core is installed)."""
    from ctcdam.export.slicer_render import slicer_available, write_views_png_isolated

    if not slicer_available():
        log.info("views.png not written: 3D Slicer's libraries (slicer-core) are not installed")
        return
    caption = f"{scan.scan_id}: the .mrb as 3D Slicer opens it"
    if scan.nodules:
        nodule = scan.nodules[0]
        caption += (f" - nodule {nodule.index} ({nodule.nodule_id}), foreground CDAM malignancy, "
                    f"red = evidence, blue = counter-evidence, |map| < {TRANSPARENT_BAND:.0%} of max transparent")
    write_views_png_isolated(scene_bundle, folder / naming.VIEWS_FILE, caption=caption)


def _write_contents(scan: ScanResult, folder: Path) -> None:
    write_volume(ct_volume(scan.ct), folder / naming.CT_FILE)
    # The CT's geometry as readers see it (float32 in NIfTI): the segmentation's lattice and reference geometry.
    ct_grid = written_geometry(folder / naming.CT_FILE)
    for nodule in scan.nodules:
        maps, views = nodule_map_files(nodule)
        for name, file in maps.items():
            write_volume(nodule.maps[name], folder / file)
        for name, per_view in views.items():
            for view, file in per_view.items():
                write_volume(nodule.view_maps[name][view], folder / file)
    write_color_table(folder / naming.COLOR_TABLE_FILE)
    segmentation_file = markups_file = table_file = None
    if scan.nodules:
        segmentation_file, markups_file = naming.SEGMENTATION_FILE, naming.MARKUPS_FILE
        table_file = naming.PREDICTIONS_TABLE_FILE
        write_segmentation(_segments(scan), ct_grid, folder / segmentation_file)
        write_fiducials([_fiducial(n) for n in scan.nodules], folder / markups_file)
        write_predictions_table(scan.nodules, folder / table_file)
        write_report(scan, folder / naming.REPORT_FILE,
                     {n.index: folder / naming.nodule_report_file(n.index) for n in scan.nodules})
    io.write_json(folder / naming.PREDICTIONS_FILE, predictions_document(scan))
    maps, foreground = _scene_maps(scan)
    focus, field_of_view = _view_focus(scan, ct_grid)
    spec = SceneSpec(ct_file=naming.CT_FILE, color_table_file=naming.COLOR_TABLE_FILE, maps=tuple(maps),
                     foreground_file=foreground, segmentation_file=segmentation_file, markups_file=markups_file,
                     table_file=table_file, focus_lps=focus, field_of_view_mm=field_of_view,
                     axis_spacing_mm=axis_spacing_ras(ct_grid))
    scene_file = write_scene(spec, folder / f"{scan.scan_id}.mrml")
    write_review_script(spec, folder / naming.REVIEW_SCRIPT_FILE, focus_lps=focus)
    scene_bundle = write_scene_bundle(scene_file, spec.files(), folder / f"{scan.scan_id}.mrb")
    _write_views(folder, scene_bundle, scan)


def write_bundle(scan: ScanResult, out_root: Path) -> Path:
    """Write the review bundle of ``scan`` to ``out_root/<scan_id>`` (replacing an older one) and return it."""
    out_root = prepare_output_root(Path(out_root))
    for stale in io.remove_stale_temporaries(out_root):
        log.info("removed %s left by an interrupted run", stale)
    final = out_root / scan.scan_id
    with io.atomic_dir(final) as staging:
        _write_contents(scan, staging)
    return final
