"""Known causes in explain bundles, as 3D Slicer's own libraries (slicer-core) load them.

A tiny known-cause set (two synthetic scans, five nodules: spicules alone, calcification alone, both, and a vessel
alone, which a bundle does not show) and a checkpoint of the hand-built soft-tissue ViT of
tests/test_explain_pipeline.py whose training manifest is that set. A single-scan run and a cohort run write
bundles; Slicer's scene reader opens them, and each nodule that carries a sign has one segment ``cause: <sign>``
in the segmentation *Known causes*, non-empty, whose voxels lie in the cause mask the manifest names for it (on
the crop grid, dilated by one voxel); the nodules without the sign have none, and the nodules' own segmentation
is the file it would be without causes, byte for byte.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from ctcdam.export import naming
from ctcdam.export.bundle import write_bundle
from ctcdam.export.colors import CAUSE_COLORS
from ctcdam.export.scene import CAUSES_SEGMENTATION, NODULES_SEGMENTATION
from ctcdam.export.slicer_render import SlicerSession, slicer_available
from ctcdam.targets import TARGETS
from tests.test_explain_pipeline import SOFT_TISSUE_WINDOW, soft_tissue_vit
from tests.test_slicer_bundle import segment_voxels_ras

SCANS = ("LIDC-IDRI-0407", "LIDC-IDRI-0237")
#: The bundle's causes and the manifest columns that say whether a nodule carries them.
SIGNS = {"spicules": "sign_spicules", "calcification": "sign_calcified"}

pytestmark = pytest.mark.usefixtures("one_thread")
needs_slicer = pytest.mark.skipif(
    not slicer_available(), reason="3D Slicer's libraries are not installed (`make test` installs slicer-core)")


@pytest.fixture(scope="module")
def known_cause_set(tmp_path_factory):
    from ctcdam.manifest.schema import read_manifest
    from ctcdam.workflows.known_cause import known_cause_data

    data = known_cause_data(tmp_path_factory.mktemp("cause-segments-cache"), scans=SCANS, seed=0, workers=1)
    return data, read_manifest(data.manifest)


@pytest.fixture(scope="module")
def cause_checkpoint(known_cause_set, tmp_path_factory) -> Path:
    """The soft-tissue ViT as a checkpoint trained on the known-cause set (its manifest and DICOM root)."""
    from ctcdam.data.labels import BiomarkerScaler
    from ctcdam.data.transforms import InputConfig
    from ctcdam.manifest.schema import biomarker_matrix
    from ctcdam.models.checkpoint import checkpoint_record

    data, frame = known_cause_set
    input_config = InputConfig(img_size=32, window=SOFT_TISSUE_WINDOW)
    config = {"backbone": "vit_tiny_patch16_224", "img_size": 32, **input_config.to_dict(),
              "model_kwargs": {"patch_size": 2, "embed_dim": 4, "depth": 1, "num_heads": 1},
              "crop_shape": [32, 32, 32], "crop_mm": [32.0] * 3, "spacing_mm": [1.0] * 3,
              "views": ["axial", "coronal", "sagittal"], "targets": list(TARGETS), "finetune": "full",
              "weights": "none"}
    record = checkpoint_record(config, BiomarkerScaler.fit(biomarker_matrix(frame)), {
        "manifest": str(data.manifest.resolve()), "lidc_root": str(data.lidc_root.resolve()), "fold": 0, "seed": 0,
        "train_ids": frame["nodule_id"].tolist(), "val_ids": [], "test_ids": []})
    model = soft_tissue_vit(input_config)
    path = tmp_path_factory.mktemp("cause-model") / "soft-tissue-known-cause.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "ctcdam": record}, path)
    return path


@pytest.fixture(scope="module")
def bundles(cause_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Bundles by kind: ``single`` (pipelines/explain.py --scan LIDC-IDRI-0407) and the cohort's, by scan id."""
    from ctcdam.workflows.explain_cohort import run_cohort
    from ctcdam.workflows.explain_run import run_explain

    small = {"targets": ("malignancy",), "volume": False}
    single = run_explain(SCANS[0], tmp_path_factory.mktemp("single"), checkpoint=cause_checkpoint, **small).bundle
    cohort = tmp_path_factory.mktemp("cohort")
    with pytest.MonkeyPatch.context() as patch:
        # The single run's views.png already renders a scene with causes; the cohort's two would only cost time.
        patch.setattr("ctcdam.export.views_renderer.rendering_problem", lambda: "not rendered in this test")
        outcome = run_cohort(cohort, scans=list(SCANS), checkpoint=cause_checkpoint, workers=0, **small)
    assert outcome.scans_ok == len(SCANS)
    return {"single": single, **{scan: cohort / scan for scan in SCANS}}


def _expected(frame, scan_id: str) -> set[tuple[str, str]]:
    """(segment name, nodule id) of every cause the manifest says a nodule of the scan carries."""
    rows = frame[frame["scan_id"] == scan_id].to_dict("records")
    return {(f"cause: {cause}", row["nodule_id"]) for row in rows for cause, column in SIGNS.items() if row[column]}


def _tag(segment, key: str) -> str | None:
    """A segment's tag as Slicer read it (None when it has none)."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _segment_points_lps(segmentation, segment_id: str) -> np.ndarray:
    """LPS positions of a segment's voxels in Slicer's own labelmap."""
    return segment_voxels_ras(segmentation, segment_id) * np.array([-1.0, -1.0, 1.0])


def _inside_dilated(points_lps: np.ndarray, mask_file: Path) -> np.ndarray:
    """Whether each point falls in a crop-grid mask dilated by one voxel (26-neighbourhood)."""
    mask = sitk.ReadImage(str(mask_file))
    dilated = ndimage.binary_dilation(sitk.GetArrayFromImage(mask) > 0, np.ones((3, 3, 3), dtype=bool))
    index = np.array([np.round(mask.TransformPhysicalPointToContinuousIndex(p.tolist())) for p in points_lps], int)
    inside = np.all((index >= 0) & (index < np.array(mask.GetSize())), axis=1)
    hits = np.zeros(len(points_lps), dtype=bool)
    x, y, z = index[inside].T
    hits[inside] = dilated[z, y, x]
    return hits


def _check_cause_segments(session: SlicerSession, bundle: Path, known_cause_set) -> None:
    data, frame = known_cause_set
    scene = session.scene
    assert not [m for m in session.messages() if "rror" in m], session.messages()
    nodes = {scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode").GetName(): scene.GetNthNodeByClass(
        i, "vtkMRMLSegmentationNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))}
    assert set(nodes) == {NODULES_SEGMENTATION, CAUSES_SEGMENTATION}
    predictions = json.loads((bundle / naming.PREDICTIONS_FILE).read_text())
    assert nodes[NODULES_SEGMENTATION].GetSegmentation().GetNumberOfSegments() == len(predictions["nodules"])
    causes = nodes[CAUSES_SEGMENTATION].GetSegmentation()
    rows = {row["nodule_id"]: row for row in frame.to_dict("records")}
    index_of = {n["nodule_id"]: n["index"] for n in predictions["nodules"]}
    found = set()
    for k in range(causes.GetNumberOfSegments()):
        segment_id = causes.GetNthSegmentID(k)
        segment = causes.GetSegment(segment_id)
        nodule_id, cause = _tag(segment, "nodule_id"), segment.GetName().removeprefix("cause: ")
        found.add((segment.GetName(), nodule_id))
        assert segment_id == f"cause_{cause}_{index_of[nodule_id]}"
        assert _tag(segment, "nodule") == f"Nodule {index_of[nodule_id]}"
        assert np.allclose(segment.GetColor(), CAUSE_COLORS[cause], atol=1e-5)
        points = _segment_points_lps(causes, segment_id)
        assert len(points) > 0, segment_id
        inside = _inside_dilated(points, data.manifest.parent / rows[nodule_id][f"cause_{cause}_path"])
        assert inside.all(), f"{segment_id}: {int((~inside).sum())} of {len(points)} voxels off its cause mask"
    assert found == _expected(frame, bundle.name)
    assert len(found) == causes.GetNumberOfSegments()  # one segment per nodule and sign


@needs_slicer
def test_single_scan_bundle_shows_the_causes_in_slicer(bundles, known_cause_set, tmp_path):
    bundle = bundles["single"]
    _, frame = known_cause_set
    # LIDC-IDRI-0407: one nodule with a vessel only (no segment), one calcified, one with spicules and calcification.
    assert {name for name, _ in _expected(frame, SCANS[0])} == {"cause: spicules", "cause: calcification"}
    scene = ET.parse(bundle / f"{bundle.name}.mrml").getroot()
    with SlicerSession() as session:
        session.open_bundle(bundle / f"{bundle.name}.mrb", tmp_path / "unpacked")
        _check_cause_segments(session, bundle, known_cause_set)
        # Every attribute of the causes' nodes is one Slicer keeps (its own XML of the scene after loading); the
        # references come back as Slicer's "role:id" list.
        kept = {node.get("id"): node for node in ET.fromstring(session.scene_xml())}
        for node in (e for e in scene if e.get("id", "").endswith("Node2") and "Segmentation" in e.tag):
            theirs = kept[node.get("id")]
            references = dict(item.split(":", 1) for item in (theirs.get("references") or "").split(";") if item)
            for key, value in node.attrib.items():
                role = {"storageNodeRef": "storage", "displayNodeRef": "display"}.get(key)
                assert (references.get(role) if role else theirs.get(key)) == value, (node.get("id"), key)
    assert [e.get("fileName") for e in scene if e.tag == "SegmentationStorage"] == [
        naming.SEGMENTATION_FILE, naming.CAUSES_SEGMENTATION_FILE]
    assert naming.CAUSES_SEGMENTATION_FILE in (bundle / naming.REVIEW_SCRIPT_FILE).read_text()


@needs_slicer
def test_cohort_bundles_show_the_causes_as_the_desktop_reader_loads_them(bundles, known_cause_set, tmp_path):
    for scan_id in SCANS:
        bundle = bundles[scan_id]
        with SlicerSession() as session:
            session.read_bundle(bundle / f"{bundle.name}.mrb", tmp_path / scan_id)
            _check_cause_segments(session, bundle, known_cause_set)
        record = json.loads((bundle / "bundle.json").read_text())
        assert record["settings"]["known_causes"] == ["spicules", "calcification"]
    # The cohort's bundle of a scan and the single-scan run's show the same causes, voxel for voxel.
    assert (bundles[SCANS[0]] / naming.CAUSES_SEGMENTATION_FILE).read_bytes() == (
        bundles["single"] / naming.CAUSES_SEGMENTATION_FILE).read_bytes()


def test_without_causes_the_bundle_is_as_before(known_cause_set, cause_checkpoint, tmp_path):
    """The causes add a file and two scene nodes; the nodules' segmentation does not change by a byte."""
    from ctcdam.models.checkpoint import load_for_inference
    from ctcdam.workflows.explain_scan import ExplainSettings, explain_scan

    data, _ = known_cause_set
    loaded = load_for_inference(cause_checkpoint)
    result = explain_scan(SCANS[1], loaded, data.lidc_root, ExplainSettings(targets=("malignancy",), volume=False))
    assert any(n.causes for n in result.nodules)
    plain = replace(result, nodules=tuple(replace(n, causes={}) for n in result.nodules))
    def no_views(*_: object):  # views.png is not what is compared here
        return lambda: None

    with_causes = write_bundle(result, tmp_path / "with", views=no_views)
    without = write_bundle(plain, tmp_path / "without", views=no_views)
    assert (with_causes / naming.SEGMENTATION_FILE).read_bytes() == (without / naming.SEGMENTATION_FILE).read_bytes()
    assert not (without / naming.CAUSES_SEGMENTATION_FILE).exists()
    scene = (without / f"{without.name}.mrml").read_text()
    assert CAUSES_SEGMENTATION not in scene and "vtkMRMLSegmentationNode2" not in scene
    # The scene with causes is the one without plus the causes' three nodes.
    ours = {e.get("id") for e in ET.parse(with_causes / f"{with_causes.name}.mrml").getroot()}
    theirs = {e.get("id") for e in ET.parse(without / f"{without.name}.mrml").getroot()}
    assert ours - theirs == {"vtkMRMLSegmentationStorageNode2", "vtkMRMLSegmentationDisplayNode2",
                             "vtkMRMLSegmentationNode2"} and theirs <= ours


def test_review_script_loads_the_causes_as_a_second_segmentation(tmp_path, monkeypatch):
    """review.py (Slicer's Python, through slicer.util) loads the causes beside the nodules, outlined the same way."""

    from ctcdam.export.review_script import review_script
    from ctcdam.export.scene import SceneSpec
    from tests.test_export import run_review_script

    spec = SceneSpec(ct_file=naming.CT_FILE, color_table_file=naming.COLOR_TABLE_FILE,
                     segmentation_file=naming.SEGMENTATION_FILE,
                     causes_segmentation_file=naming.CAUSES_SEGMENTATION_FILE, focus_lps=(1.0, 2.0, 3.0))
    calls = run_review_script(review_script(spec), tmp_path, monkeypatch)
    loaded = [args for name, args, _ in calls if name == "util.loadSegmentation"]
    assert loaded == [(str(tmp_path / naming.SEGMENTATION_FILE), {"name": NODULES_SEGMENTATION}),
                      (str(tmp_path / naming.CAUSES_SEGMENTATION_FILE), {"name": CAUSES_SEGMENTATION})]
    assert [args for name, args, _ in calls if name.endswith("SetVisibility2DFill")] == [(False,), (False,)]
