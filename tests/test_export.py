"""The Slicer writers of ctcdam.export, each read back with an independent reader (SimpleITK, json, xml, zipfile)."""
from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctcdam.data.views import VIEWS
from ctcdam.export import naming
from ctcdam.export.colors import TRANSPARENT_BAND, nodule_color, write_color_table
from ctcdam.export.markups import Fiducial, write_fiducials
from ctcdam.export.report import relevant_maps, write_report
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.export.review_script import review_script
from ctcdam.export.scene import MapVolume, SceneSpec, scene_document, write_scene, write_scene_bundle
from ctcdam.export.segmentation import Segment, write_segmentation
from ctcdam.export.table import write_predictions_table
from ctcdam.targets import MALIGNANCY, TARGETS

# Slicer's label-map name rules, copied here from qSlicerVolumesIOOptionsWidget.cxx (not imported from the writer).
SLICER_LABEL_REGEXES = [re.compile(r"(\b|_)([Ll]abel(s)?)(\b|_)"), re.compile(r"(\b|_)([Ss]eg)(\b|_)")]


def _slicer_would_load_as_labelmap(file_name: str) -> bool:
    base = Path(file_name).name.removesuffix(".gz").removesuffix(".nii")
    return any(r.search(base) for r in SLICER_LABEL_REGEXES)


def _ct(size=(40, 36, 12), spacing=(0.7, 0.7, 2.5), origin=(-170.0, -150.0, -300.0)) -> sitk.Image:
    ct = sitk.Image(size, sitk.sitkInt16)
    ct.SetSpacing(spacing)
    ct.SetOrigin(origin)
    return ct


def _sphere_mask_on_crop(centre_lps, radius_mm: float, size: int = 16) -> sitk.Image:
    """A 1 mm crop grid centred on centre_lps with a sphere of radius_mm set to 1."""
    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetOrigin(tuple(np.asarray(centre_lps) - (size - 1) / 2.0))
    z, y, x = np.mgrid[0:size, 0:size, 0:size]
    inside = (x - (size - 1) / 2) ** 2 + (y - (size - 1) / 2) ** 2 + (z - (size - 1) / 2) ** 2 <= radius_mm**2
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(grid)
    return mask


def test_heat_map_names_are_never_label_maps_for_slicer():
    names = [naming.map_file(k, t, v) for k in (1, 12) for t in TARGETS for v in (None, *VIEWS)]
    names += [naming.map_file(1, naming.concept_map_name(q)) for q in ("spiculation>=4", "seg==1", "label<2.5")]
    assert not [n for n in names if _slicer_would_load_as_labelmap(n)]
    assert naming.concept_map_name("spiculation>=4") == "concept_spiculation_ge_4"
    # The rule itself recognises what Slicer would flag.
    assert naming.looks_like_labelmap("nodule_seg.nii.gz") and naming.looks_like_labelmap("x_labels.nii.gz")
    with pytest.raises(ValueError, match="label map"):
        naming.map_file(1, "label")


def test_segmentation_lands_on_ct_subgrid_with_slicer_header(tmp_path):
    ct = _ct()
    centres = [ct.TransformContinuousIndexToPhysicalPoint((10.0, 12.0, 4.0)),
               ct.TransformContinuousIndexToPhysicalPoint((30.0, 20.0, 7.0))]
    segments = [Segment(f"nodule_{k}", f"Nodule {k}", (1.0, 0.5, 0.0), _sphere_mask_on_crop(c, 3.5),
                        {"pred_malignancy": "0.83", "radiologists_malignancy": "4"})
                for k, c in enumerate(centres, start=1)]
    path = write_segmentation(segments, ct, tmp_path / naming.SEGMENTATION_FILE)

    seg = sitk.ReadImage(str(path))
    assert np.allclose(seg.GetSpacing(), ct.GetSpacing()) and np.allclose(seg.GetDirection(), ct.GetDirection())
    offset = [int(v) for v in seg.GetMetaData("Segmentation_ReferenceImageExtentOffset").split()]
    # The file's origin is the CT voxel named by the offset: Slicer places it there.
    assert np.allclose(seg.GetOrigin(), ct.TransformIndexToPhysicalPoint(offset), atol=1e-4)
    values = sitk.GetArrayFromImage(seg)
    for k, centre in enumerate(centres):
        assert seg.GetMetaData(f"Segment{k}_Name") == f"Nodule {k + 1}"
        assert seg.GetMetaData(f"Segment{k}_Tags") == "pred_malignancy:0.83|radiologists_malignancy:4|"
        label = int(seg.GetMetaData(f"Segment{k}_LabelValue"))
        voxels = np.argwhere(values == label)[:, ::-1]  # (x, y, z) file indices
        extent = [int(v) for v in seg.GetMetaData(f"Segment{k}_Extent").split()]
        assert extent == [int(voxels[:, 0].min()), int(voxels[:, 0].max()), int(voxels[:, 1].min()),
                          int(voxels[:, 1].max()), int(voxels[:, 2].min()), int(voxels[:, 2].max())]
        points = np.array([seg.TransformIndexToPhysicalPoint([int(i) for i in v]) for v in voxels])
        assert np.linalg.norm(points - centre, axis=1).max() <= 3.5 + 0.5  # inside the sphere (nearest-neighbour)
        assert np.linalg.norm(points.mean(axis=0) - centre) < 0.5
    header = path.read_bytes()[:4000].decode("latin-1")
    assert "Segment0_ID:=nodule_1" in header and "space: left-posterior-superior" in header


def test_colour_table_is_diverging_with_a_transparent_band_and_no_pale_entries(tmp_path):
    path = write_color_table(tmp_path / naming.COLOR_TABLE_FILE)
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 256 and [int(r[0]) for r in rows] == list(range(256))
    rgba = np.array([[int(v) for v in r[2:]] for r in rows])
    # Entry i shows v = (i - 127.5) / 127.5 * max|v| under the symmetric window.
    fraction = (np.arange(256) - 127.5) / 127.5
    # Slicer draws any alpha > 0 fully opaque: alpha is all or nothing, 0 exactly inside the band.
    assert set(rgba[:, 3]) == {0, 255}
    assert np.array_equal(rgba[:, 3] == 0, np.abs(fraction) <= TRANSPARENT_BAND)
    visible = rgba[rgba[:, 3] == 255]
    assert (visible[:, :3].max(axis=1) - visible[:, :3].min(axis=1)).min() >= 60  # clearly coloured, never whitish
    positive, negative = rgba[fraction > TRANSPARENT_BAND], rgba[fraction < -TRANSPARENT_BAND]
    assert (positive[:, 0] > positive[:, 2] + 60).all() and (negative[:, 2] > negative[:, 0] + 60).all()


def test_nodule_colours_are_distinct_for_any_count_and_never_red_or_blue():
    import colorsys

    colours = [nodule_color(k) for k in range(1, 201)]
    assert len(set(colours)) == 200
    first = np.array(colours[:20])
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)[np.triu_indices(20, 1)]
    assert distances.min() > 0.15  # the first 20 stay far apart, not only different
    hues = [colorsys.rgb_to_hsv(*c)[0] for c in colours]
    assert all(0.05 < h < 0.55 or 0.72 < h < 0.9 for h in hues)  # the maps' red and blue stay theirs


def test_segmentation_names_the_whole_ct_as_its_reference_geometry(tmp_path):
    ct = _ct(origin=(-170.0, -150.0, -300.0))
    mask = _sphere_mask_on_crop(ct.TransformContinuousIndexToPhysicalPoint((10.0, 12.0, 4.0)), 3.0)
    path = write_segmentation([Segment("nodule_1", "Nodule 1", (1.0, 0.5, 0.0), mask)], ct,
                              tmp_path / naming.SEGMENTATION_FILE)
    parameters = sitk.ReadImage(str(path)).GetMetaData("Segmentation_ConversionParameters")
    entries = {p.split("|")[0]: p.split("|")[1] for p in parameters.split("&") if p}
    values = [float(v) for v in entries["Reference image geometry"].rstrip(";").split(";")]
    # IJK -> RAS of the whole CT (LPS from SimpleITK, x and y negated), then the CT's full extent.
    expected = np.eye(4)
    expected[:3, :3] = np.diag(ct.GetSpacing()) * np.array([-1.0, -1.0, 1.0])[:, None]
    expected[:3, 3] = np.array(ct.GetOrigin()) * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(values[:16], expected.reshape(-1))
    assert values[16:] == [0, 39, 0, 35, 0, 11]


def test_scene_opens_on_the_focus_with_outlines_only(tmp_path):
    focus = (-12.5, 30.25, -200.0)
    spec = SceneSpec(ct_file="ct.nii.gz", color_table_file=naming.COLOR_TABLE_FILE,
                     maps=(MapVolume("N1 CDAM malignancy", "nodule-1/cdam_malignancy.nii.gz", 0.25),),
                     foreground_file="nodule-1/cdam_malignancy.nii.gz", segmentation_file=naming.SEGMENTATION_FILE,
                     markups_file=naming.MARKUPS_FILE, table_file=naming.PREDICTIONS_TABLE_FILE, focus_lps=focus,
                     field_of_view_mm=60.0, axis_spacing_mm=(0.7, 0.7, 2.5))
    nodes = {node.get("id"): node for node in scene_document(spec).getroot()}
    rotations = {"Red": [-1, 0, 0, 0, 1, 0, 0, 0, 1], "Yellow": [0, 0, -1, -1, 0, 0, 0, 1, 0],
                 "Green": [-1, 0, 0, 0, 0, 1, 0, 1, 0]}
    for view, depth in (("Red", 2.5), ("Yellow", 0.7), ("Green", 0.7)):
        matrix = np.array(nodes[f"vtkMRMLSliceNode{view}"].get("sliceToRAS").split(), dtype=float).reshape(4, 4)
        np.testing.assert_allclose(matrix[:3, :3].reshape(-1), rotations[view])
        np.testing.assert_allclose(matrix[:3, 3], (12.5, -30.25, -200.0))  # LPS -> RAS
        assert [float(v) for v in nodes[f"vtkMRMLSliceNode{view}"].get("fieldOfView").split()] == [60.0, 60.0, depth]
    display = nodes["vtkMRMLSegmentationDisplayNode1"].attrib
    # The names vtkMRMLSegmentationDisplayNode::ReadXMLAttributes reads (capital first letter).
    assert display["Visibility2DFill"] == "false" and display["Visibility2DOutline"] == "true"
    assert float(display["Opacity2DOutline"]) == 1.0
    markers = nodes["vtkMRMLMarkupsFiducialDisplayNode1"].attrib
    assert markers["color"] == markers["selectedColor"] == "1 1 0" and float(markers["glyphScale"]) == 2.0
    assert nodes["vtkMRMLTableStorageNode1"].get("fileName") == naming.PREDICTIONS_TABLE_FILE


def _report_scan(n_nodules: int = 2) -> ScanResult:
    ct = _ct(size=(60, 60, 24), spacing=(1.0, 1.0, 2.0))
    nodules = []
    for k in range(1, n_nodules + 1):
        centre = ct.TransformContinuousIndexToPhysicalPoint((15.0 * k, 30.0, 12.0))
        mask = _sphere_mask_on_crop(centre, 4.0, size=32)
        crop = sitk.Cast(mask * 900 - 850, sitk.sitkInt16)
        values = sitk.GetArrayFromImage(mask).astype(np.float32) - 0.3
        maps = {}
        for target in TARGETS:
            image = sitk.GetImageFromArray(values)
            image.CopyInformation(mask)
            maps[target] = image
        nodules.append(NoduleResult(
            index=k, nodule_id=f"LIDC-IDRI-0001-n{k}", centroid_lps=tuple(centre), in_training_population=k == 1,
            predictions={t: 0.5 for t in TARGETS}, radiologists={t: 3.0 for t in TARGETS},
            model_outputs={t: float(j) for j, t in enumerate(TARGETS)}, crop=crop, consensus_mask=mask, maps=maps))
    return ScanResult(scan_id="LIDC-IDRI-0001", checkpoint="x.ckpt", method="cdam", ct=ct, nodules=tuple(nodules))


def test_report_is_an_overview_and_one_readable_page_per_nodule(tmp_path):
    from PIL import Image

    scan = _report_scan(2)
    pages = {n.index: tmp_path / naming.nodule_report_file(n.index) for n in scan.nodules}
    written = write_report(scan, tmp_path / naming.REPORT_FILE, pages)
    assert written == [tmp_path / naming.REPORT_FILE, *pages.values()]
    for path in written:
        width, height = Image.open(path).size
        assert width <= 1400 and height <= 1400, f"{path.name} is {width} x {height} px"  # readable at 100 %
    # The overview names each nodule's page; a page shows CT + malignancy + the two most unusual biomarkers.
    assert relevant_maps(scan.nodules[0]) == [MALIGNANCY, "diameter", "sphericity"]


def test_predictions_table_is_one_row_per_nodule_and_target(tmp_path):
    scan = _report_scan(2)
    path = write_predictions_table(scan.nodules, tmp_path / naming.PREDICTIONS_TABLE_FILE)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["nodule", "nodule_id", "target", "model", "radiologists", "labelled"]
    assert len(lines) == 1 + 2 * len(TARGETS)
    assert lines[1].split("\t") == ["Nodule 1", "LIDC-IDRI-0001-n1", "p(malignancy)", "0.5", "3", "true"]


def test_markups_follow_the_schema_slicer_reads(tmp_path):
    path = write_fiducials([Fiducial("1", "N1 p(malig)=0.83", "nodule 1", (-12.5, 30.25, -200.0))],
                           tmp_path / naming.MARKUPS_FILE)
    document = json.loads(path.read_text())
    assert re.match(r".*markups-schema-v1\.[0-9]+\.[0-9]+\.json#*$", document["@schema"], re.IGNORECASE)
    markup = document["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    assert markup["controlPoints"][0]["position"] == [-12.5, 30.25, -200.0]


def test_scene_names_only_files_inside_the_bundle(tmp_path):
    for name in ("ct.nii.gz", "nodule-1/cdam_malignancy.nii.gz", naming.SEGMENTATION_FILE, naming.MARKUPS_FILE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    write_color_table(tmp_path / naming.COLOR_TABLE_FILE)
    spec = SceneSpec(ct_file="ct.nii.gz", color_table_file=naming.COLOR_TABLE_FILE,
                     maps=(MapVolume("N1 CDAM malignancy", "nodule-1/cdam_malignancy.nii.gz", 0.25),),
                     foreground_file="nodule-1/cdam_malignancy.nii.gz", segmentation_file=naming.SEGMENTATION_FILE,
                     markups_file=naming.MARKUPS_FILE)
    scene_file = write_scene(spec, tmp_path / "LIDC-IDRI-0001.mrml")
    mrb = write_scene_bundle(scene_file, spec.files(), tmp_path / "LIDC-IDRI-0001.mrb")

    root = ET.parse(scene_file).getroot()
    named = {node.get("fileName") for node in root.iter() if node.get("fileName")}
    assert named == set(spec.files())
    with zipfile.ZipFile(mrb) as archive:
        members = set(archive.namelist())
    assert "LIDC-IDRI-0001/LIDC-IDRI-0001.mrml" in members
    assert {f"LIDC-IDRI-0001/{name}" for name in named} <= members
    nodes = {node.get("id"): node for node in root}
    red = nodes["vtkMRMLSliceCompositeNodeRed"]
    foreground = nodes[red.get("foregroundVolumeID")]
    display = nodes[foreground.get("displayNodeRef")]
    assert float(display.get("level")) == 0.0 and float(display.get("window")) == pytest.approx(0.5)
    assert float(red.get("foregroundOpacity")) == pytest.approx(0.5)
    assert nodes[display.get("colorNodeID")].tag == "ColorTable"
    compile(review_script(spec, (-12.5, 30.25, -200.0)), "review.py", "exec")


class _Recorder:
    """Stands in for Slicer's nodes (Slicer is not installed here): records every call made on it."""

    def __init__(self, log: list, name: str):
        self._log, self._name = log, name

    def __getattr__(self, attribute):
        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attribute}", args, kwargs))
            return _Recorder(self._log, f"{self._name}.{attribute}()")

        return call

    def __getitem__(self, index):
        return 1.0  # e.g. a field of view's third component


def run_review_script(script: str, bundle: Path, monkeypatch) -> list:
    """Run a bundle's review.py against recording stand-ins for Slicer's modules; the calls it made."""
    import types

    calls: list = []
    slicer = types.ModuleType("slicer")
    slicer.util = _Recorder(calls, "util")
    slicer.modules = types.SimpleNamespace(markups=_Recorder(calls, "markups"))
    slicer.mrmlScene = _Recorder(calls, "mrmlScene")
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setattr(sys, "argv", ["review.py", str(bundle)])
    exec(compile(script, "review.py", "exec"), {"__name__": "__main__"})
    return calls


def test_review_script_loads_the_bundle_through_slicer_util(tmp_path, monkeypatch):
    spec = SceneSpec(ct_file="ct.nii.gz", color_table_file=naming.COLOR_TABLE_FILE,
                     maps=(MapVolume("N1 CDAM malignancy", "nodule-1/cdam_malignancy.nii.gz", 0.25),),
                     foreground_file="nodule-1/cdam_malignancy.nii.gz", segmentation_file=naming.SEGMENTATION_FILE,
                     markups_file=naming.MARKUPS_FILE, table_file=naming.PREDICTIONS_TABLE_FILE,
                     field_of_view_mm=60.0)
    calls = run_review_script(review_script(spec, (-12.5, 30.25, -200.0)), tmp_path, monkeypatch)
    loaded = [(name, args[0]) for name, args, _ in calls if name.startswith("util.load") and "()" not in name]
    assert loaded == [("util.loadVolume", str(tmp_path / "ct.nii.gz")),
                      ("util.loadColorTable", str(tmp_path / naming.COLOR_TABLE_FILE)),
                      ("util.loadVolume", str(tmp_path / "nodule-1/cdam_malignancy.nii.gz")),
                      ("util.loadSegmentation", str(tmp_path / naming.SEGMENTATION_FILE)),
                      ("util.loadMarkups", str(tmp_path / naming.MARKUPS_FILE)),
                      ("util.loadTable", str(tmp_path / naming.PREDICTIONS_TABLE_FILE))]
    windows = [args for name, args, _ in calls if name.endswith("SetWindowLevel")]
    assert windows == [(1500.0, -600.0), (0.5, 0.0)]
    layers = next(kwargs for name, _, kwargs in calls if name == "util.setSliceViewerLayers")
    assert layers["foregroundOpacity"] == 0.5 and layers["fit"] is True
    jump = next(args for name, args, _ in calls if name.endswith("JumpSlicesToLocation"))
    assert jump == (12.5, -30.25, -200.0, True)  # LPS -> RAS
    assert [args[0] for name, args, _ in calls if name == "mrmlScene.GetNodeByID"] == [
        "vtkMRMLSliceNodeRed", "vtkMRMLSliceNodeYellow", "vtkMRMLSliceNodeGreen"]
    assert [args[:2] for name, args, _ in calls if name.endswith("SetFieldOfView")] == [(60.0, 60.0)] * 3
    assert [args for name, args, _ in calls if name.endswith("SetVisibility2DFill")] == [(False,)]


def test_defaults_newest_checkpoint_and_recorded_data_root(tmp_path):
    from ctcdam.workflows.sources import newest_checkpoint, recorded_lidc_root

    with pytest.raises(FileNotFoundError, match="train one with"):
        newest_checkpoint(tmp_path / "train")
    older, newer = tmp_path / "train" / "a" / "best.ckpt", tmp_path / "train" / "b" / "fold-0" / "best.ckpt"
    for age, path in ((100, older), (0, newer)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (path.stat().st_mtime - age,) * 2)
    assert newest_checkpoint(tmp_path / "train") == newer
    assert recorded_lidc_root({"lidc_root": "/data/LIDC-IDRI"}, newer) == Path("/data/LIDC-IDRI")
    with pytest.raises(ValueError, match="pass --lidc-root"):
        recorded_lidc_root({"lidc_root": None, "manifest": str(tmp_path / "m" / "manifest.csv")}, newer)
