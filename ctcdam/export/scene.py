"""Slicer scene (``.mrml``) and scene bundle (``.mrb``) of a review folder (research/conventions.md §1.5-1.6).

Tag and attribute names are those Slicer's MRML nodes read and write back (``GetNodeTagName``,
``ReadXMLAttributes``; tests/test_slicer_bundle.py compares every attribute written here with the scene's
own XML after Slicer loaded it). The geometry of every volume comes from its file
(``UseOrientationFromFile``), so the scene holds references, display settings, the slice views and the
slice-view layers.

What the scene opens on (research/slicer_core.md D1-D5): the three singleton slice views centred on the
focus nodule (``SceneSpec.focus_lps``) at a field of view of a few centimetres; the CT in a lung window as
background; the focus nodule's malignancy map as foreground (colour rule: ``ctcdam.export.colors``); the
nodule outlines without fill, so they frame the map without covering it; the centroid markers; and a table
of the predictions beside the radiologists' values (Tables module). A known-cause scan adds a second segmentation,
*Known causes* (the painted spicules and calcification), drawn the same way.
"""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctcdam import io
from ctcdam.export.colors import FOREGROUND_OPACITY
from ctcdam.export.markups import MARKUPS_STYLE, MarkupsStyle

#: Avoids Slicer's "legacy scene" and "newer version" branches (app major.minor.patch revision).
MRML_VERSION = "Slicer 5.6.2 32448"
#: Lung window of the CT background.
LUNG_WINDOW, LUNG_LEVEL = 1500.0, -600.0
GREY_COLOR_NODE = "vtkMRMLColorTableNodeGrey"
CDAM_COLOR_NODE = "vtkMRMLColorTableNodeCDAM"
SLICE_VIEWS = ("Red", "Yellow", "Green")
#: Orientation of each singleton view and its slice-to-RAS rotation (columns: screen x, screen y, normal),
#: as Slicer's own slice nodes write them (``orientationMatrixAxial`` etc.).
VIEW_ORIENTATIONS: Mapping[str, str] = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
ORIENTATION_ROTATIONS: Mapping[str, tuple[tuple[float, float, float], ...]] = {
    "Axial": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "Sagittal": ((0.0, 0.0, -1.0), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "Coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
}
#: Width of the nodule outlines in the slice views (pixels).
OUTLINE_THICKNESS = 2
#: Names of the scene's segmentation nodes: the nodules, and the known causes of a known-cause scan.
NODULES_SEGMENTATION, CAUSES_SEGMENTATION = "Nodules", "Known causes"


@dataclass(frozen=True)
class MapVolume:
    """A signed heat map of the scene: bundle-relative file, display name, half-width of its symmetric window."""

    name: str
    file: str
    half_window: float


@dataclass(frozen=True)
class SceneSpec:
    """What a review scene shows: CT background, heat maps (one as foreground), nodule outlines and centroids,
    the predictions table, and where the slice views open (``focus_lps``, LPS mm; None: Slicer's defaults)."""

    ct_file: str
    color_table_file: str
    maps: tuple[MapVolume, ...] = ()
    foreground_file: str | None = None
    segmentation_file: str | None = None
    causes_segmentation_file: str | None = None  #: the known causes' segments (known-cause scans only)
    markups_file: str | None = None
    table_file: str | None = None
    foreground_opacity: float = FOREGROUND_OPACITY
    focus_lps: tuple[float, float, float] | None = None
    field_of_view_mm: float = 64.0
    #: The CT's voxel spacing along the R, A and S axes: the depth of each view's field (what Slicer sets it to).
    axis_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    markups_style: MarkupsStyle = MARKUPS_STYLE

    def files(self) -> list[str]:
        """Every bundle-relative file the scene names."""
        optional = [self.segmentation_file, self.causes_segmentation_file, self.markups_file, self.table_file]
        return [self.ct_file, self.color_table_file, *(m.file for m in self.maps), *(f for f in optional if f)]


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, (tuple, list)):
        return " ".join(_text(v) for v in value)
    return str(value)


def _node(parent: ET.Element, tag: str, **attributes: object) -> ET.Element:
    return ET.SubElement(parent, tag, {key: _text(value) for key, value in attributes.items()})


def _volume(scene: ET.Element, number: int, name: str, file: str, color_node: str, window: float,
            level: float) -> str:
    storage, display, volume = (f"vtkMRMLVolumeArchetypeStorageNode{number}",
                                f"vtkMRMLScalarVolumeDisplayNode{number}", f"vtkMRMLScalarVolumeNode{number}")
    _node(scene, "VolumeArchetypeStorage", id=storage, name=f"{name}_storage", fileName=file,
          UseOrientationFromFile=1, centerImage=0, useCompression=1)
    _node(scene, "VolumeDisplay", id=display, name=f"{name}_display", colorNodeID=color_node, autoWindowLevel=0,
          window=f"{window:.6g}", level=f"{level:.6g}", applyThreshold=0, autoThreshold=0, interpolate=1,
          visibility=True)
    _node(scene, "Volume", id=volume, name=name, storageNodeRef=storage, displayNodeRef=display)
    return volume


def _segmentation(scene: ET.Element, number: int, name: str, file: str) -> None:
    storage, display = f"vtkMRMLSegmentationStorageNode{number}", f"vtkMRMLSegmentationDisplayNode{number}"
    _node(scene, "SegmentationStorage", id=storage, name=f"{name}_storage", fileName=file)
    # Outline only: the fill would tint the map exactly where it is strongest (a reviewer can switch it on).
    _node(scene, "SegmentationDisplay", id=display, name=f"{name}_display", visibility=True, opacity=1.0,
          Visibility2DFill=False, Visibility2DOutline=True, Opacity2DFill=0.3, Opacity2DOutline=1.0,
          sliceIntersectionThickness=OUTLINE_THICKNESS)
    _node(scene, "Segmentation", id=f"vtkMRMLSegmentationNode{number}", name=name, storageNodeRef=storage,
          displayNodeRef=display)


def slice_to_ras(orientation: str, centre_ras: Sequence[float]) -> tuple[float, ...]:
    """The 16 row-major entries of a slice node's SliceToRAS: the orientation's rotation, origin at ``centre_ras``."""
    rotation = ORIENTATION_ROTATIONS[orientation]
    rows = [(*rotation[r], float(centre_ras[r])) for r in range(3)]
    return tuple(v for row in rows for v in row) + (0.0, 0.0, 0.0, 1.0)


def lps_to_ras(point: Sequence[float]) -> tuple[float, float, float]:
    """LPS -> RAS (Slicer's world): negate x and y."""
    return -float(point[0]), -float(point[1]), float(point[2])


def _slice_views(scene: ET.Element, spec: SceneSpec) -> None:
    if spec.focus_lps is None:
        return
    centre = lps_to_ras(spec.focus_lps)
    for view in SLICE_VIEWS:
        orientation = VIEW_ORIENTATIONS[view]
        normal = int(np.argmax(np.abs(np.array(ORIENTATION_ROTATIONS[orientation])[:, 2])))
        # Singletons: Slicer copies these into its own Red/Yellow/Green nodes when the scene is opened. Their
        # pixel size is the view's own; the field's depth is the CT's spacing along the normal, as Slicer sets it.
        _node(scene, "Slice", id=f"vtkMRMLSliceNode{view}", name=view, singletonTag=view, layoutName=view,
              orientation=orientation, defaultOrientation=orientation, orientationReference=orientation,
              fieldOfView=(spec.field_of_view_mm, spec.field_of_view_mm, spec.axis_spacing_mm[normal]),
              sliceToRAS=slice_to_ras(orientation, centre))


def scene_document(spec: SceneSpec) -> ET.ElementTree:
    """The MRML XML tree of a review scene."""
    scene = ET.Element("MRML", {"version": MRML_VERSION, "userTags": ""})
    _node(scene, "ColorTableStorage", id="vtkMRMLColorTableStorageNode1", name="cdam_diverging_storage",
          fileName=spec.color_table_file)
    # The table's storage node reads the entries and sets the node's type (File); nothing else is needed.
    _node(scene, "ColorTable", id=CDAM_COLOR_NODE, name="cdam_diverging", storageNodeRef="vtkMRMLColorTableStorageNode1")
    background = _volume(scene, 1, "CT", spec.ct_file, GREY_COLOR_NODE, LUNG_WINDOW, LUNG_LEVEL)
    foreground = ""
    for number, heat in enumerate(spec.maps, start=2):
        volume_id = _volume(scene, number, heat.name, heat.file, CDAM_COLOR_NODE, 2.0 * heat.half_window, 0.0)
        if heat.file == spec.foreground_file:
            foreground = volume_id
    if spec.foreground_file is not None and not foreground:
        raise ValueError(f"the foreground map {spec.foreground_file!r} is not one of the scene's maps")
    if spec.segmentation_file:
        _segmentation(scene, 1, NODULES_SEGMENTATION, spec.segmentation_file)
    if spec.causes_segmentation_file:
        _segmentation(scene, 2, CAUSES_SEGMENTATION, spec.causes_segmentation_file)
    if spec.markups_file:
        _node(scene, "MarkupsJsonStorage", id="vtkMRMLMarkupsJsonStorageNode1", name="Nodule centroids_storage",
              fileName=spec.markups_file)
        # A scene reads only the points of a .mrk.json, never its display block: the display node carries it.
        _node(scene, "MarkupsFiducialDisplay", id="vtkMRMLMarkupsFiducialDisplayNode1", name="Nodule centroids_display",
              **spec.markups_style.mrml_attributes())
        _node(scene, "MarkupsFiducial", id="vtkMRMLMarkupsFiducialNode1", name="Nodule centroids",
              storageNodeRef="vtkMRMLMarkupsJsonStorageNode1", displayNodeRef="vtkMRMLMarkupsFiducialDisplayNode1")
    if spec.table_file:
        _node(scene, "TableStorage", id="vtkMRMLTableStorageNode1", name="Nodule predictions_storage",
              fileName=spec.table_file)
        _node(scene, "Table", id="vtkMRMLTableNode1", name="Nodule predictions", storageNodeRef="vtkMRMLTableStorageNode1")
    _slice_views(scene, spec)
    for view in SLICE_VIEWS:
        _node(scene, "SliceComposite", id=f"vtkMRMLSliceCompositeNode{view}", singletonTag=view, layoutName=view,
              backgroundVolumeID=background, foregroundVolumeID=foreground, labelVolumeID="",
              foregroundOpacity=f"{spec.foreground_opacity:g}", labelOpacity=1, compositing=0)
    ET.indent(scene)
    return ET.ElementTree(scene)


def scene_text(spec: SceneSpec) -> str:
    """The ``.mrml`` text of a scene."""
    text = ET.tostring(scene_document(spec).getroot(), encoding="unicode", xml_declaration=False)
    return "<?xml version='1.0' encoding='utf-8'?>\n" + text + "\n"


def write_scene(spec: SceneSpec, path: Path) -> Path:
    """Write the ``.mrml`` scene; its file references are relative to the scene's folder."""
    return io.write_text(path, scene_text(spec))


#: Timestamp of every member of a ``.mrb`` (zip's earliest): equal bundles give byte-equal archives.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_COPY_CHUNK = 1 << 22


def _add_member(archive: zipfile.ZipFile, source: Path, name: str, compress_type: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = compress_type
    info.external_attr = 0o644 << 16
    info.file_size = source.stat().st_size  # lets zipfile choose zip64 up front for a large CT
    with open(source, "rb") as reader, archive.open(info, "w") as writer:
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def write_scene_bundle(scene_file: Path, files: Sequence[str], path: Path) -> Path:
    """Zip a scene and the files it names into a ``.mrb``, laid out as Slicer writes one: ``<name>/<name>.mrml``
    beside the files at the same relative paths, so the scene's references resolve unchanged."""
    root = scene_file.parent
    name = scene_file.stem
    with io.atomic_file(path) as temporary, zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _add_member(archive, scene_file, f"{name}/{scene_file.name}", zipfile.ZIP_DEFLATED)
        for relative in dict.fromkeys(files):
            # Compressed formats (.nii.gz, gzip-encoded .nrrd, .png) gain nothing from a second deflate.
            stored = relative.endswith((".gz", ".nrrd", ".png"))
            _add_member(archive, root / relative, f"{name}/{relative}",
                        zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    return path
