"""Views of a (z, y, x) crop and the exact inverse that puts 2D maps back on the crop grid."""
from __future__ import annotations

import numpy as np
import pytest

from ctcdam.data.views import VIEWS, central_slices, centre_index, place_view_map, view_slice, view_stack

VOLUME = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)  # distinct sizes catch swapped axes


def test_view_slice_follows_the_documented_indexing():
    assert np.array_equal(view_slice(VOLUME, "axial", 2), VOLUME[2, :, :])
    assert np.array_equal(view_slice(VOLUME, "coronal", 3), VOLUME[:, 3, :])
    assert np.array_equal(view_slice(VOLUME, "sagittal", 1), VOLUME[:, :, 1])
    assert view_slice(VOLUME, "axial", -1).shape == (5, 6)


@pytest.mark.parametrize("view", VIEWS)
def test_view_stack_lists_every_slice_in_order(view):
    stack = view_stack(VOLUME, view)
    assert len(stack) == {"axial": 4, "coronal": 5, "sagittal": 6}[view]
    for s in range(len(stack)):
        assert np.array_equal(stack[s], view_slice(VOLUME, view, s))


@pytest.mark.parametrize("view", VIEWS)
def test_place_view_map_is_the_exact_inverse(view):
    index = 2
    map2d = np.random.default_rng(0).normal(size=view_slice(VOLUME, view, index).shape)
    volume = place_view_map(map2d, view, index, VOLUME.shape)
    assert volume.shape == VOLUME.shape
    assert np.array_equal(view_slice(volume, view, index), map2d)
    # every voxel outside the slice stays zero
    assert np.count_nonzero(volume) == np.count_nonzero(map2d)
    # a full stack goes back voxel for voxel
    assert np.array_equal(place_view_map(view_stack(VOLUME, view), view, None, VOLUME.shape), VOLUME)


def test_place_view_map_puts_a_single_voxel_where_it_came_from():
    # one hot voxel at (z, y, x) = (1, 3, 4): each view's slice through it must restore the same voxel
    z, y, x = 1, 3, 4
    hot = np.zeros(VOLUME.shape)
    hot[z, y, x] = 1.0
    for view, index in (("axial", z), ("coronal", y), ("sagittal", x)):
        back = place_view_map(view_slice(hot, view, index), view, index, VOLUME.shape)
        assert np.array_equal(np.argwhere(back), [[z, y, x]])


def test_centre_index_is_the_reference_slice():
    assert centre_index((32, 32, 32), "axial") == 16
    assert centre_index((4, 5, 6), "sagittal") == 3


def test_bad_views_indices_and_shapes_are_named():
    with pytest.raises(ValueError, match="unknown view 'oblique'"):
        view_slice(VOLUME, "oblique", 0)
    with pytest.raises(IndexError, match="coronal slice 5 is outside"):
        view_slice(VOLUME, "coronal", 5)
    with pytest.raises(ValueError, match=r"must have shape \(4, 6\)"):
        place_view_map(np.ones((5, 6)), "coronal", 0, VOLUME.shape)
    with pytest.raises(ValueError, match="full axial stack"):
        place_view_map(np.ones((3, 5, 6)), "axial", None, VOLUME.shape)
    with pytest.raises(ValueError, match="3D"):
        view_slice(np.ones((3, 3)), "axial", 0)


def test_central_slices_are_the_centre_slice_of_each_view():
    slices = central_slices(VOLUME)
    assert [s.shape for s in slices] == [(5, 6), (4, 6), (4, 5)]
    for view, got in zip(VIEWS, slices):
        assert np.array_equal(got, view_slice(VOLUME, view, centre_index(VOLUME.shape, view)))
    assert np.array_equal(central_slices(VOLUME, ("coronal",))[0], VOLUME[:, 2, :])
