"""Manifest checks, patient-grouped stratified folds, training-only label scaling and the view datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from ctcdam.data.datamodule import NoduleDataModule
from ctcdam.data.dataset import AugmentConfig
from ctcdam.data.folds import patient_folds, split_fold
from ctcdam.manifest.schema import ManifestError, load_crops, read_manifest
from ctcdam.data.transforms import DIHEDRAL_VARIANTS, InputConfig, SliceAugmentation, slice_transform
from ctcdam.data.views import VIEWS, view_slice
from ctcdam.targets import BIOMARKER_COLUMNS, BIOMARKERS
from tests.fixtures_models import write_blob_manifest

CFG = InputConfig(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _copy_manifest(manifest: Path, tmp_path: Path, edit) -> Path:
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame["image_path"] = [str((manifest.parent / p).resolve()) for p in frame["image_path"]]
    frame = edit(frame)
    path = tmp_path / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


# -- bad input ------------------------------------------------------------------------------------
def test_missing_column_is_named(blob_manifest: Path, tmp_path: Path):
    path = _copy_manifest(blob_manifest, tmp_path, lambda f: f.drop(columns=["diameter_mm"]))
    with pytest.raises(ManifestError, match=r"manifest\.csv lacks column\(s\) diameter_mm"):
        read_manifest(path)


def test_missing_image_file_names_row_and_file(blob_manifest: Path, tmp_path: Path):
    def edit(frame):
        frame.loc[3, "image_path"] = str(tmp_path / "gone_hu.nii.gz")
        return frame

    with pytest.raises(ManifestError, match=r"row 5 \(nodule 'P001-n1'\): image file .*gone_hu\.nii\.gz does not exist"):
        read_manifest(_copy_manifest(blob_manifest, tmp_path, edit))


def test_bad_label_and_bad_biomarker_name_the_row(blob_manifest: Path, tmp_path: Path):
    def bad_label(frame):
        frame.loc[2, "malignancy_label"] = "3"
        return frame

    with pytest.raises(ManifestError, match=r"row 4 \(nodule 'P001-n0'\) has malignancy_label '3'"):
        read_manifest(_copy_manifest(blob_manifest, tmp_path, bad_label))

    def bad_biomarker(frame):
        frame.loc[0, "spiculation"] = ""
        return frame

    with pytest.raises(ManifestError, match=r"row 2 \(nodule 'P000-n0'\) has no finite value in column spiculation"):
        read_manifest(_copy_manifest(blob_manifest, tmp_path, bad_biomarker))


def test_crop_with_nan_names_the_file(tmp_path: Path):
    # NRRD keeps NaN; NIfTI readers built on nifti_clib (ITK's included) replace non-finite voxels by 0 on read
    manifest = write_blob_manifest(tmp_path, n_patients=3, per_patient=1, size=8, float_crops=True, suffix=".nrrd")
    frame = read_manifest(manifest)
    file = frame["image_file"][1]
    array = sitk.GetArrayFromImage(sitk.ReadImage(file))
    array[2, 3, 4] = np.nan
    image = sitk.GetImageFromArray(array)
    sitk.WriteImage(image, file)
    with pytest.raises(ManifestError, match=r"P001-n0_hu\.nrrd contains 1 NaN"):
        load_crops(frame)


def test_empty_fold_is_a_clear_error(tmp_path: Path):
    manifest = write_blob_manifest(tmp_path, n_patients=3, per_patient=2, size=8)
    frame = read_manifest(manifest)
    with pytest.raises(ValueError, match="3 patient\\(s\\) cannot fill 5 folds"):
        split_fold(frame, fold=0, n_folds=5)
    with pytest.raises(ValueError, match="cannot give a patient-grouped validation part"):
        split_fold(frame, fold=0, n_folds=2)  # 1-2 training patients left, 5 needed for a 20% validation part


# -- folds ----------------------------------------------------------------------------------------
def test_folds_are_patient_grouped_stratified_and_partition_the_data(tmp_path: Path):
    frame = read_manifest(write_blob_manifest(tmp_path, n_patients=30, per_patient=2, size=8))
    folds = patient_folds(frame["label"].to_numpy(), frame["patient_id"].to_numpy(), n_folds=5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(frame)))
    patients = frame["patient_id"].to_numpy()
    for k, test in enumerate(folds):
        split = split_fold(frame, k, n_folds=5, seed=3)
        assert np.array_equal(split.test, np.sort(test))
        parts = [set(patients[p]) for p in (split.train, split.val, split.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), "a patient spans two parts"
        assert len(split.train) + len(split.val) + len(split.test) == len(frame)
        labels = frame["label"].to_numpy()[split.test]
        assert (labels == 1).any() and (labels == 0).any() and np.isnan(labels).any()  # all strata in every fold
    again = split_fold(frame, 2, n_folds=5, seed=3)
    assert np.array_equal(again.val, split_fold(frame, 2, n_folds=5, seed=3).val)
    assert not np.array_equal(split_fold(frame, 0, 5, seed=3).test, split_fold(frame, 0, 5, seed=4).test)


# -- datamodule and datasets ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def datamodule(blob_manifest: Path) -> NoduleDataModule:
    dm = NoduleDataModule(manifest=str(blob_manifest), n_folds=3, batch_size=4, input_config=CFG, intensity_jitter=0.0)
    dm.setup("fit")
    return dm


def test_scaler_is_fitted_on_the_training_part_only(datamodule: NoduleDataModule, blob_manifest: Path):
    frame = pd.read_csv(blob_manifest).set_index("nodule_id")
    train_ids = datamodule.record()["train_ids"]
    for i, name in enumerate(BIOMARKERS):
        values = frame.loc[train_ids, BIOMARKER_COLUMNS[name]].to_numpy(dtype=float)
        assert datamodule.scaler.mean[i] == pytest.approx(values.mean())
        assert datamodule.scaler.std[i] == pytest.approx(values.std() if values.std() > 0 else 1.0)
    everything = frame[BIOMARKER_COLUMNS["diameter"]].mean()
    assert datamodule.scaler.mean[BIOMARKERS.index("diameter")] != pytest.approx(everything)


def test_unlabelled_nodules_are_kept_with_a_nan_label(datamodule: NoduleDataModule):
    train = datamodule.rows("train")
    assert train["label"].isna().any()
    labels = datamodule.datasets["train"].targets.label.numpy()
    assert np.array_equal(np.isnan(labels), train["label"].isna().to_numpy())


def test_training_item_is_the_slice_its_cache_key_names(datamodule: NoduleDataModule):
    ds = datamodule.datasets["train"]
    jitter = ds.augment.slice_jitter
    n_slices, n_variants = 2 * jitter + 1, len(ds.variants)
    torch.manual_seed(0)
    seen_offsets = set()
    for i in (0, 3, 7) * 4:
        item = ds[i]
        key = int(item["cache_key"])
        assert key >= 0  # no intensity jitter: images repeat exactly
        variant, key = key % n_variants, key // n_variants
        offset, key = key % n_slices, key // n_slices
        view, row = key % len(VIEWS), key // len(VIEWS)
        assert row == i
        seen_offsets.add(offset)
        crop = ds.crops[i]
        expected = slice_transform(CFG, SliceAugmentation(variant=ds.variants[variant]))(
            view_slice(crop, VIEWS[view], crop.shape[0] // 2 - jitter + offset)
        )
        assert torch.allclose(item["image"], expected)
        assert item["image"].shape == (3, 32, 32)
    assert len(seen_offsets) > 1
    assert ds.n_cache_keys == len(ds) * 3 * n_slices * len(DIHEDRAL_VARIANTS)


def test_jittered_items_are_not_cacheable(blob_manifest: Path):
    dm = NoduleDataModule(manifest=str(blob_manifest), n_folds=3, input_config=CFG, intensity_jitter=0.1)
    dm.setup("fit")
    assert int(dm.datasets["train"][0]["cache_key"]) == -1
    cached = NoduleDataModule(manifest=str(blob_manifest), n_folds=3, input_config=CFG, embedding_cache=True)
    assert cached.augment.intensity_jitter == 0.0


def test_evaluation_item_holds_the_three_central_views(datamodule: NoduleDataModule):
    ds = datamodule.datasets["test"]
    item = ds[1]
    assert item["image"].shape == (3, 3, 32, 32)
    crop = ds.crops[1]
    for v, view in enumerate(VIEWS):
        assert torch.allclose(item["image"][v], slice_transform(CFG)(view_slice(crop, view, 8)))
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape[1:] == (3, 3, 32, 32) and batch["biomarkers_z"].shape[1] == 8
    # the nodule ids travel in the batch, in the order of the part's manifest rows
    rows = datamodule.rows("test")
    assert batch["nodule_id"] == rows["nodule_id"].astype(str).tolist()[: len(batch["nodule_id"])]
    assert item["nodule_id"] == rows["nodule_id"].iloc[1]
    train = next(iter(datamodule.train_dataloader()))
    assert set(train["nodule_id"]) <= set(datamodule.rows("train")["nodule_id"])


def test_fold_all_and_missing_input_config_are_rejected_at_setup(blob_manifest: Path):
    with pytest.raises(ValueError, match="fold 'all' runs one training per fold"):
        NoduleDataModule(manifest=str(blob_manifest), fold="all", input_config=CFG).setup("fit")
    with pytest.raises(ValueError, match="needs input_config"):
        NoduleDataModule(manifest=str(blob_manifest)).setup("fit")
    with pytest.raises(ValueError, match="slice_jitter 9 reaches outside"):
        NoduleDataModule(manifest=str(blob_manifest), n_folds=3, input_config=CFG, slice_jitter=9).setup("fit")
    assert AugmentConfig(rotate=False, flip=False).variants() == (0,)
