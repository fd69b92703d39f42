"""The review bundle as 3D Slicer's own libraries (PyPI ``slicer-core``) open, read and draw it.

Bundles are written by ``ctcdam.export.bundle.write_bundle`` (what ``pipelines/explain.py`` calls) for a
synthetic LIDC scan (LIDC-IDRI-0237: phantom CT, real annotations) and for the real LIDC-IDRI-0003 slices of
../shared/lidc-sample. Their maps are known signed fields on each nodule's crop grid: a positive core on the
nodule, a negative shell 10 mm out, and smooth low-level noise everywhere in the box (as real CDAM maps have),
so the sign and the size of the value at every pixel are known. Slicer reads every file; the references are
SimpleITK reading the same files. Rendering goes through Slicer's slice logic and 2D displayable managers
offscreen (EGL); those tests skip, naming the Debian packages, where Mesa's EGL is missing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctcdam.export import naming
from ctcdam.export.bundle import write_bundle
from ctcdam.export.colors import TRANSPARENT_BAND, nodule_color
from ctcdam.export.markups import MARKUPS_STYLE
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.segmentation import Segment, write_segmentation
from ctcdam.export.slicer_render import (
    CAPTION_KEY,
    SLICE_VIEWS,
    SlicerSession,
    compose_views,
    rendering_problem,
    slicer_available,
)
from ctcdam.targets import MALIGNANCY, TARGETS

pytestmark = pytest.mark.skipif(
    not slicer_available(), reason="3D Slicer's libraries are not installed (`make test` installs slicer-core)")

SYNTHETIC_SCAN = "LIDC-IDRI-0237"
SAMPLE_SCAN = "LIDC-IDRI-0003"
#: Legacy reference attributes of our scene and the reference role Slicer writes them back under.
LEGACY_REFERENCES = {"storageNodeRef": "storage", "displayNodeRef": "display",
                     "backgroundVolumeID": "backgroundVolume", "foregroundVolumeID": "foregroundVolume",
                     "labelVolumeID": "labelVolume"}


def _needs_rendering() -> None:
    problem = rendering_problem()
    if problem:
        pytest.skip(problem)


# ---------------------------------------------------------------------------------------------------------------
# bundles with known maps


def _signed_map(crop: sitk.Image, centroid_lps, seed: int) -> np.ndarray:
    """Core (+1 at the centroid, sigma 4 mm) minus 0.85 x a shell at 10 mm, plus noise up to 0.12, times 0.05."""
    index = np.indices(tuple(reversed(crop.GetSize()))).reshape(3, -1)[::-1]  # (x, y, z) per voxel
    to_lps = np.array(crop.GetDirection()).reshape(3, 3) * np.array(crop.GetSpacing())
    points = (to_lps @ index).T + np.array(crop.GetOrigin())  # SimpleITK's index -> physical mapping
    radius = np.linalg.norm(points - np.asarray(centroid_lps), axis=1).reshape(tuple(reversed(crop.GetSize())))
    core, shell = np.exp(-radius**2 / 32.0), np.exp(-((radius - 10.0) ** 2) / 8.0)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=radius.shape), 2.0)
    return (0.05 * (core - 0.85 * shell + 0.12 * noise / np.abs(noise).max())).astype(np.float32)


def _scan_result(scan_id: str, lidc_root: Path) -> ScanResult:
    """Every nodule of a scan inside its present slices, cropped as explain does, with known signed maps."""
    from ctcdam.lidc.scan_nodules import PreprocessConfig, crop, load_scan, scan_nodules

    config = PreprocessConfig()
    loaded = load_scan(scan_id, lidc_root, config)
    found, _ = scan_nodules(loaded.scan, scan_id, loaded.series, config, training_population_only=False)
    nodules = []
    for k, nodule in enumerate(found):
        hu = crop(loaded.series, nodule, config).hu
        values = _signed_map(hu, nodule.mask.centroid, seed=k)
        maps = {}
        for name, factor in ((MALIGNANCY, 1.0), ("diameter", -1.0)):
            image = sitk.GetImageFromArray(factor * values)
            image.CopyInformation(hu)
            maps[name] = image
        nodules.append(NoduleResult(
            index=k + 1, nodule_id=nodule.nodule_id, centroid_lps=nodule.mask.centroid,
            in_training_population=nodule.in_training_population,
            predictions={t: 0.2 + 0.1 * j for j, t in enumerate(TARGETS)},
            radiologists={t: 1.0 + j for j, t in enumerate(TARGETS)},
            model_outputs={t: 0.1 * j - 0.3 for j, t in enumerate(TARGETS)},
            crop=hu, consensus_mask=nodule.mask.image, maps=maps))
    return ScanResult(scan_id=scan_id, checkpoint="known-maps", method="cdam", ct=loaded.series.image,
                      nodules=tuple(nodules))


@dataclass
class Opened:
    """A bundle, the Slicer session that opened it with OpenSlicerDataBundle, and its views as they opened."""

    bundle: Path
    session: SlicerSession
    opened_views: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def scene(self):
        return self.session.scene

    def node(self, class_name: str, name: str | None = None):
        nodes = [self.scene.GetNthNodeByClass(i, class_name) for i in range(self.scene.GetNumberOfNodesByClass(class_name))]
        chosen = [n for n in nodes if name is None or n.GetName() == name]
        assert len(chosen) == 1, f"{len(chosen)} {class_name} nodes named {name!r}"
        return chosen[0]


def _bundle(scan_id: str, lidc_root: Path, out: Path) -> Path:
    return write_bundle(_scan_result(scan_id, lidc_root), out)


@pytest.fixture(scope="module", params=[SYNTHETIC_SCAN, pytest.param(SAMPLE_SCAN, marks=pytest.mark.lidc_sample)])
def opened(request, tmp_path_factory) -> Iterator[Opened]:
    """The bundle of the scan, opened by Slicer; the views are rendered once, right after opening."""
    if request.param == SYNTHETIC_SCAN:
        root = request.getfixturevalue("synthetic_lidc").root
    else:
        root = request.getfixturevalue("lidc_sample")
    bundle = _bundle(request.param, root, tmp_path_factory.mktemp(f"bundle-{request.param}"))
    with SlicerSession() as session:
        session.open_bundle(bundle / f"{bundle.name}.mrb", tmp_path_factory.mktemp("unpacked"))
        result = Opened(bundle=bundle, session=session)
        if rendering_problem() is None:
            result.opened_views = session.render_all()  # before any test changes the display
        yield result


def _predictions(bundle: Path) -> dict:
    return json.loads((bundle / naming.PREDICTIONS_FILE).read_text())


def _lps_to_ras(point) -> np.ndarray:
    return np.array([-point[0], -point[1], point[2]], dtype=float)


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def segment_voxels_ras(segmentation, segment_id: str) -> np.ndarray:
    """RAS positions of a segment's voxels in Slicer's own binary labelmap (its image-to-world matrix)."""
    import vtk
    from vtkmodules.util.numpy_support import vtk_to_numpy

    labelmap = segmentation.GetSegmentRepresentation(segment_id, "Binary labelmap")
    to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(to_world)
    extent = labelmap.GetExtent()
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    ijk = np.argwhere(values == segmentation.GetSegment(segment_id).GetLabelValue())[:, ::-1] + np.array(extent[::2])
    return (_matrix(to_world) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


def _sitk_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """IJK -> RAS from SimpleITK's own index-to-physical mapping (LPS), x and y negated."""
    origin = np.array(image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.array(image.TransformContinuousIndexToPhysicalPoint(unit)) - origin
    matrix[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_every_storage_node_reads_and_every_node_is_there(opened: Opened):
    import slicer

    assert not [m for m in opened.session.messages() if "rror" in m], opened.session.messages()
    predictions = _predictions(opened.bundle)
    n_nodules = len(predictions["nodules"])
    assert n_nodules >= 1
    storable = [opened.scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
                for i in range(opened.scene.GetNumberOfNodesByClass("vtkMRMLStorableNode"))]
    read = {}
    for node in storable:
        for k in range(node.GetNumberOfStorageNodes()):
            storage = node.GetNthStorageNode(k)
            read[node.GetName()] = storage.ReadData(node)  # re-read from the unpacked file: 1 = success
    files = [e for e in ET.parse(opened.bundle / f"{opened.bundle.name}.mrml").getroot() if e.get("fileName")]
    assert len(read) == len(files) and set(read.values()) == {1}, read
    maps = {m for n in predictions["nodules"] for m in n["maps"].values()}
    volumes = [n for n in storable if n.IsA("vtkMRMLScalarVolumeNode")]
    assert len(volumes) == 1 + len(maps) and all(v.GetImageData() is not None for v in volumes)
    segmentation = opened.node("vtkMRMLSegmentationNode").GetSegmentation()
    assert segmentation.GetNumberOfSegments() == n_nodules
    markups = opened.node("vtkMRMLMarkupsFiducialNode")
    assert markups.GetNumberOfControlPoints() == n_nodules
    assert opened.scene.GetNodeByID("vtkMRMLColorTableNodeCDAM").GetNumberOfColors() == 256
    # The predictions are readable in Slicer: a table node, one row per nodule and target.
    table = opened.node("vtkMRMLTableNode", "Nodule predictions")
    assert table.GetNumberOfRows() == n_nodules * len(TARGETS)
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    first = predictions["nodules"][0]
    row = {columns[c]: table.GetCellText(0, c) for c in range(len(columns))}
    assert row["nodule"] == "Nodule 1" and row["target"] == "p(malignancy)"
    assert float(row["model"]) == pytest.approx(first["predictions"][MALIGNANCY], abs=1e-3)
    assert float(row["radiologists"]) == pytest.approx(first["radiologists"][MALIGNANCY], abs=1e-3)
    assert isinstance(table, slicer.vtkMRMLTableNode)


def _same_value(ours: str, theirs: str | None) -> bool:
    if theirs == ours:
        return True
    if theirs is None:
        return ours == ""
    try:
        a, b = np.array(ours.split(), dtype=float), np.array(theirs.split(), dtype=float)
    except ValueError:
        return False
    # Slicer writes matrices with 6 significant digits.
    return a.shape == b.shape and np.allclose(a, b, rtol=2e-6, atol=1e-4)


def test_every_attribute_written_is_one_slicer_keeps(opened: Opened):
    ours = ET.parse(opened.bundle / f"{opened.bundle.name}.mrml").getroot()
    theirs = {node.get("id"): node for node in ET.fromstring(opened.session.scene_xml())}
    lost = []
    for node in ours:
        kept = theirs.get(node.get("id"))
        assert kept is not None and kept.tag == node.tag, f"{node.tag} {node.get('id')} is not in Slicer's scene"
        references = dict(item.split(":", 1) for item in (kept.get("references") or "").split(";") if item)
        for key, value in node.attrib.items():
            if key in LEGACY_REFERENCES:
                same = references.get(LEGACY_REFERENCES[key], "") == value
            else:
                same = _same_value(value, kept.get(key))
            if not same:
                lost.append(f"{node.tag}.{key}: written {value!r}, Slicer has {kept.get(key)!r}")
    assert not lost, "\n".join(lost)


def test_geometry_equals_simpleitk(opened: Opened):
    import vtk
    from vtkmodules.util.numpy_support import vtk_to_numpy

    bundle, predictions = opened.bundle, _predictions(opened.bundle)
    ct_node = opened.node("vtkMRMLScalarVolumeNode", "CT")
    ct = sitk.ReadImage(str(bundle / naming.CT_FILE))
    matrix = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(_matrix(matrix), _sitk_ijk_to_ras(ct), atol=1e-9)
    voxels = vtk_to_numpy(ct_node.GetImageData().GetPointData().GetScalars()).reshape(sitk.GetArrayViewFromImage(ct).shape)
    np.testing.assert_array_equal(voxels, sitk.GetArrayViewFromImage(ct))
    for nodule in predictions["nodules"]:
        for name, file in nodule["maps"].items():
            heat = opened.node("vtkMRMLScalarVolumeNode", f"N{nodule['index']} CDAM {name}")
            heat.GetIJKToRASMatrix(matrix)
            np.testing.assert_allclose(_matrix(matrix), _sitk_ijk_to_ras(sitk.ReadImage(str(bundle / file))), atol=1e-9)

    # Segments: Slicer's labelmap voxels against SimpleITK's reading of the same file, in RAS.
    segmentation = opened.node("vtkMRMLSegmentationNode").GetSegmentation()
    seg_file = sitk.ReadImage(str(bundle / naming.SEGMENTATION_FILE))
    labels = sitk.GetArrayFromImage(seg_file)
    markups = opened.node("vtkMRMLMarkupsFiducialNode")
    for k, nodule in enumerate(predictions["nodules"]):
        segment_id = f"nodule_{nodule['index']}"
        segment = segmentation.GetSegment(segment_id)
        slicer_points = segment_voxels_ras(segmentation, segment_id)
        label = int(seg_file.GetMetaData(f"Segment{k}_LabelValue"))
        sitk_points = np.array([_lps_to_ras(seg_file.TransformIndexToPhysicalPoint([int(v) for v in i]))
                                for i in np.argwhere(labels == label)[:, ::-1]])
        assert len(slicer_points) == len(sitk_points) > 0
        np.testing.assert_allclose(np.sort(slicer_points, axis=0), np.sort(sitk_points, axis=0), atol=1e-4)
        # The centroid marker (read by Slicer's JSON storage node, LPS file -> RAS) sits inside its segment.
        point = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPositionWorld(k, point)
        np.testing.assert_allclose(point, _lps_to_ras(nodule["centroid_lps"]), atol=1e-6)
        assert np.linalg.norm(slicer_points - point, axis=1).min() < 1.5
        assert np.allclose(segment.GetColor(), nodule_color(nodule["index"]), atol=1e-5)


def test_segment_editor_works_on_the_whole_ct(opened: Opened):
    import slicer
    import vtk

    ct_node = opened.node("vtkMRMLScalarVolumeNode", "CT")
    matrix = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(matrix)
    whole_ct = slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix, ct_node.GetImageData())
    segmentation_node = opened.node("vtkMRMLSegmentationNode")
    used = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(
        segmentation_node.GetSegmentation())
    assert _same_value(used.replace(";", " "), whole_ct.replace(";", " ")), (used, whole_ct)


def test_read_from_mrb_as_the_desktop_reader(opened: Opened, tmp_path):
    """vtkMRMLScene.ReadFromMRB (what Slicer's scene-bundle reader calls) gives the same scene."""
    ours = ET.parse(opened.bundle / f"{opened.bundle.name}.mrml").getroot()
    with SlicerSession() as session:
        session.read_bundle(opened.bundle / f"{opened.bundle.name}.mrb", tmp_path / "cache")
        assert not [m for m in session.messages() if "rror" in m], session.messages()
        for element in ours:
            node = session.scene.GetNodeByID(element.get("id"))
            assert node is not None and node.GetName() == (element.get("name") or node.GetName()), element.get("id")
            if node.IsA("vtkMRMLVolumeNode"):
                assert node.GetImageData() is not None and node.GetImageData().GetNumberOfPoints() > 0
        n_nodules = len(_predictions(opened.bundle)["nodules"])
        segmentation = session.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode").GetSegmentation()
        assert segmentation.GetNumberOfSegments() == n_nodules
        assert session.scene.GetFirstNodeByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfControlPoints() == n_nodules
        assert session.scene.GetFirstNodeByClass("vtkMRMLTableNode").GetNumberOfRows() == n_nodules * len(TARGETS)
        for view in SLICE_VIEWS:
            written = next(e for e in ours if e.tag == "Slice" and e.get("layoutName") == view)
            loaded = _matrix(session.slice_node(view).GetSliceToRAS()).reshape(-1)
            np.testing.assert_allclose(loaded, np.array(written.get("sliceToRAS").split(), dtype=float), atol=1e-6)
            composite = session.slice_logic(view).GetSliceCompositeNode()
            assert composite.GetBackgroundVolumeID() == "vtkMRMLScalarVolumeNode1"
            assert composite.GetForegroundVolumeID() == "vtkMRMLScalarVolumeNode2"


def test_nodule_colours_are_distinct_for_many_nodules(tmp_path):
    """Twelve nodules (tab10 repeated after ten): Slicer reads twelve different segment colours."""
    ct = sitk.Image((60, 50, 12), sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 2.5))
    segments = []
    for k in range(1, 13):
        mask = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
        mask.CopyInformation(ct)
        mask[4 * k, 25, 6] = 1
        segments.append(Segment(f"nodule_{k}", f"Nodule {k}", nodule_color(k), mask))
    path = write_segmentation(segments, ct, tmp_path / naming.SEGMENTATION_FILE)
    with SlicerSession() as session:
        import slicer

        node = session.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        session.scene.AddNode(storage)
        storage.SetFileName(str(path))
        assert storage.ReadData(node) == 1
        segmentation = node.GetSegmentation()
        colours = [tuple(round(c, 4) for c in segmentation.GetNthSegment(i).GetColor()) for i in range(12)]
    assert len(set(colours)) == 12
    distances = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colours) for b in colours[i + 1:]]
    assert min(distances) > 0.15


# ---------------------------------------------------------------------------------------------------------------
# what the reviewer sees


@contextlib.contextmanager
def _display(opened: Opened, *, outlines: bool | None = None, fill: bool | None = None, markers: bool | None = None,
             foreground: bool | None = None) -> Iterator[None]:
    """Temporarily change what the views show (None: as the scene has it); restores the scene's settings after."""
    segmentation = opened.node("vtkMRMLSegmentationNode").GetDisplayNode()
    markups = opened.node("vtkMRMLMarkupsFiducialNode").GetDisplayNode()
    composites = [opened.session.slice_logic(v).GetSliceCompositeNode() for v in SLICE_VIEWS]
    saved = (segmentation.GetVisibility2DOutline(), segmentation.GetVisibility2DFill(), segmentation.GetOpacity2DFill(),
             markups.GetVisibility(), [c.GetForegroundVolumeID() for c in composites])
    try:
        if outlines is not None:
            segmentation.SetVisibility2DOutline(outlines)
        if fill is not None:
            segmentation.SetVisibility2DFill(fill)
            segmentation.SetOpacity2DFill(1.0 if fill else saved[2])
        if markers is not None:
            markups.SetVisibility(markers)
        if foreground is not None:
            for composite, volume in zip(composites, saved[4]):
                composite.SetForegroundVolumeID(volume if foreground else None)
        yield
    finally:
        segmentation.SetVisibility2DOutline(saved[0])
        segmentation.SetVisibility2DFill(saved[1])
        segmentation.SetOpacity2DFill(saved[2])
        markups.SetVisibility(saved[3])
        for composite, volume in zip(composites, saved[4]):
            composite.SetForegroundVolumeID(volume)


def _foreground_values(opened: Opened, view: str) -> np.ndarray:
    """The foreground map's value at every pixel of a view (Slicer's own reslice of it), top row first."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    reslice = opened.session.slice_logic(view).GetForegroundLayer().GetReslice()
    reslice.Update()
    output = reslice.GetOutput()
    width, height, _ = output.GetDimensions()
    return vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, 0].astype(float)


def _foreground_alpha(opened: Opened, view: str) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy

    producer = opened.session.slice_logic(view).GetForegroundLayer().GetImageDataConnection().GetProducer()
    producer.Update()
    output = producer.GetOutputDataObject(0)
    width, height, _ = output.GetDimensions()
    return vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, 3]


def _map_box(opened: Opened, view: str) -> np.ndarray:
    """Pixels of a view whose position lies inside the foreground map's voxel box (Slicer's XY -> RAS -> IJK)."""
    import vtk

    logic = opened.session.slice_logic(view)
    volume = logic.GetForegroundLayer().GetVolumeNode()
    to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(to_ijk)
    xy_to_ras = _matrix(logic.GetSliceNode().GetXYToRAS())
    height, width = opened.opened_views[view].shape[:2]
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    xy = np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)])
    ijk = (_matrix(to_ijk) @ xy_to_ras @ xy)[:3].T
    inside = np.all((ijk >= -0.5) & (ijk <= np.array(volume.GetImageData().GetDimensions()) - 0.5), axis=1)
    return inside.reshape(height, width)[::-1]


def test_opened_scene_shows_the_nodule_in_all_three_views(opened: Opened):
    """Opened from the .mrb with no other action: every view cuts through nodule 1 and shows CT, map and outline."""
    _needs_rendering()
    import vtk
    from vtkmodules.util.numpy_support import vtk_to_numpy

    segmentation = opened.node("vtkMRMLSegmentationNode").GetSegmentation()
    labelmap = segmentation.GetSegmentRepresentation("nodule_1", "Binary labelmap")
    to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(to_world)
    extent = labelmap.GetExtent()
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    ijk = np.argwhere(values == segmentation.GetSegment("nodule_1").GetLabelValue())[:, ::-1] + np.array(extent[::2])
    nodule = (_matrix(to_world) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    outline_rgb = np.round(np.array(nodule_color(1)) * 255)
    for view in SLICE_VIEWS:
        node = opened.session.slice_node(view)
        slice_to_ras = _matrix(node.GetSliceToRAS())
        # The view's plane passes through the nodule's voxels (the views open on a CT voxel centre).
        distance = np.abs((nodule - slice_to_ras[:3, 3]) @ slice_to_ras[:3, 2])
        assert distance.min() < 1e-3, f"{view}: the plane misses nodule 1 by {distance.min():.2f} mm"
        assert 20.0 <= node.GetFieldOfView()[0] <= 100.0 and 20.0 <= node.GetFieldOfView()[1] <= 100.0
        image = opened.opened_views[view].astype(int)
        height, width = image.shape[:2]
        outline = np.argwhere(np.all(np.abs(image - outline_rgb) <= 3, axis=-1))
        assert len(outline) >= 20, f"{view}: nodule 1's outline is not drawn"
        low, high = outline.min(axis=0), outline.max(axis=0)
        assert np.all(low < [height / 2, width / 2]) and np.all(high > [height / 2, width / 2]), \
            f"{view}: nodule 1's outline does not surround the view's centre"
        assert (np.abs(image[..., 0] - image[..., 2]) > 40).sum() > 200, f"{view}: no map colour in the view"
        # The centroid markers in the colour the scene's display node carries (not Slicer's default cyan/pink).
        marker_rgb = np.round(np.array(MARKUPS_STYLE.color) * 255)
        assert np.all(np.abs(image - marker_rgb) <= 3, axis=-1).sum() >= 10, f"{view}: no marker in its colour"
        assert (image.sum(axis=-1) > 60).mean() > 0.4, f"{view}: the CT background is not shown"


def test_map_is_transparent_where_small_and_signed_where_large(opened: Opened):
    _needs_rendering()
    session, both_signs = opened.session, set()
    for view in SLICE_VIEWS:
        with _display(opened, outlines=False, fill=False, markers=False):
            with_map = session.render(view).astype(int)
            values = _foreground_values(opened, view)
            alpha = _foreground_alpha(opened, view)
        with _display(opened, outlines=False, fill=False, markers=False, foreground=False):
            ct_only = session.render(view).astype(int)
        display = session.slice_logic(view).GetForegroundLayer().GetVolumeNode().GetScalarVolumeDisplayNode()
        assert display.GetLevel() == 0.0  # the window is symmetric around zero
        half_window = display.GetWindow() / 2.0
        small = np.abs(values) <= 0.9 * TRANSPARENT_BAND * half_window
        strong = np.abs(values) >= 0.5 * half_window
        box = _map_box(opened, view)
        assert small[box].mean() > 0.3 and strong.sum() > 100
        # No veil: where the map is small (and outside its box) the view is the CT-only view, pixel for pixel.
        assert np.abs(with_map - ct_only)[small].max() <= 1, f"{view}: the map tints the CT where it is small"
        # Where |map| is large the colour has the map's sign (red = evidence, blue = counter-evidence).
        redder = with_map[..., 0] - with_map[..., 2] > ct_only[..., 0] - ct_only[..., 2] + 20
        bluer = with_map[..., 2] - with_map[..., 0] > ct_only[..., 2] - ct_only[..., 0] + 20
        positive, negative = strong & (values > 0), strong & (values < 0)
        assert redder[positive].mean() > 0.98 and not bluer[positive].any(), view
        if negative.any():
            both_signs.add(view)
            assert bluer[negative].mean() > 0.98 and not redder[negative].any(), view
        # Slicer draws exactly the table's rule: opaque where |v| is beyond the band, transparent within it.
        drawn = alpha > 0
        beyond = np.abs(values) > TRANSPARENT_BAND * half_window
        assert (drawn == beyond)[box].mean() > 0.99
        assert drawn[box].mean() < 0.6, f"{view}: {drawn[box].mean():.0%} of the map box drawn opaque"
    assert both_signs, "the known maps have a negative shell: some view must show counter-evidence"


def test_outlines_frame_the_nodule_without_covering_the_map(opened: Opened):
    _needs_rendering()
    session = opened.session
    for view in SLICE_VIEWS:
        with _display(opened, outlines=False, fill=False, markers=False):
            nothing = session.render(view).astype(int)
        with _display(opened, outlines=True, fill=False, markers=False):
            outlined = session.render(view).astype(int)
        with _display(opened, outlines=False, fill=True, markers=False):
            filled = session.render(view).astype(int)
        outline = np.any(outlined != nothing, axis=-1)
        region = np.any(filled != nothing, axis=-1)  # Slicer's own rasterisation of the segments' sections
        assert outline.sum() >= 20 and region.sum() >= 4, view
        square = np.ones((3, 3), dtype=bool)  # distances in pixels along rows, columns and diagonals
        near = ndimage.binary_dilation(region, square, iterations=3)
        inside = ndimage.binary_erosion(region, square, iterations=3)
        assert not (outline & ~near).any(), f"{view}: outline pixels away from the nodule's section"
        assert not (outline & inside).any(), f"{view}: the outline covers the nodule's inside"
        # As the scene opens (its own outline and fill settings), the nodule's inside shows the map unchanged.
        with _display(opened, markers=False):
            as_opened = session.render(view).astype(int)
        assert np.array_equal(as_opened[inside], nothing[inside]), f"{view}: the segment fill covers the map"


def test_views_png_is_the_scene_as_it_opens(opened: Opened):
    _needs_rendering()
    from PIL import Image

    png = Image.open(opened.bundle / naming.VIEWS_FILE)
    caption = png.text[CAPTION_KEY]
    assert opened.bundle.name in caption and _predictions(opened.bundle)["nodules"][0]["nodule_id"] in caption
    written = np.asarray(png.convert("RGB")).astype(int)
    expected = compose_views(opened.opened_views, caption).astype(int)
    assert written.shape == expected.shape
    assert (np.abs(written - expected).max(axis=-1) <= 2).mean() > 0.999


def test_the_cohort_renderer_survives_a_failed_request_and_serves_the_next(opened: Opened, tmp_path, caplog):
    # One Slicer child serves bundle after bundle: a scene it cannot open costs that bundle its views.png (one log
    # line) and the next request is served by the same child; a second request before the first is waited for
    # is refused (the replies would be mixed up).
    _needs_rendering()
    from ctcdam.export.views_renderer import ViewsRenderer

    with ViewsRenderer() as renderer:
        started = renderer._child
        assert started is not None and started.poll() is None  # started on entering, before any request
        finish = renderer(tmp_path / "missing.mrb", tmp_path / "lost.png")
        with pytest.raises(RuntimeError, match="not waited for"):
            renderer(opened.bundle / f"{opened.bundle.name}.mrb", tmp_path / "early.png")
        with caplog.at_level(logging.WARNING, logger="ctcdam.export.views_renderer"):
            assert finish() is None
        assert any("rendering failed" in r.message for r in caplog.records)
        assert not (tmp_path / "lost.png").exists()
        written = renderer(opened.bundle / f"{opened.bundle.name}.mrb", tmp_path / "views.png")()
        assert renderer._child is started  # the same process
    assert written == tmp_path / "views.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
