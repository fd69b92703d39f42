"""``review.py``: a 3D Slicer script that loads a bundle through ``slicer.util`` (the fallback to the .mrb).

Run it with ``Slicer --python-script review.py`` (or paste it into Slicer's Python console). It sets the same
display state as the scene: CT in a lung window, the foreground heat map with the diverging table at the scene's
opacity and a symmetric window, the nodule outlines (no fill; a known-cause scan's cause outlines too), the centroid
fiducials, the predictions table, and the slices centred on the scene's focus nodule at the scene's field of view.
"""
from __future__ import annotations

import json
from pathlib import Path

from ctcdam import io
from ctcdam.export.scene import (
    CAUSES_SEGMENTATION,
    LUNG_LEVEL,
    LUNG_WINDOW,
    NODULES_SEGMENTATION,
    OUTLINE_THICKNESS,
    SLICE_VIEWS,
    SceneSpec,
)

_TEMPLATE = '''"""Load this CDAM review bundle into 3D Slicer: Slicer --python-script review.py [bundle folder]"""
import json
import os
import sys

import slicer

BUNDLE = json.loads(r"""{bundle}""")


def bundle_folder():
    """The folder given on the command line, else the folder of this script, else the working directory."""
    if len(sys.argv) > 1 and os.path.isdir(sys.argv[-1]):
        return sys.argv[-1]
    if "__file__" in globals():
        return os.path.dirname(os.path.abspath(__file__))
    return os.getcwd()


def main():
    folder = bundle_folder()
    path = lambda relative: os.path.join(folder, relative)
    ct = slicer.util.loadVolume(path(BUNDLE["ct"]), {{"name": "CT"}})
    ct_display = ct.GetDisplayNode()
    ct_display.SetAutoWindowLevel(0)
    ct_display.SetWindowLevel(BUNDLE["ct_window"], BUNDLE["ct_level"])
    table = slicer.util.loadColorTable(path(BUNDLE["color_table"]))
    foreground = None
    for heat in BUNDLE["maps"]:
        volume = slicer.util.loadVolume(path(heat["file"]), {{"name": heat["name"], "show": False}})
        display = volume.GetDisplayNode()
        display.SetAndObserveColorNodeID(table.GetID())
        display.SetAutoWindowLevel(0)
        display.SetWindowLevel(2.0 * heat["half_window"], 0.0)
        if heat["file"] == BUNDLE["foreground"]:
            foreground = volume
    for file, name in ((BUNDLE["segmentation"], BUNDLE["segmentation_name"]),
                       (BUNDLE["causes_segmentation"], BUNDLE["causes_segmentation_name"])):
        if not file:
            continue
        segmentation = slicer.util.loadSegmentation(path(file), {{"name": name}})
        outlines = segmentation.GetDisplayNode()
        # Outlines only, as in the scene: a fill would tint the map where it is strongest.
        outlines.SetVisibility2DFill(False)
        outlines.SetSliceIntersectionThickness(BUNDLE["outline_thickness"])
    if BUNDLE["markups"]:
        slicer.util.loadMarkups(path(BUNDLE["markups"]))
    if BUNDLE["table"]:
        slicer.util.loadTable(path(BUNDLE["table"]))
    slicer.util.setSliceViewerLayers(background=ct, foreground=foreground,
                                     foregroundOpacity=BUNDLE["foreground_opacity"], fit=True)
    if BUNDLE["focus_lps"]:
        x, y, z = BUNDLE["focus_lps"]
        # Slicer works in RAS: LPS -> RAS negates x and y.
        slicer.modules.markups.logic().JumpSlicesToLocation(-x, -y, z, True)
        for view in BUNDLE["views"]:
            node = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNode" + view)
            node.SetFieldOfView(BUNDLE["field_of_view"], BUNDLE["field_of_view"], node.GetFieldOfView()[2])


main()
'''


def review_script(spec: SceneSpec, focus_lps: tuple[float, float, float] | None = None) -> str:
    """Source of a Slicer script that loads what ``spec`` describes and centres the slices on ``focus_lps``
    (default: the scene's own focus)."""
    focus_lps = focus_lps if focus_lps is not None else spec.focus_lps
    bundle = {
        "ct": spec.ct_file,
        "ct_window": LUNG_WINDOW,
        "ct_level": LUNG_LEVEL,
        "color_table": spec.color_table_file,
        "maps": [{"name": m.name, "file": m.file, "half_window": m.half_window} for m in spec.maps],
        "foreground": spec.foreground_file,
        "foreground_opacity": spec.foreground_opacity,
        "segmentation": spec.segmentation_file,
        "segmentation_name": NODULES_SEGMENTATION,
        "causes_segmentation": spec.causes_segmentation_file,
        "causes_segmentation_name": CAUSES_SEGMENTATION,
        "markups": spec.markups_file,
        "table": spec.table_file,
        "outline_thickness": OUTLINE_THICKNESS,
        "views": list(SLICE_VIEWS),
        "field_of_view": spec.field_of_view_mm,
        "focus_lps": list(focus_lps) if focus_lps is not None else None,
    }
    return _TEMPLATE.format(bundle=json.dumps(bundle, indent=1))


def write_review_script(spec: SceneSpec, path: Path, focus_lps: tuple[float, float, float] | None = None) -> Path:
    """Write ``review.py`` for a bundle."""
    return io.write_text(path, review_script(spec, focus_lps))
