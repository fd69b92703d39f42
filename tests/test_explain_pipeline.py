"""pipelines/explain.py end to end: the review bundle read back with SimpleITK, json, xml and zipfile only.

The model. A randomly initialised or briefly trained tiny ViT has no reason to look at the nodule, so where its
|CDAM| peaks would say nothing about the export's geometry. The tests use a purpose-built ViT instead, with
weights set by hand (:func:`soft_tissue_vit`): its outputs are increasing functions of the mean soft-tissue
content of the input slice, routed through the last block's attention values (uniform attention, value =
the token's soft-tissue feature), so the CDAM of a token is proportional to that token's soft tissue and is
zero on lung, air and padding (its HU window starts at lung density). In the crops of LIDC-IDRI-0237 (synthetic)
the nodule is the only soft tissue; the geometry test checks that premise from the bundle's own CT and
segmentation, and then that max |CDAM| and the |CDAM| centre of mass fall inside the consensus mask. A map
written at the wrong physical place (an axis flipped, grids mixed up, LPS read as RAS) would miss the mask; the
off-centre test (nodule 6 mm off the crop centre on every axis) catches flips that a centred nodule hides.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ctcdam.data.views import VIEWS
from ctcdam.targets import BIOMARKERS, TARGETS

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPLAIN_SCRIPT = REPO_ROOT / "pipelines" / "explain.py"
SCAN = "LIDC-IDRI-0237"  # synthetic_lidc: 2 nodules with >= 3 annotations and 1 with 2 (unlabelled)
CONCEPT = "malignancy>=3"
SLICER_LABEL_REGEXES = [re.compile(r"(\b|_)([Ll]abel(s)?)(\b|_)"), re.compile(r"(\b|_)([Ss]eg)(\b|_)")]


# ---------------------------------------------------------------------------------------------------------------
# the purpose-built model


SOFT_TISSUE_WINDOW = (-850.0, 400.0)  # lung, air and padding all clip to the window's floor


def soft_tissue_vit(input_config):
    """A 1-block timm ViT (2 px patches, width 4) whose 9 outputs grow with the slice's mean soft-tissue content.

    Patch embedding: feature 0 = the patch's mean input scaled so lung is 0 and 30 HU tissue is 1, features 1
    and 2 = +1 and -1 (so LayerNorm keeps feature 0's sign and order). Last block: zero keys (uniform
    attention), the value copies feature 0 of the norm1 tokens into channel 3 of the CLS token; MLP off. Head:
    output t reads the final-norm CLS channel 3 with weight 4 (1 + t / 10).
    """
    from ctcdam.data.transforms import to_model_input
    from ctcdam.models.backbone import build_vit

    model = build_vit("vit_tiny_patch16_224", 32, {"patch_size": 2, "embed_dim": 4, "depth": 1, "num_heads": 1})
    lung, tissue = (float(to_model_input(np.full((32, 32), hu), input_config).mean()) for hu in (-850.0, 30.0))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.norm):
            norm.weight.fill_(1.0)
        embed = model.patch_embed.proj
        embed.weight[0] = 1.0 / (embed.weight[0].numel() * (tissue - lung))
        embed.bias[:3] = torch.tensor([-lung / (tissue - lung), 1.0, -1.0])
        model.cls_token[0, 0] = torch.tensor([0.0, 1.0, -1.0, 0.0])
        attention = model.blocks[0].attn
        attention.qkv.weight[2 * 4 + 3, 0] = 1.0  # value channel 3 <- token feature 0; keys stay zero
        attention.proj.weight.copy_(torch.eye(4))
        model.head.weight[:, 3] = 4.0 * (1.0 + torch.arange(len(TARGETS)) / 10.0)
    return model.eval()


@pytest.fixture(scope="module")
def nodule_checkpoint(synthetic_lidc, synthetic_manifest, tmp_path_factory) -> Path:
    """A ctcdam checkpoint of the hand-built soft-tissue ViT, with the synthetic manifest as its training data."""
    from ctcdam.data.labels import BiomarkerScaler
    from ctcdam.data.transforms import InputConfig
    from ctcdam.manifest.schema import biomarker_matrix, read_manifest
    from ctcdam.models.checkpoint import checkpoint_record

    out_dir = Path(synthetic_manifest[0] if isinstance(synthetic_manifest, tuple) else synthetic_manifest)
    manifest = out_dir / "manifest.csv" if out_dir.is_dir() else out_dir
    frame = read_manifest(manifest)
    input_config = InputConfig(img_size=32, window=SOFT_TISSUE_WINDOW)
    model = soft_tissue_vit(input_config)
    config = {"backbone": "vit_tiny_patch16_224", "img_size": 32, **input_config.to_dict(),
              "model_kwargs": {"patch_size": 2, "embed_dim": 4, "depth": 1, "num_heads": 1},
              "crop_shape": [32, 32, 32], "crop_mm": [32.0] * 3, "spacing_mm": [1.0] * 3, "views": list(VIEWS),
              "targets": list(TARGETS), "finetune": "full", "weights": "none"}
    data = {"manifest": str(manifest.resolve()), "lidc_root": str(synthetic_lidc.root), "fold": 0, "seed": 0,
            "train_ids": frame["nodule_id"].tolist(), "val_ids": [], "test_ids": []}
    record = checkpoint_record(config, BiomarkerScaler.fit(biomarker_matrix(frame)), data)
    path = tmp_path_factory.mktemp("nodule-model") / "soft-tissue.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "ctcdam": record}, path)
    return path


def _cli_main():
    spec = importlib.util.spec_from_file_location("explain_cli", EXPLAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run_cli(args, timeout=180):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXPLAIN_SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def bundle(nodule_checkpoint, synthetic_lidc, tmp_path_factory) -> Path:
    """The review bundle of SCAN: all targets, three views, the 3D map and a concept map."""
    out = tmp_path_factory.mktemp("explain")
    status = _cli_main()(["--scan", SCAN, "--checkpoint", str(nodule_checkpoint), "--lidc-root",
                          str(synthetic_lidc.root), "--out", str(out), "--concept", CONCEPT])
    assert status == 0
    return out / SCAN


# ---------------------------------------------------------------------------------------------------------------
# independent readers


def _nifti_qform_and_sform(path: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(qform 4x4, sform 4x4, qform_code, sform_code) parsed from the 348-byte NIfTI-1 header with struct."""
    header = gzip.open(path).read(348) if path.suffix == ".gz" else path.read_bytes()[:348]
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    pixdim = struct.unpack(endian + "8f", header[76:108])
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    b, c, d, qx, qy, qz = struct.unpack(endian + "6f", header[256:280])
    srows = np.array(struct.unpack(endian + "12f", header[280:328])).reshape(3, 4)
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    qform = np.eye(4)
    qform[:3, :3] = rotation * np.array([pixdim[1], pixdim[2], qfac * pixdim[3]])
    qform[:3, 3] = (qx, qy, qz)
    sform = np.eye(4)
    sform[:3] = srows
    return qform, sform, qform_code, sform_code


def _segments(path: Path) -> tuple[sitk.Image, dict[int, dict[str, str]]]:
    """The segmentation image and, per segment number, its Slicer header fields."""
    image = sitk.ReadImage(str(path))
    fields: dict[int, dict[str, str]] = {}
    for key in image.GetMetaDataKeys():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = image.GetMetaData(key)
    return image, fields


def _inside_segment(seg: sitk.Image, label: int, point_lps) -> bool:
    index = seg.TransformPhysicalPointToIndex(tuple(float(v) for v in point_lps))
    if any(i < 0 or i >= n for i, n in zip(index, seg.GetSize())):
        return False
    return int(seg[index]) == label


def _peak_and_centre_of_mass(image: sitk.Image) -> tuple[tuple, tuple]:
    """Physical positions (LPS) of the max of |map| and of the |map|-weighted centre of mass."""
    weights = np.abs(sitk.GetArrayFromImage(image).astype(np.float64))
    peak_zyx = np.unravel_index(int(np.argmax(weights)), weights.shape)
    grid = np.indices(weights.shape).reshape(3, -1)
    centre_zyx = (grid * weights.reshape(-1)).sum(axis=1) / weights.sum()
    peak = image.TransformIndexToPhysicalPoint([int(v) for v in peak_zyx[::-1]])
    centre = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre_zyx[::-1]])
    return peak, centre


# ---------------------------------------------------------------------------------------------------------------
# the bundle


def test_bundle_geometry_read_back_with_simpleitk_only(bundle: Path, synthetic_lidc):
    predictions = json.loads((bundle / "predictions.json").read_text())
    assert predictions["scan_id"] == SCAN and predictions["method"] == "cdam"
    nodules = predictions["nodules"]
    assert len(nodules) == 3 and any(not n["labelled"] for n in nodules)  # the 2-annotation cluster too

    # The CT has the geometry of the DICOM series, read independently by SimpleITK's own series reader.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(synthetic_lidc.series_dirs[SCAN])))
    dicom = reader.Execute()
    ct = sitk.ReadImage(str(bundle / "ct.nii.gz"))
    assert ct.GetPixelID() == sitk.sitkInt16 and ct.GetSize() == dicom.GetSize()
    assert np.allclose(ct.GetOrigin(), dicom.GetOrigin(), atol=1e-3)
    assert np.allclose(ct.GetSpacing(), dicom.GetSpacing(), atol=1e-4)

    # Every NIfTI: qform == sform, both code 1 (Slicer's ITK and nibabel then agree on the position).
    niftis = sorted(bundle.rglob("*.nii.gz"))
    assert len(niftis) == 1 + len(nodules) * (len(TARGETS) + 1) * (1 + len(VIEWS))
    for path in niftis:
        qform, sform, qcode, scode = _nifti_qform_and_sform(path)
        assert (qcode, scode) == (1, 1), path
        assert np.allclose(qform, sform, atol=1e-3), path
    heat_maps = [p for p in niftis if p.name != "ct.nii.gz"]
    assert not [p for p in heat_maps if any(r.search(p.name.removesuffix(".nii.gz")) for r in SLICER_LABEL_REGEXES)]

    seg, fields = _segments(bundle / "nodules.seg.nrrd")
    offset = [int(v) for v in seg.GetMetaData("Segmentation_ReferenceImageExtentOffset").split()]
    assert np.allclose(seg.GetOrigin(), ct.TransformIndexToPhysicalPoint(offset), atol=1e-3)  # a CT sub-grid
    assert np.allclose(seg.GetSpacing(), ct.GetSpacing()) and np.allclose(seg.GetDirection(), ct.GetDirection())
    markups = json.loads((bundle / "nodules.mrk.json").read_text())["markups"][0]
    assert markups["coordinateSystem"] == "LPS"
    for k, nodule in enumerate(nodules):
        segment = fields[k]
        label = int(segment["LabelValue"])
        assert segment["Name"] == f"Nodule {nodule['index']}"
        assert f"pred_malignancy:{nodule['predictions']['malignancy']:.4g}|" in segment["Tags"]
        point = markups["controlPoints"][k]
        assert np.allclose(point["position"], nodule["centroid_lps"])
        assert f"p(malig)={nodule['predictions']['malignancy']:.2f}" in point["label"]
        assert _inside_segment(seg, label, point["position"]), f"centroid of {nodule['nodule_id']} outside its mask"

        heat = sitk.ReadImage(str(bundle / nodule["maps"]["malignancy"]))
        assert heat.GetPixelID() == sitk.sitkFloat32 and heat.GetSize() == (32, 32, 32)
        # Premise of the soft-tissue model: in this crop the nodule is the only soft tissue (beyond 2 mm of it).
        crop = sitk.GetArrayFromImage(sitk.Resample(ct, heat, sitk.Transform(), sitk.sitkLinear, -1024.0))
        mask = sitk.Resample(sitk.Cast(seg == label, sitk.sitkUInt8), heat, sitk.Transform(), sitk.sitkNearestNeighbor)
        near = sitk.GetArrayFromImage(sitk.BinaryDilate(mask, [2, 2, 2])) > 0
        assert ((crop > -400) & ~near).sum() < 0.05 * near.sum(), f"{nodule['nodule_id']}: other soft tissue in crop"
        assert np.abs(sitk.GetArrayFromImage(heat)).max() > 0
        peak, centre = _peak_and_centre_of_mass(heat)
        assert _inside_segment(seg, label, peak), f"max |CDAM| of {nodule['nodule_id']} at {peak}, outside its mask"
        assert _inside_segment(seg, label, centre), f"|CDAM| centre of mass of {nodule['nodule_id']} outside its mask"

        # The view maps are one-slice volumes on the crop grid's centre slices.
        for view, axis in zip(VIEWS, (2, 1, 0)):
            slab = sitk.ReadImage(str(bundle / nodule["view_maps"]["malignancy"][view]))
            size = list(heat.GetSize())
            size[axis] = 1
            assert list(slab.GetSize()) == size
            centre_index = [0, 0, 0]
            centre_index[axis] = 16
            assert np.allclose(slab.GetOrigin(), heat.TransformIndexToPhysicalPoint(centre_index), atol=1e-4)


def test_bundle_scene_markups_concept_and_report(bundle: Path):
    predictions = json.loads((bundle / "predictions.json").read_text())
    assert predictions["concept"]["query"] == CONCEPT and predictions["concept"]["training_examples"] >= 1
    for nodule in predictions["nodules"]:
        assert set(nodule["predictions"]) == set(TARGETS) and set(nodule["radiologists"]) == set(TARGETS)
        assert 0.0 <= nodule["predictions"]["malignancy"] <= 1.0
        assert set(nodule["maps"]) == {*TARGETS, "concept_malignancy_ge_3"}
        assert all((bundle / path).is_file() for path in nodule["maps"].values())
    labelled = [n for n in predictions["nodules"] if n["labelled"]]
    assert all(n["radiologists"]["malignancy"] is not None for n in labelled)
    assert all(isinstance(n["radiologists"][b], float) for n in labelled for b in BIOMARKERS)

    scene = ET.parse(bundle / f"{SCAN}.mrml").getroot()
    named = {node.get("fileName") for node in scene.iter() if node.get("fileName")}
    assert {"ct.nii.gz", "nodules.seg.nrrd", "nodules.mrk.json"} <= named
    with zipfile.ZipFile(bundle / f"{SCAN}.mrb") as archive:
        members = set(archive.namelist())
    assert f"{SCAN}/{SCAN}.mrml" in members
    assert all(not Path(name).is_absolute() and ".." not in Path(name).parts for name in named)
    assert {f"{SCAN}/{name}" for name in named} <= members
    nodes = {node.get("id"): node for node in scene}
    red = nodes["vtkMRMLSliceCompositeNodeRed"]
    foreground = nodes[red.get("foregroundVolumeID")]
    assert nodes[foreground.get("storageNodeRef")].get("fileName") == predictions["nodules"][0]["maps"]["malignancy"]
    display = nodes[foreground.get("displayNodeRef")]
    assert float(display.get("level")) == 0.0 and float(red.get("foregroundOpacity")) == pytest.approx(0.5)
    background = nodes[nodes[red.get("backgroundVolumeID")].get("displayNodeRef")]
    assert (float(background.get("window")), float(background.get("level"))) == (1500.0, -600.0)

    table = [line.split() for line in (bundle / "cdam_diverging.ctbl").read_text().splitlines() if line[:1] != "#"]
    assert len(table) == 256 and table[127][5] == "0"
    compile((bundle / "review.py").read_text(), "review.py", "exec")
    assert (bundle / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maps_follow_an_off_centre_nodule_on_every_axis(nodule_checkpoint, synthetic_lidc):
    """A crop whose nodule sits 6 mm off centre along x, y and z: the 3D map's peak must follow it (a flipped axis
    would put the peak 12 mm away, outside the nodule)."""
    from ctcdam.export.volumes import image_on_grid
    from ctcdam.lidc.crops import CropSpec, consensus_mask, crop_reference
    from ctcdam.lidc.nodules import scan_clusters
    from ctcdam.models.checkpoint import load_for_inference
    from ctcdam.workflows.explain_scan import (
        ExplainSettings,
        load_scan_series,
        nodule_maps,
    )

    loaded = load_for_inference(nodule_checkpoint)
    scan, series = load_scan_series(SCAN, synthetic_lidc.root)
    masks = [consensus_mask(c.annotations, scan, series.plane) for c in scan_clusters(scan)]
    mask = max(masks, key=lambda m: m.n_voxels)  # the largest nodule: room for the 2 mm tokens
    grid = crop_reference(tuple(np.asarray(mask.centroid) + np.array([6.0, -6.0, 6.0])), CropSpec())
    crop = sitk.Resample(series.image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    maps = nodule_maps(loaded, sitk.GetArrayFromImage(crop), ExplainSettings(targets=("malignancy",)))
    heat = image_on_grid(maps.volumes["malignancy"], crop)
    peak, _ = _peak_and_centre_of_mass(heat)
    inside = sitk.Resample(mask.image, heat, sitk.Transform(), sitk.sitkLinear, 0.0)
    assert inside[heat.TransformPhysicalPointToIndex(peak)] >= 0.5
    assert np.linalg.norm(np.asarray(peak) - np.asarray(grid.TransformContinuousIndexToPhysicalPoint([15.5] * 3))) > 3


# ---------------------------------------------------------------------------------------------------------------
# errors and interruptions


def test_cli_method_options_have_their_own_flags(capsys):
    """--samples sets Smooth CDAM's noise draws and --steps Integrated CDAM's path: neither is the other's."""
    spec = importlib.util.spec_from_file_location("explain_cli", EXPLAIN_SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    p = cli.parser()
    assert set(cli.METHODS) == {"cdam", "smooth", "integrated"}
    integrated = p.parse_args(["--scan", SCAN, "--method", "integrated", "--steps", "7"])
    smooth = p.parse_args(["--scan", SCAN, "--method", "smooth", "--samples", "5"])
    assert cli.method_options(integrated, p) == {"steps": 7} and cli.method_options(smooth, p) == {"samples": 5}
    for method, flag in (("integrated", "--samples"), ("smooth", "--steps"), ("cdam", "--samples")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--scan", SCAN, "--method", method, flag, "3"])
        assert exit_info.value.code == 2
        assert f"{flag} is not an option of --method {method}" in capsys.readouterr().err


def test_cli_errors_are_one_sentence_and_non_zero(nodule_checkpoint, synthetic_lidc, tmp_path):
    common = ["--checkpoint", nodule_checkpoint, "--lidc-root", synthetic_lidc.root, "--out", tmp_path / "out"]
    unknown = _run_cli(["--scan", "LIDC-IDRI-0238", *common])
    assert unknown.returncode == 2
    assert "is not under" in unknown.stderr and "closest scan ids there: LIDC-IDRI-0237" in unknown.stderr
    missing = _run_cli(["--scan", SCAN, "--checkpoint", tmp_path / "none.ckpt", "--out", tmp_path / "out"])
    assert missing.returncode == 2 and "none.ckpt does not exist" in missing.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    as_file = _run_cli(["--scan", SCAN, *common[:4], "--out", a_file])
    assert as_file.returncode == 2 and "is a file" in as_file.stderr
    for result in (unknown, missing, as_file):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_rejects_a_checkpoint_that_does_not_fit_its_configuration(nodule_checkpoint, synthetic_lidc, tmp_path):
    checkpoint = torch.load(nodule_checkpoint, weights_only=True)
    checkpoint["ctcdam"]["config"]["model_kwargs"]["depth"] = 2  # the weights hold one block
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    result = _run_cli(["--scan", SCAN, "--checkpoint", path, "--lidc-root", synthetic_lidc.root,
                       "--out", tmp_path / "out"])
    assert result.returncode == 2 and "from another configuration" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / SCAN).exists()


def test_concept_query_without_training_examples_is_an_error(nodule_checkpoint, synthetic_lidc, tmp_path, capsys):
    status = _cli_main()(["--scan", SCAN, "--checkpoint", str(nodule_checkpoint), "--lidc-root",
                          str(synthetic_lidc.root), "--out", str(tmp_path), "--concept", "malignancy>=6"])
    assert status == 2 and "matches none of the" in capsys.readouterr().err
    assert not (tmp_path / SCAN).exists()


def test_scan_without_usable_nodules_writes_the_ct_and_says_why(nodule_checkpoint, synthetic_lidc, tmp_path):
    # Keep only the two highest slices: no nodule's annotated z extent lies inside them.
    source = synthetic_lidc.series_dirs[SCAN]
    root = tmp_path / "lidc"
    target = root / source.relative_to(synthetic_lidc.root)
    shutil.copytree(source, target)
    by_z = sorted(target.iterdir(), key=lambda f: float(sitk.ReadImage(str(f)).GetOrigin()[2]))
    for extra in by_z[:-2]:
        extra.unlink()
    status = _cli_main()(["--scan", SCAN, "--checkpoint", str(nodule_checkpoint), "--lidc-root", str(root),
                          "--out", str(tmp_path / "out"), "--no-volume"])
    assert status == 0
    bundle = tmp_path / "out" / SCAN
    predictions = json.loads((bundle / "predictions.json").read_text())
    assert predictions["nodules"] == [] and "no usable nodule" in predictions["note"]
    assert sitk.ReadImage(str(bundle / "ct.nii.gz")).GetSize()[2] == 2


def _bundle_contents(folder: Path) -> dict[str, object]:
    """File name -> bytes, or the voxel array for NIfTI (bytes of a .mrb zip carry timestamps)."""
    contents: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name.endswith(".nii.gz"):
            contents[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes()
        elif name == "predictions.json":
            document = json.loads(path.read_text())
            document.pop("timing", None)  # seconds differ between runs
            document.get("details", {}).pop("timing", None)
            contents[name] = document
        elif not name.endswith((".mrb", ".png")):
            contents[name] = path.read_bytes()
        else:
            contents[name] = path.stat().st_size > 0
    return contents


def test_killed_run_leaves_no_half_written_bundle(nodule_checkpoint, synthetic_lidc, tmp_path):
    from ctcdam import io
    from tests.faulty_runs import run_faulty_pipeline

    argv = ["--scan", SCAN, "--checkpoint", nodule_checkpoint, "--lidc-root", synthetic_lidc.root,
            "--targets", "malignancy", "--no-volume"]
    reference, counter = tmp_path / "reference", tmp_path / "reference.count"
    assert run_faulty_pipeline(EXPLAIN_SCRIPT, [*argv, "--out", reference], counter, at=10**9) == 0
    n_points = counter.stat().st_size
    expected = _bundle_contents(reference / SCAN)
    # First write, middle, the last file published, the staged bundle complete, and (rewriting an existing
    # bundle) the old one set aside: the kill leaves either the finished bundle or none under its name.
    # The rerun that must complete the bundle and clear the dead run's leftovers is checked once per kind of
    # leftover (a half staging folder; an old bundle set aside): each costs a full bundle write.
    rerun = {(n_points // 2, False), (n_points, True)}
    for at, rewrite in [(1, False), (n_points // 2, False), (n_points - 1, False), (n_points, False),
                        (n_points - 1, True), (n_points, True)]:
        out = tmp_path / f"killed-{at}-{rewrite}"
        if rewrite:
            shutil.copytree(reference, out)
        status = run_faulty_pipeline(EXPLAIN_SCRIPT, [*argv, "--out", out], tmp_path / f"count-{at}-{rewrite}", at)
        assert status == -signal.SIGKILL, f"not killed at write point {at} of {n_points}"
        if (out / SCAN).exists():
            assert _bundle_contents(out / SCAN) == expected, at  # the finished (old) bundle, never a half one
        else:
            assert not rewrite or at == n_points, "only the instant between set-aside and publish has no bundle"
        if (at, rewrite) not in rerun:
            continue
        assert _cli_main()([*map(str, argv), "--out", str(out)]) == 0
        assert _bundle_contents(out / SCAN) == expected, at
        assert sorted(p.name for p in out.iterdir()) == [SCAN], at  # the dead run's staging folders are gone
        assert not [p for p in out.rglob("*") if io.is_temporary(p)], at


def test_a_full_disk_stops_explain_with_one_sentence_and_no_partial_bundle(nodule_checkpoint, synthetic_lidc, tmp_path):
    from ctcdam import io
    from tests.faulty_runs import run_faulty_pipeline

    out = tmp_path / "out"
    argv = ["--scan", SCAN, "--checkpoint", nodule_checkpoint, "--lidc-root", synthetic_lidc.root, "--targets",
            "malignancy", "--no-volume", "--out", out]
    # Write point 5: a few files into the staging folder, ENOSPC as a full disk raises it.
    log = tmp_path / "stderr.txt"
    status = run_faulty_pipeline(EXPLAIN_SCRIPT, argv, tmp_path / "count", 5, kind="enospc", stderr=log)
    message = log.read_text().strip().splitlines()
    assert status == 2 and len(message) == 1 and "No space left on device" in message[0], message
    assert not (out / SCAN).exists() and not [p for p in out.rglob("*") if io.is_temporary(p)]


# ---------------------------------------------------------------------------------------------------------------
# real CT


@pytest.mark.lidc_sample
def test_real_lidc_scan_0003(nodule_checkpoint, lidc_sample, tmp_path, capsys):
    status = _cli_main()(["--scan", "LIDC-IDRI-0003", "--checkpoint", str(nodule_checkpoint), "--lidc-root",
                          str(lidc_sample), "--out", str(tmp_path), "--targets", "malignancy,diameter"])
    assert status == 0
    printed = capsys.readouterr().out
    bundle = tmp_path / "LIDC-IDRI-0003"
    predictions = json.loads((bundle / "predictions.json").read_text())
    assert predictions["nodules"], predictions["note"]
    seg, fields = _segments(bundle / "nodules.seg.nrrd")
    points = json.loads((bundle / "nodules.mrk.json").read_text())["markups"][0]["controlPoints"]
    for k, (nodule, point) in enumerate(zip(predictions["nodules"], points)):
        assert _inside_segment(seg, int(fields[k]["LabelValue"]), point["position"])
        assert f"malignancy={nodule['predictions']['malignancy']:.3g}" in printed
    # The real series' geometry (0.7 mm pixels, 2.5 mm slices) reaches the CT file unchanged.
    reader = sitk.ImageSeriesReader()
    series_dir = next(p.parent for p in (lidc_sample / "LIDC-IDRI-0003").rglob("*.dcm"))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    dicom = reader.Execute()
    ct = sitk.ReadImage(str(bundle / "ct.nii.gz"))
    assert np.allclose(ct.GetOrigin(), dicom.GetOrigin(), atol=1e-3) and ct.GetSize() == dicom.GetSize()
