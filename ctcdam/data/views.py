"""The three orthogonal views of a crop array a[z, y, x]: slicing, and placing 2D maps back exactly.

One definition for the whole package: axial = a[s, :, :], coronal = a[:, s, :], sagittal = a[:, :, s].
Training, explanation and export all go through these functions, so a 2D map computed on a view slice
lands on the crop voxels it came from.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

#: The three orthogonal views of a crop, in the order used everywhere.
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: Array axis of a (z, y, x) volume that each view slices along.
VIEW_AXIS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}


def view_axis(view: str) -> int:
    """Axis of a (z, y, x) array that `view` slices along (ValueError naming the valid views)."""
    try:
        return VIEW_AXIS[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; valid views: {', '.join(VIEWS)}") from None


def _as_volume(volume_zyx: ArrayLike) -> np.ndarray:
    volume = np.asarray(volume_zyx)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) volume, got an array of shape {volume.shape}")
    return volume


def _checked_index(index: int, view: str, shape_zyx: Sequence[int]) -> int:
    size = int(shape_zyx[view_axis(view)])
    if not -size <= int(index) < size:
        raise IndexError(f"{view} slice {index} is outside a volume of shape {tuple(shape_zyx)} ({size} {view} slices)")
    return int(index) % size


def view_slice(volume_zyx: ArrayLike, view: str, index: int) -> np.ndarray:
    """The 2D slice `index` of a (z, y, x) volume in `view` (a numpy view, not a copy)."""
    volume = _as_volume(volume_zyx)
    # basic indexing (not np.take) so the result is a view: place_view_map writes through it
    where = [slice(None)] * 3
    where[view_axis(view)] = _checked_index(index, view, volume.shape)
    return volume[tuple(where)]


def view_stack(volume_zyx: ArrayLike, view: str) -> np.ndarray:
    """All slices of `view` as an (n, h, w) stack; stack[s] == view_slice(volume, view, s)."""
    return np.moveaxis(_as_volume(volume_zyx), view_axis(view), 0)


def centre_index(shape_zyx: Sequence[int], view: str) -> int:
    """Index of the central slice of `view` (n // 2, slice 16 of a 32-voxel crop as in the reference work)."""
    return int(shape_zyx[view_axis(view)]) // 2


def central_slices(volume_zyx: ArrayLike, views: Sequence[str] = VIEWS) -> list[np.ndarray]:
    """The central slice of each view (the images that evaluation and test-time prediction average over)."""
    volume = _as_volume(volume_zyx)
    return [view_slice(volume, view, centre_index(volume.shape, view)) for view in views]


def view_shape(shape_zyx: Sequence[int], view: str) -> tuple[int, int]:
    """(h, w) of one slice of `view` for a volume of shape (z, y, x)."""
    axis = view_axis(view)
    return tuple(int(n) for i, n in enumerate(shape_zyx) if i != axis)  # type: ignore[return-value]


def place_view_map(
    map2d_or_stack: ArrayLike, view: str, index: int | None, shape_zyx: Sequence[int]
) -> np.ndarray:
    """Put a 2D map at slice `index` of a zero (z, y, x) volume, or a full (n, h, w) stack back when index is None.

    The inverse of :func:`view_slice` / :func:`view_stack`: ``view_slice(place_view_map(m, v, s, shape), v, s) == m``.
    """
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3:
        raise ValueError(f"shape_zyx must have 3 entries (z, y, x), got {shape}")
    values = np.asarray(map2d_or_stack)
    volume = np.zeros(shape, dtype=np.result_type(values.dtype, np.float32))
    expected_slice = view_shape(shape, view)
    if index is None:
        expected = (shape[view_axis(view)], *expected_slice)
        if values.shape != expected:
            raise ValueError(f"a full {view} stack for a volume of shape {shape} must have shape {expected}, got {values.shape}")
        view_stack(volume, view)[...] = values
        return volume
    if values.shape != expected_slice:
        raise ValueError(f"a {view} slice map for a volume of shape {shape} must have shape {expected_slice}, got {values.shape}")
    view_slice(volume, view, _checked_index(index, view, shape))[...] = values
    return volume
