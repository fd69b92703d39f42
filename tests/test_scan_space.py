"""Scan-space math: mass centres in world coordinates and points in masks dilated in mm, on constructed cases."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ctcdam.evaluate.scan_space import read_nifti_lps
from ctcdam.evaluate.summary import wilson_interval
from ctcdam.explain import cause_metrics


def _affine(spacing=(0.6, 0.8, 2.5), angle_deg=30.0, origin=(-40.0, 12.5, 103.0)) -> np.ndarray:
    """Voxel -> world: a rotation about the third world axis, anisotropic spacing, an offset."""
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _world(affine: np.ndarray, index) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, dtype=float) + affine[:3, 3]


def test_voxel_positions_follow_the_affine_in_c_order():
    affine = _affine()
    shape = (3, 4, 5)
    positions = cause_metrics.voxel_positions(affine, shape)
    expected = [_world(affine, (i, j, k)) for i in range(3) for j in range(4) for k in range(5)]
    np.testing.assert_allclose(positions, expected, atol=1e-12)


def test_signed_mass_centres_of_a_constructed_map():
    affine = _affine()
    values = np.zeros((4, 4, 4))
    values[1, 2, 3], values[3, 0, 1] = 1.0, 3.0  # evidence: weights 1 and 3
    values[0, 0, 0], values[2, 2, 2] = -2.0, -2.0  # counter-evidence: equal weights
    positions = cause_metrics.voxel_positions(affine, values.shape)
    positive = cause_metrics.signed_mass_centre(values, positions, 1)
    np.testing.assert_allclose(positive, (_world(affine, (1, 2, 3)) + 3 * _world(affine, (3, 0, 1))) / 4)
    negative = cause_metrics.signed_mass_centre(values, positions, -1)
    np.testing.assert_allclose(negative, _world(affine, (1, 1, 1)))  # the midpoint of the two
    assert np.isnan(cause_metrics.signed_mass_centre(np.abs(values), positions, -1)).all()  # no negative mass
    with pytest.raises(ValueError, match="sign"):
        cause_metrics.signed_mass_centre(values, positions, 0)


def test_a_centred_gaussian_has_its_mass_centre_at_the_crop_centre():
    affine = _affine(spacing=(1.0, 1.0, 1.0))
    shape = (32, 32, 32)
    positions = cause_metrics.voxel_positions(affine, shape)
    centre = _world(affine, [(n - 1) / 2 for n in shape])
    gaussian = np.exp(-((positions - centre) ** 2).sum(-1) / (2 * 4.0**2))
    np.testing.assert_allclose(cause_metrics.signed_mass_centre(gaussian, positions), centre, atol=1e-9)
    np.testing.assert_allclose(cause_metrics.signed_mass_centre(np.ones(positions.shape[0]), positions), centre, atol=1e-9)


def test_dilation_is_in_mm_on_an_anisotropic_rotated_grid():
    spacing = (0.6, 0.8, 2.5)
    affine = _affine(spacing)
    mask = np.zeros((7, 7, 7), dtype=np.uint8)
    mask[3, 3, 3] = 1
    half = np.asarray(spacing) / 2

    def point(offset_mm) -> np.ndarray:  # mm from the voxel's centre along its own (rotated) axes
        return _world(affine, np.array([3.0, 3.0, 3.0]) + np.asarray(offset_mm) / np.asarray(spacing))

    cases = [
        ((0.0, 0.0, 0.0), 0.0, True),  # the voxel centre
        ((0.25, -0.3, 1.2), 0.0, True),  # inside the voxel's box, off its centre
        ((0.0, 0.0, half[2] + 0.9), 0.9, True),  # 0.9 mm beyond the 2.5 mm face
        ((0.0, 0.0, half[2] + 1.2), 1.2, False),  # 1.2 mm beyond it: in the next voxel, outside 1 mm
        ((half[0] + 0.95, 0.0, 0.0), 0.95, True),  # two 0.6 mm voxels away, yet within 1 mm
        ((-(half[0] + 1.05), 0.0, 0.0), 1.05, False),
        ((half[0] + 0.8, half[1] + 0.8, 0.0), np.hypot(0.8, 0.8), False),  # a ball in mm, not a box
        ((half[0] + 0.6, 0.0, -(half[2] + 0.7)), np.hypot(0.6, 0.7), True),
    ]
    for offset, distance, inside in cases:
        p = point(offset)
        assert cause_metrics.distance_to_mask(p, mask, affine) == pytest.approx(distance, abs=1e-9), offset
        assert cause_metrics.inside_dilated_mask(p, mask, affine, 1.0) is inside, offset
    # A voxel dilation (one voxel each way) would take the 1.2 mm point along the coarse axis and leave the 0.95 mm
    # one along the fine axis out: the two rules differ exactly where the grid is anisotropic.
    assert cause_metrics.inside_dilated_mask(point((0.0, 0.0, half[2] + 1.2)), mask, affine, 1.25)
    assert cause_metrics.distance_to_mask(point((0.0, 0.0, 0.0)), np.zeros_like(mask), affine) == np.inf
    assert not cause_metrics.inside_dilated_mask(np.full(3, np.nan), mask, affine)  # a map without mass hits nothing


def test_the_nearest_of_several_mask_voxels_counts():
    affine = _affine()
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[1, 1, 1] = mask[4, 4, 2] = True
    p = _world(affine, (4.0, 4.0, 2.0 + 0.5 + 0.3 / 2.5))  # 0.3 mm beyond the second voxel's face
    assert cause_metrics.distance_to_mask(p, mask, affine) == pytest.approx(0.3)


def test_a_sheared_affine_is_refused():
    affine = _affine()
    affine[0, 1] += 0.3
    with pytest.raises(ValueError, match="orthogonal"):
        cause_metrics.distance_to_mask((0.0, 0.0, 0.0), np.ones((2, 2, 2)), affine)


def test_nibabel_reads_an_itk_nifti_in_lps(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # SimpleITK order (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.0))
    image.SetOrigin((-120.0, 35.5, -310.0))
    image.SetDirection(sitk.VersorTransform((0.0, 0.0, 1.0), 0.4).GetMatrix())
    sitk.WriteImage(image, str(tmp_path / "map.nii.gz"))
    values, affine = read_nifti_lps(tmp_path / "map.nii.gz")
    assert values.shape == (6, 5, 4)  # nibabel's (i, j, k) = ITK's (x, y, z)
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        np.testing.assert_allclose(_world(affine, index), image.TransformIndexToPhysicalPoint(index), atol=1e-4)
        assert values[index] == array[index[::-1]]


def test_wilson_interval():
    rate, low, high = wilson_interval(8, 10)
    assert rate == 0.8 and low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[1] == 0.0 and wilson_interval(5, 5)[2] == 1.0
    assert np.isnan(wilson_interval(0, 0)).all()
