"""The workflow layer: the synthetic default in one place, and explain on the settings and crops of training."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ctcdam.data.datamodule import NoduleDataModule
from ctcdam.data.transforms import InputConfig
from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.scan_nodules import PreprocessConfig, crop, load_scan, scan_nodules
from ctcdam.manifest.schema import read_crop, read_run_record

SCAN = "LIDC-IDRI-0237"  # synthetic_lidc: n1 has 2 readers (not in the manifest), n2 and n3 have 4


def _checkpoint(path: Path, manifest: Path, lidc_root: Path, preprocess: dict | None) -> Path:
    """A tiny random-weight ViT saved as a ctcdam checkpoint whose data is ``manifest`` from ``lidc_root``."""
    from ctcdam.data.labels import BiomarkerScaler
    from ctcdam.manifest.schema import biomarker_matrix, read_manifest
    from ctcdam.models.backbone import build_vit
    from ctcdam.models.checkpoint import checkpoint_record
    from ctcdam.targets import TARGETS

    frame = read_manifest(manifest)
    kwargs = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", 32, kwargs)
    config = {"backbone": "vit_tiny_patch16_224", "img_size": 32, **InputConfig(img_size=32).to_dict(),
              "model_kwargs": kwargs, "crop_shape": [32, 32, 32], "crop_mm": [32.0] * 3, "spacing_mm": [1.0] * 3,
              "views": ["axial", "coronal", "sagittal"], "targets": list(TARGETS), "finetune": "full", "weights": "none"}
    data = {"manifest": str(manifest), "lidc_root": str(lidc_root), "fold": 0, "seed": 0,
            "train_ids": frame["nodule_id"].tolist(), "val_ids": [], "test_ids": [], "preprocess": preprocess}
    record = checkpoint_record(config, BiomarkerScaler.fit(biomarker_matrix(frame)), data)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "ctcdam": record}, path)
    return path


def _explain(checkpoint: Path, lidc_root: Path):
    from ctcdam.models.checkpoint import load_for_inference
    from ctcdam.workflows.explain_scan import ExplainSettings, explain_scan

    settings = ExplainSettings(targets=("malignancy",), views=("axial",), volume=False)
    return explain_scan(SCAN, load_for_inference(checkpoint), lidc_root, settings)


@pytest.fixture(scope="module")
def tampered(synthetic_manifest, tmp_path_factory) -> Path:
    """A copy of the synthetic manifest whose crop of n2 was brightened by 100 HU (so its origin is recognisable)."""
    out_dir, _ = synthetic_manifest
    copy = tmp_path_factory.mktemp("tampered") / "pre"
    shutil.copytree(out_dir, copy)
    file = next(copy.glob(f"crops/{SCAN}/{SCAN}-n2_hu.nii.gz"))
    image = sitk.ReadImage(str(file))
    brighter = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + np.int16(100))
    brighter.CopyInformation(image)
    sitk.WriteImage(brighter, str(file))
    return copy / "manifest.csv"


def test_explain_reads_the_training_crops_from_the_manifest(synthetic_lidc, tampered, tmp_path):
    record = read_run_record(tampered)
    result = _explain(_checkpoint(tmp_path / "m.ckpt", tampered, synthetic_lidc.root, record["preprocess"]),
                      synthetic_lidc.root)
    assert result.details["training_crops"] == [f"{SCAN}-n2", f"{SCAN}-n3"]
    by_id = {n.nodule_id: n for n in result.nodules}
    trained = read_crop(tampered.parent / "crops" / SCAN / f"{SCAN}-n2_hu.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(by_id[f"{SCAN}-n2"].crop), trained.array)
    assert by_id[f"{SCAN}-n2"].crop.GetOrigin() == trained.image().GetOrigin()
    # n1 is not in the manifest (2 readers): cut with the trained settings through the one pipeline
    config = PreprocessConfig()
    loaded = load_scan(SCAN, synthetic_lidc.root, config)
    nodules, _ = scan_nodules(loaded.scan, SCAN, loaded.series, config, training_population_only=False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(by_id[f"{SCAN}-n1"].crop),
                                  sitk.GetArrayFromImage(crop(loaded.series, nodules[0], config).hu))
    assert [n.in_training_population for n in result.nodules] == [False, True, True]


def test_another_dicom_root_is_cropped_again(synthetic_lidc, tampered, tmp_path):
    other_root = tmp_path / "other-root"
    shutil.copytree(synthetic_lidc.root / SCAN, other_root / SCAN)
    checkpoint = _checkpoint(tmp_path / "m.ckpt", tampered, synthetic_lidc.root, read_run_record(tampered)["preprocess"])
    result = _explain(checkpoint, other_root)
    assert result.details["training_crops"] == []
    original = read_crop(tampered.parent / "crops" / SCAN / f"{SCAN}-n2_hu.nii.gz").array - 100
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.nodules[1].crop), original)


def test_explain_uses_the_settings_the_model_was_trained_with(synthetic_lidc, tampered, tmp_path):
    two_readers = PreprocessConfig(min_annotations=2).as_record()
    result = _explain(_checkpoint(tmp_path / "two.ckpt", tampered, synthetic_lidc.root, two_readers), synthetic_lidc.root)
    assert [n.in_training_population for n in result.nodules] == [True, True, True]
    assert result.details["preprocess"] == two_readers
    other_grid = PreprocessConfig(crop=CropSpec(16.0, 1.0)).as_record()
    with pytest.raises(ValueError, match=r"trained on \[32, 32, 32\] crops, but its preprocessing record says 16.0 mm"):
        _explain(_checkpoint(tmp_path / "grid.ckpt", tampered, synthetic_lidc.root, other_grid), synthetic_lidc.root)


def test_checkpoint_without_settings_falls_back_to_the_defaults_on_its_grid(synthetic_lidc, tampered, tmp_path):
    from ctcdam.models.checkpoint import load_for_inference
    from ctcdam.workflows.explain_scan import trained_config

    loaded = load_for_inference(_checkpoint(tmp_path / "old.ckpt", tampered, synthetic_lidc.root, None))
    assert trained_config(loaded) == PreprocessConfig()


def test_datamodule_records_the_dicom_root_and_settings_of_its_manifest(synthetic_lidc, synthetic_manifest):
    out_dir, _ = synthetic_manifest
    kwargs = dict(n_folds=2, val_fraction=0.45, group_by="nodule_id", input_config=InputConfig(img_size=32))
    dm = NoduleDataModule(manifest=str(out_dir / "manifest.csv"), **kwargs)
    dm.setup("fit")
    record = dm.record()
    assert record["lidc_root"] == str(Path(synthetic_lidc.root).resolve())
    assert record["preprocess"] == PreprocessConfig().as_record()
    given = NoduleDataModule(manifest=str(out_dir / "manifest.csv"), lidc_root="/data/LIDC-IDRI", **kwargs)
    given.setup("fit")
    assert given.record()["lidc_root"] == "/data/LIDC-IDRI"
    with pytest.raises(ValueError, match="needs a manifest"):
        NoduleDataModule(**kwargs).setup("fit")


def test_preprocessing_without_a_root_writes_the_one_default_copy(tmp_path, monkeypatch):
    from ctcdam.workflows.defaults import default_cache_dir, default_preprocessed_dir
    from ctcdam.workflows.preprocess import preprocess

    monkeypatch.setenv("CTCDAM_CACHE", str(tmp_path))
    summary = preprocess(None, scan_ids=["LIDC-IDRI-0059"])
    assert default_cache_dir() == tmp_path
    assert summary.manifest_path == default_preprocessed_dir() / "manifest.csv" == tmp_path / "synthetic-preprocessed" / "manifest.csv"
    assert read_run_record(summary.manifest_path)["lidc_root"] == str((tmp_path / "synthetic-lidc").resolve())
