"""The review bundle ``OUT/<scan_id>/`` of an explained scan (DESIGN.md §7).

A scan whose nodules carry known causes (the known-cause set) also gets ``causes.seg.nrrd``: one segment per
nodule and painted cause, named ``cause: spicules`` or ``cause: calcification``, in the scene as the segmentation
*Known causes*. It is a file of its own because the calcification lies inside the nodule's segment and a labelmap
layer holds one segment per voxel; other bundles are written exactly as before.

Everything is written into a staging folder beside ``OUT/<scan_id>`` and renamed to it at the end
(``ctcdam.io.atomic_dir``), so an interrupted run never leaves a half-written bundle under the final name (a
previous bundle stays intact until the new one is complete). Staging folders of runs that died are removed
by the next run.

A cohort run gives each bundle a record, ``bundle.json``, written last into the staging folder: the run's
settings, the outcome and the size and SHA-256 of every file, so ``--resume`` can tell a finished bundle from
a damaged one (:func:`unit_problem`). A scan that could not be explained gets a unit holding only its record.

Write cost (measured on a synthetic 11-nodule scan, all 9 targets, 398 NIfTI files): the CT is gzipped at level 1
and the float maps are stored uncompressed inside their gzip stream (``ctcdam.export.volumes``); a nodule's 36 maps
lie on four grids, whose NIfTI headers SimpleITK writes once (``GridVolumeWriter``); the report is one composed
raster per page, encoded with one PNG row filter; the ``.mrb`` stores already-compressed members as they are.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from ctcdam import io
from ctcdam.data.views import VIEWS
from ctcdam.export import naming
from ctcdam.export.colors import TRANSPARENT_BAND, cause_color, nodule_color, write_color_table
from ctcdam.export.markups import Fiducial, write_fiducials
from ctcdam.export.paths import prepare_output_root
from ctcdam.export.report import write_report
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.review_script import write_review_script
from ctcdam.export.scene import MapVolume, SceneSpec, scene_text, write_scene, write_scene_bundle
from ctcdam.export.segmentation import Segment, write_segmentation
from ctcdam.export.table import value_text, write_predictions_table
from ctcdam.export.volumes import (
    CT_GZIP_LEVEL,
    MAP_GZIP_LEVEL,
    GridVolumeWriter,
    axis_spacing_ras,
    ct_volume,
    nearest_voxel_centre,
    symmetric_window,
    write_volume,
    written_geometry,
)
from ctcdam.targets import MALIGNANCY

log = logging.getLogger(__name__)

#: A bundle's record (cohort runs), written last into the bundle folder.
RECORD_FILE = "bundle.json"
RECORD_FORMAT = "ctcdam.explain-bundle.v1"
#: Starts rendering ``views.png``: (scene, png path, caption) -> the call that waits for it and returns the png, or
#: None when it cannot be made (``slicer_render.start_views_png_isolated``, a cohort's ``ViewsRenderer``).
ViewsWriter = Callable[[Path, Path, str], Callable[[], "Path | None"]]


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


def _cause_segments(scan: ScanResult) -> list[Segment]:
    """One segment per nodule and known cause (``cause: <name>``, tagged with the nodule), nodule by nodule."""
    return [Segment(segment_id=f"cause_{cause}_{nodule.index}", name=f"cause: {cause}", color=cause_color(cause),
                    mask=mask, tags={"cause": cause, "nodule": f"Nodule {nodule.index}", "nodule_id": nodule.nodule_id})
            for nodule in scan.nodules for cause, mask in nodule.causes.items()]


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


def views_caption(scan: ScanResult) -> str:
    """The caption of ``views.png`` (also in its PNG text chunk)."""
    caption = f"{scan.scan_id}: the .mrb as 3D Slicer opens it"
    if scan.nodules:
        nodule = scan.nodules[0]
        caption += (f" - nodule {nodule.index} ({nodule.nodule_id}), foreground CDAM malignancy, "
                    f"red = evidence, blue = counter-evidence, |map| < {TRANSPARENT_BAND:.0%} of max transparent")
    return caption


def preview_scene(spec: SceneSpec, folder: Path, ct_file: Path | None = None) -> SceneSpec:
    """The scene ``spec`` with only what its slice views show when it opens (the foreground map among the maps),
    its files named by absolute paths under ``folder`` (the CT by ``ct_file`` when given): it renders exactly as
    the whole scene opens, without reading the maps no view shows (99 of 100 volumes for 11 nodules, 9 targets)."""
    def absolute(name: str | None) -> str | None:
        return None if name is None else str(Path(folder).resolve() / name)

    shown = tuple(replace(m, file=absolute(m.file)) for m in spec.maps if m.file == spec.foreground_file)
    ct = str(Path(ct_file).resolve()) if ct_file is not None else absolute(spec.ct_file)
    return replace(spec, ct_file=ct, color_table_file=absolute(spec.color_table_file), maps=shown,
                   foreground_file=absolute(spec.foreground_file), segmentation_file=absolute(spec.segmentation_file),
                   causes_segmentation_file=absolute(spec.causes_segmentation_file),
                   markups_file=absolute(spec.markups_file), table_file=absolute(spec.table_file))


def _start_views(folder: Path, spec: SceneSpec, scan: ScanResult, views: ViewsWriter | None,
                 ct: Path) -> Callable[[], Path | None]:
    """Start ``views.png``: the scene's three slice views as 3D Slicer opens them (only where slicer-core is
    installed), rendered from the scene's preview (:func:`preview_scene`) beside ``ct``, the CT as SimpleITK's
    uncompressed .nii (the same header and voxels as ct.nii.gz: the renderer need not inflate it again); returns
    the call that waits for it."""
    from ctcdam.export.slicer_render import slicer_available, start_views_png_isolated

    if not slicer_available():
        log.info("views.png not written: 3D Slicer's libraries (slicer-core) are not installed")
        return lambda: None
    preview = ct.parent / f"{scan.scan_id}-preview.mrml"  # scratch, not outputs (no atomic writes)
    preview.write_text(scene_text(preview_scene(spec, folder, ct)))
    return (views or start_views_png_isolated)(preview, folder / naming.VIEWS_FILE, views_caption(scan))


def _write_contents(scan: ScanResult, folder: Path, views: ViewsWriter | None) -> None:
    with tempfile.TemporaryDirectory(prefix="ctcdam-preview-") as scratch:
        # The CT's uncompressed .nii, which its gzip wraps, stays in scratch for the views' renderer.
        ct = Path(scratch) / "ct.nii"
        write_volume(ct_volume(scan.ct), folder / naming.CT_FILE, gzip_level=CT_GZIP_LEVEL, keep_uncompressed=ct)
        _write_rest(scan, folder, views, ct)


def _write_rest(scan: ScanResult, folder: Path, views: ViewsWriter | None, ct: Path) -> None:
    """Everything of the bundle after its CT (``ct``: the CT's uncompressed scratch copy)."""
    # The CT's geometry as readers see it (float32 in NIfTI): the segmentation's lattice and reference geometry.
    ct_grid = written_geometry(folder / naming.CT_FILE)
    maps_writer = GridVolumeWriter()
    for nodule in scan.nodules:
        maps, view_files = nodule_map_files(nodule)
        for name, file in maps.items():
            maps_writer.write(nodule.maps[name], folder / file, gzip_level=MAP_GZIP_LEVEL)
        for name, per_view in view_files.items():
            for view, file in per_view.items():
                maps_writer.write(nodule.view_maps[name][view], folder / file, gzip_level=MAP_GZIP_LEVEL)
    write_color_table(folder / naming.COLOR_TABLE_FILE)
    segmentation_file = causes_file = markups_file = table_file = None
    if scan.nodules:
        segmentation_file, markups_file = naming.SEGMENTATION_FILE, naming.MARKUPS_FILE
        table_file = naming.PREDICTIONS_TABLE_FILE
        write_segmentation(_segments(scan), ct_grid, folder / segmentation_file)
        causes = _cause_segments(scan)
        if causes:
            causes_file = naming.CAUSES_SEGMENTATION_FILE
            write_segmentation(causes, ct_grid, folder / causes_file)
        write_fiducials([_fiducial(n) for n in scan.nodules], folder / markups_file)
        write_predictions_table(scan.nodules, folder / table_file)
    maps, foreground = _scene_maps(scan)
    focus, field_of_view = _view_focus(scan, ct_grid)
    spec = SceneSpec(ct_file=naming.CT_FILE, color_table_file=naming.COLOR_TABLE_FILE, maps=tuple(maps),
                     foreground_file=foreground, segmentation_file=segmentation_file,
                     causes_segmentation_file=causes_file, markups_file=markups_file,
                     table_file=table_file, focus_lps=focus, field_of_view_mm=field_of_view,
                     axis_spacing_mm=axis_spacing_ras(ct_grid))
    # Everything the views show is written: Slicer renders them in its own process while this one writes the
    # report and the scene bundle (waited for in any case: a renderer serves one request at a time).
    finish_views = _start_views(folder, spec, scan, views, ct)
    try:
        if scan.nodules:
            write_report(scan, folder / naming.REPORT_FILE,
                         {n.index: folder / naming.nodule_report_file(n.index) for n in scan.nodules})
        io.write_json(folder / naming.PREDICTIONS_FILE, predictions_document(scan))
        scene_file = write_scene(spec, folder / f"{scan.scan_id}.mrml")
        write_review_script(spec, folder / naming.REVIEW_SCRIPT_FILE, focus_lps=focus)
        write_scene_bundle(scene_file, spec.files(), folder / f"{scan.scan_id}.mrb")
    finally:
        finish_views()


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` (bundle-relative names, sorted; the record and temporaries
    left out)."""
    digests = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == RECORD_FILE or any(io.is_temporary(Path(part)) for part in path.relative_to(folder).parts):
            continue
        sha = hashlib.sha256()
        with open(path, "rb") as source:
            for block in iter(lambda: source.read(1 << 22), b""):
                sha.update(block)
        digests[name] = {"size": path.stat().st_size, "sha256": sha.hexdigest()}
    return digests


def _write_record(folder: Path, record: Mapping[str, Any]) -> Path:
    document = {"format": RECORD_FORMAT, **dict(record), "files": file_digests(folder)}
    return io.write_text(folder / RECORD_FILE, json.dumps(io.json_safe(document), indent=1) + "\n")


def write_bundle(scan: ScanResult, out_root: Path, *, record: Mapping[str, Any] | None = None,
                 views: ViewsWriter | None = None) -> Path:
    """Write the review bundle of ``scan`` to ``out_root/<scan_id>`` (replacing an older one) and return it.

    ``record`` (cohort runs): what ``bundle.json`` says besides the files (settings, outcome), written last.
    ``views`` renders ``views.png`` (default: a Slicer child process for this bundle alone).
    """
    start = time.perf_counter()
    out_root = prepare_output_root(Path(out_root))
    for stale in io.remove_stale_temporaries(out_root):
        log.info("removed %s left by an interrupted run", stale)
    final = out_root / scan.scan_id
    with io.atomic_dir(final) as staging:
        _write_contents(scan, staging, views)
        if record is not None:
            seconds = {**dict(record.get("seconds", {})), "write": round(time.perf_counter() - start, 3)}
            _write_record(staging, {**dict(record), "status": "ok", "nodules": len(scan.nodules), "seconds": seconds})
    return final


def write_failed_unit(out_root: Path, scan_id: str, record: Mapping[str, Any]) -> Path:
    """Publish ``out_root/<scan_id>`` holding only the record of a scan that could not be explained (``record`` says
    the stage and the reason), so resumed and sharded runs know it was tried."""
    out_root = prepare_output_root(Path(out_root))
    with io.atomic_dir(out_root / scan_id) as staging:
        _write_record(staging, {**dict(record), "status": "failed", "nodules": 0})
    return out_root / scan_id


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record of a bundle folder, or None when it has none or it cannot be read."""
    try:
        record = json.loads((Path(folder) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def unit_problem(folder: Path, settings: Mapping[str, Any], *, deep: bool = True) -> str | None:
    """Why the bundle folder cannot be reused by a run with ``settings`` (no record, other settings, a missing,
    truncated or altered file), or None when every file is as its record says (``deep=False``: its size)."""
    folder = Path(folder)
    if not (folder / RECORD_FILE).is_file():
        return "no finished bundle" if not folder.exists() else f"{folder} has no record {RECORD_FILE}"
    record = read_record(folder)
    if record is None:
        return f"its record {folder / RECORD_FILE} is damaged"
    if io.json_safe(dict(settings)) != record.get("settings"):
        return "it was made with other settings"
    for name, expected in record.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected.get("size"):
            return f"{file} has {file.stat().st_size} bytes, its record says {expected.get('size')} (truncated?)"
    if not deep:
        return None
    actual = file_digests(folder)
    for name, expected in record.get("files", {}).items():
        if actual.get(name, {}).get("sha256") != expected.get("sha256"):
            return f"{folder / name} differs from its record (SHA-256)"
    return None
