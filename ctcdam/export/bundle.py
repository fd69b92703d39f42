"""The review bundle ``OUT/<scan_id>/`` of an explained scan (DESIGN.md §7).

Everything is written into a staging folder beside ``OUT/<scan_id>`` and renamed to it at the end
(``ctcdam.io.atomic_dir``), so an interrupted run never leaves a half-written bundle under the final name (a
previous bundle stays intact until the new one is complete). Staging folders of runs that died are removed
by the next run.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any


from ctcdam import io
from ctcdam.export import naming
from ctcdam.export.colors import nodule_color, write_color_table
from ctcdam.export.markups import Fiducial, write_fiducials
from ctcdam.export.paths import prepare_output_root
from ctcdam.export.report import write_report
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.review_script import write_review_script
from ctcdam.export.scene import MapVolume, SceneSpec, write_scene, write_scene_bundle
from ctcdam.export.segmentation import Segment, write_segmentation
from ctcdam.export.volumes import ct_volume, symmetric_window, write_volume
from ctcdam.targets import MALIGNANCY, VIEWS

log = logging.getLogger(__name__)


def _value_text(value: float | None) -> str:
    return "na" if value is None or not math.isfinite(float(value)) else f"{float(value):.4g}"


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
            "labelled": nodule.labelled,
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
        tags = {"nodule_id": nodule.nodule_id, "labelled": str(nodule.labelled).lower()}
        tags |= {f"pred_{t}": _value_text(v) for t, v in nodule.predictions.items()}
        tags |= {f"radiologists_{t}": _value_text(v) for t, v in nodule.radiologists.items()}
        segments.append(Segment(segment_id=f"nodule_{nodule.index}", name=f"Nodule {nodule.index}",
                                color=nodule_color(nodule.index), mask=nodule.consensus_mask, tags=tags))
    return segments


def _fiducial(nodule: NoduleResult) -> Fiducial:
    probability = nodule.predictions.get(MALIGNANCY)
    label = f"N{nodule.index}" + (f" p(malig)={probability:.2f}" if probability is not None else "")
    parts = [f"{t}={_value_text(v)} (readers {_value_text(nodule.radiologists.get(t))})"
             for t, v in nodule.predictions.items()]
    status = "" if nodule.labelled else " [unlabelled]"
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


def _write_contents(scan: ScanResult, folder: Path) -> None:
    write_volume(ct_volume(scan.ct), folder / naming.CT_FILE)
    for nodule in scan.nodules:
        maps, views = nodule_map_files(nodule)
        for name, file in maps.items():
            write_volume(nodule.maps[name], folder / file)
        for name, per_view in views.items():
            for view, file in per_view.items():
                write_volume(nodule.view_maps[name][view], folder / file)
    write_color_table(folder / naming.COLOR_TABLE_FILE)
    segmentation_file = markups_file = None
    if scan.nodules:
        segmentation_file, markups_file = naming.SEGMENTATION_FILE, naming.MARKUPS_FILE
        write_segmentation(_segments(scan), scan.ct, folder / segmentation_file)
        write_fiducials([_fiducial(n) for n in scan.nodules], folder / markups_file)
        write_report(scan, folder / naming.REPORT_FILE)
    io.write_json(folder / naming.PREDICTIONS_FILE, predictions_document(scan))
    maps, foreground = _scene_maps(scan)
    spec = SceneSpec(ct_file=naming.CT_FILE, color_table_file=naming.COLOR_TABLE_FILE, maps=tuple(maps),
                     foreground_file=foreground, segmentation_file=segmentation_file, markups_file=markups_file)
    scene_file = write_scene(spec, folder / f"{scan.scan_id}.mrml")
    focus = scan.nodules[0].centroid_lps if scan.nodules else None
    write_review_script(spec, folder / naming.REVIEW_SCRIPT_FILE, focus_lps=focus)
    write_scene_bundle(scene_file, spec.files(), folder / f"{scan.scan_id}.mrb")


def write_bundle(scan: ScanResult, out_root: Path) -> Path:
    """Write the review bundle of ``scan`` to ``out_root/<scan_id>`` (replacing an older one) and return it."""
    out_root = prepare_output_root(Path(out_root))
    for stale in io.remove_stale_temporaries(out_root):
        log.info("removed %s left by an interrupted run", stale)
    final = out_root / scan.scan_id
    with io.atomic_dir(final) as staging:
        _write_contents(scan, staging)
    return final
