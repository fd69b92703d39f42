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

from ctcdam.export import naming
from ctcdam.export.colors import write_color_table
from ctcdam.export.markups import Fiducial, write_fiducials
from ctcdam.export.review_script import review_script
from ctcdam.export.scene import MapVolume, SceneSpec, write_scene, write_scene_bundle
from ctcdam.export.segmentation import Segment, write_segmentation
from ctcdam.targets import TARGETS, VIEWS

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


def test_colour_table_is_diverging_with_transparent_zero(tmp_path):
    path = write_color_table(tmp_path / naming.COLOR_TABLE_FILE)
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 256 and [int(r[0]) for r in rows] == list(range(256))
    rgba = np.array([[int(v) for v in r[2:]] for r in rows])
    assert rgba[127, 3] == 0 and rgba[128, 3] == 0  # where Slicer's symmetric window puts 0
    assert rgba[0, 3] == 255 and rgba[255, 3] == 255
    assert rgba[0, 2] > rgba[0, 0] and rgba[255, 0] > rgba[255, 2]  # blue negative end, red positive end


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


def test_review_script_loads_the_bundle_through_slicer_util(tmp_path, monkeypatch):
    import types

    spec = SceneSpec(ct_file="ct.nii.gz", color_table_file=naming.COLOR_TABLE_FILE,
                     maps=(MapVolume("N1 CDAM malignancy", "nodule-1/cdam_malignancy.nii.gz", 0.25),),
                     foreground_file="nodule-1/cdam_malignancy.nii.gz", segmentation_file=naming.SEGMENTATION_FILE,
                     markups_file=naming.MARKUPS_FILE)
    calls: list = []
    slicer = types.ModuleType("slicer")
    slicer.util = _Recorder(calls, "util")
    slicer.modules = types.SimpleNamespace(markups=_Recorder(calls, "markups"))
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setattr(sys, "argv", ["review.py", str(tmp_path)])
    exec(compile(review_script(spec, (-12.5, 30.25, -200.0)), "review.py", "exec"), {"__name__": "__main__"})
    loaded = [(name, args[0]) for name, args, _ in calls if name.startswith("util.load") and "()" not in name]
    assert loaded == [("util.loadVolume", str(tmp_path / "ct.nii.gz")),
                      ("util.loadColorTable", str(tmp_path / naming.COLOR_TABLE_FILE)),
                      ("util.loadVolume", str(tmp_path / "nodule-1/cdam_malignancy.nii.gz")),
                      ("util.loadSegmentation", str(tmp_path / naming.SEGMENTATION_FILE)),
                      ("util.loadMarkups", str(tmp_path / naming.MARKUPS_FILE))]
    windows = [args for name, args, _ in calls if name.endswith("SetWindowLevel")]
    assert windows == [(1500.0, -600.0), (0.5, 0.0)]
    layers = next(kwargs for name, _, kwargs in calls if name == "util.setSliceViewerLayers")
    assert layers["foregroundOpacity"] == 0.5 and layers["fit"] is True
    jump = next(args for name, args, _ in calls if name.endswith("JumpSlicesToLocation"))
    assert jump == (12.5, -30.25, -200.0, True)  # LPS -> RAS


def test_defaults_newest_checkpoint_and_recorded_data_root(tmp_path):
    from ctcdam.export.paths import newest_checkpoint
    from ctcdam.export.run import default_lidc_root

    with pytest.raises(FileNotFoundError, match="train one with"):
        newest_checkpoint(tmp_path / "train")
    older, newer = tmp_path / "train" / "a" / "best.ckpt", tmp_path / "train" / "b" / "fold-0" / "best.ckpt"
    for age, path in ((100, older), (0, newer)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (path.stat().st_mtime - age,) * 2)
    assert newest_checkpoint(tmp_path / "train") == newer
    assert default_lidc_root({"lidc_root": "/data/LIDC-IDRI"}, newer) == Path("/data/LIDC-IDRI")
    with pytest.raises(ValueError, match="pass --lidc-root"):
        default_lidc_root({"lidc_root": None, "manifest": str(tmp_path / "m" / "manifest.csv")}, newer)
