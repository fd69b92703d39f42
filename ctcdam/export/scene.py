"""Slicer scene (``.mrml``) and scene bundle (``.mrb``) of a review folder (research/conventions.md §1.5-1.6).

Tag and attribute names are those Slicer's MRML nodes read (``GetNodeTagName``, ``ReadXMLAttributes``): the
geometry of every volume comes from its file (``UseOrientationFromFile``), so the scene holds only references,
display settings and the slice-view layers.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Avoids Slicer's "legacy scene" and "newer version" branches (app major.minor.patch revision).
MRML_VERSION = "Slicer 5.6.2 32448"
#: Lung window of the CT background.
LUNG_WINDOW, LUNG_LEVEL = 1500.0, -600.0
GREY_COLOR_NODE = "vtkMRMLColorTableNodeGrey"
CDAM_COLOR_NODE = "vtkMRMLColorTableNodeCDAM"
SLICE_VIEWS = ("Red", "Yellow", "Green")


@dataclass(frozen=True)
class MapVolume:
    """A signed heat map of the scene: bundle-relative file, display name, half-width of its symmetric window."""

    name: str
    file: str
    half_window: float


@dataclass(frozen=True)
class SceneSpec:
    """What a review scene shows: CT background, heat maps (one as foreground), nodule outlines and centroids."""

    ct_file: str
    color_table_file: str
    maps: tuple[MapVolume, ...] = ()
    foreground_file: str | None = None
    segmentation_file: str | None = None
    markups_file: str | None = None
    foreground_opacity: float = 0.5

    def files(self) -> list[str]:
        """Every bundle-relative file the scene names."""
        optional = [self.segmentation_file, self.markups_file]
        return [self.ct_file, self.color_table_file, *(m.file for m in self.maps), *(f for f in optional if f)]


def _node(parent: ET.Element, tag: str, **attributes: object) -> ET.Element:
    return ET.SubElement(parent, tag, {key: str(value) for key, value in attributes.items()})


def _volume(scene: ET.Element, number: int, name: str, file: str, color_node: str, window: float,
            level: float, interpolate: bool) -> str:
    storage, display, volume = (f"vtkMRMLVolumeArchetypeStorageNode{number}",
                                f"vtkMRMLScalarVolumeDisplayNode{number}", f"vtkMRMLScalarVolumeNode{number}")
    _node(scene, "VolumeArchetypeStorage", id=storage, name=f"{name}_storage", fileName=file,
          UseOrientationFromFile=1, centerImage=0, singleFile=1, useCompression=1)
    _node(scene, "VolumeDisplay", id=display, name=f"{name}_display", colorNodeID=color_node, autoWindowLevel=0,
          window=f"{window:.6g}", level=f"{level:.6g}", applyThreshold=0, autoThreshold=0,
          interpolate=int(interpolate), visibility="true")
    _node(scene, "Volume", id=volume, name=name, storageNodeRef=storage, displayNodeRef=display)
    return volume


def scene_document(spec: SceneSpec) -> ET.ElementTree:
    """The MRML XML tree of a review scene."""
    scene = ET.Element("MRML", {"version": MRML_VERSION, "userTags": ""})
    _node(scene, "ColorTableStorage", id="vtkMRMLColorTableStorageNode1", fileName=spec.color_table_file)
    # type 13 = User; the table's storage node reads the entries (and switches the node to type File).
    _node(scene, "ColorTable", id=CDAM_COLOR_NODE, name="cdam_diverging", type=13, numcolors=256,
          storageNodeRef="vtkMRMLColorTableStorageNode1")
    background = _volume(scene, 1, "CT", spec.ct_file, GREY_COLOR_NODE, LUNG_WINDOW, LUNG_LEVEL, True)
    foreground = ""
    for number, heat in enumerate(spec.maps, start=2):
        volume_id = _volume(scene, number, heat.name, heat.file, CDAM_COLOR_NODE, 2.0 * heat.half_window, 0.0, True)
        if heat.file == spec.foreground_file:
            foreground = volume_id
    if spec.foreground_file is not None and not foreground:
        raise ValueError(f"the foreground map {spec.foreground_file!r} is not one of the scene's maps")
    if spec.segmentation_file:
        _node(scene, "SegmentationStorage", id="vtkMRMLSegmentationStorageNode1", fileName=spec.segmentation_file)
        _node(scene, "SegmentationDisplay", id="vtkMRMLSegmentationDisplayNode1", visibility="true", opacity=1,
              visibility2DFill="true", visibility2DOutline="true", opacity2DFill=0.2, opacity2DOutline=1)
        _node(scene, "Segmentation", id="vtkMRMLSegmentationNode1", name="Nodules",
              storageNodeRef="vtkMRMLSegmentationStorageNode1", displayNodeRef="vtkMRMLSegmentationDisplayNode1")
    if spec.markups_file:
        _node(scene, "MarkupsJsonStorage", id="vtkMRMLMarkupsJsonStorageNode1", fileName=spec.markups_file)
        _node(scene, "MarkupsFiducialDisplay", id="vtkMRMLMarkupsFiducialDisplayNode1", visibility="true")
        _node(scene, "MarkupsFiducial", id="vtkMRMLMarkupsFiducialNode1", name="Nodule centroids",
              storageNodeRef="vtkMRMLMarkupsJsonStorageNode1", displayNodeRef="vtkMRMLMarkupsFiducialDisplayNode1")
    for view in SLICE_VIEWS:
        _node(scene, "SliceComposite", id=f"vtkMRMLSliceCompositeNode{view}", singletonTag=view, layoutName=view,
              backgroundVolumeID=background, foregroundVolumeID=foreground, labelVolumeID="",
              foregroundOpacity=f"{spec.foreground_opacity:g}", labelOpacity=1, compositing=0)
    ET.indent(scene)
    return ET.ElementTree(scene)


def write_scene(spec: SceneSpec, path: Path) -> Path:
    """Write the ``.mrml`` scene; its file references are relative to the scene's folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scene_document(spec).write(path, encoding="utf-8", xml_declaration=True)
    return path


def write_scene_bundle(scene_file: Path, files: Sequence[str], path: Path) -> Path:
    """Zip a scene and the files it names into a ``.mrb``, laid out as Slicer writes one: ``<name>/<name>.mrml``
    beside the files at the same relative paths, so the scene's references resolve unchanged."""
    root = scene_file.parent
    name = scene_file.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(scene_file, f"{name}/{scene_file.name}")
        for relative in dict.fromkeys(files):
            # Compressed formats (.nii.gz, gzip-encoded .nrrd, .png) gain nothing from a second deflate.
            stored = relative.endswith((".gz", ".nrrd", ".png"))
            archive.write(root / relative, f"{name}/{relative}",
                          compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    return path
