"""The one manifest schema: columns from ctcdam.targets, a typed reader that resolves paths, the run record beside
the manifest, and crops that carry their full geometry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ctcdam.lidc.crops import CropSpec, crop_reference
from ctcdam.lidc.scan_nodules import PreprocessConfig
from ctcdam.manifest.schema import (
    MANIFEST_COLUMNS,
    ManifestError,
    read_crop,
    read_manifest,
    read_run_record,
    run_record_path,
)
from ctcdam.targets import BIOMARKER_COLUMNS, BIOMARKERS


def test_written_manifest_has_the_schema_columns_and_reads_back_typed(generated_preprocessed):
    out_dir, _ = generated_preprocessed
    header = (out_dir / "manifest.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == MANIFEST_COLUMNS
    assert [BIOMARKER_COLUMNS[name] for name in BIOMARKERS] == [c for c in header if c in BIOMARKER_COLUMNS.values()]
    frame = read_manifest(out_dir / "manifest.csv")
    assert str(frame["malignancy_label"].dtype) == "Int64" and frame["calcified"].dtype == bool
    assert frame["label"].tolist() == [float(v) for v in frame["malignancy_label"]]
    for row in frame.itertuples():
        assert row.image_file == str((out_dir / row.image_path).resolve())
        assert row.mask_file == str((out_dir / row.mask_path).resolve())


def test_manifest_without_masks_has_no_mask_file(blob_manifest):
    frame = read_manifest(blob_manifest)
    assert frame["mask_file"].map(lambda v: v is None).all()
    assert read_run_record(blob_manifest) is None  # made without a preprocessing run


def test_run_record_holds_the_settings_and_the_dicom_root(generated_lidc, generated_preprocessed):
    out_dir, _ = generated_preprocessed
    record = read_run_record(out_dir / "manifest.csv")
    assert run_record_path(out_dir / "manifest.csv") == out_dir / "manifest.json"
    assert record["preprocess"] == PreprocessConfig().as_record()
    assert record["lidc_root"] == str(generated_lidc.resolve())
    assert PreprocessConfig.from_record(record["preprocess"]) == PreprocessConfig()
    other = PreprocessConfig(min_annotations=2, crop=CropSpec(16.0, 0.5), consensus_level=0.25, hu_clip=None, pad_hu=-1000)
    assert PreprocessConfig.from_record(json.loads(json.dumps(other.as_record()))) == other


def test_damaged_run_record_is_named(generated_preprocessed, tmp_path):
    out_dir, _ = generated_preprocessed
    (tmp_path / "manifest.csv").write_text((out_dir / "manifest.csv").read_text())
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="manifest.json is damaged"):
        read_run_record(tmp_path / "manifest.csv")


def test_crop_carries_its_full_geometry(generated_preprocessed):
    out_dir, manifest = generated_preprocessed
    for row in manifest.itertuples():
        crop = read_crop(out_dir / row.image_path)
        grid = crop_reference((row.centroid_x, row.centroid_y, row.centroid_z), CropSpec(row.crop_size * row.crop_spacing_mm,
                                                                                          row.crop_spacing_mm))
        # NIfTI stores the geometry in float32
        assert np.allclose(crop.geometry.origin_lps, grid.GetOrigin(), atol=1e-4)
        assert np.allclose(crop.geometry.direction, grid.GetDirection())
        assert crop.geometry.shape == (row.crop_size,) * 3 and crop.geometry.spacing_mm == (row.crop_spacing_mm,) * 3
        image = crop.image()
        written = sitk.ReadImage(str(out_dir / row.image_path))
        assert image.GetOrigin() == written.GetOrigin() and image.GetDirection() == written.GetDirection()
        assert image.GetSpacing() == written.GetSpacing()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(written))
        with pytest.raises(ValueError, match="does not fit"):
            crop.geometry.image(crop.array[:-1])
