"""NIfTI volume helpers of the bundle: a view map's one-slice volume lies exactly where its slice of the crop lies."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ctcdam.export.volumes import slab_on_grid


def _grid(seed: int, oblique: bool) -> sitk.Image:
    rng = np.random.default_rng(seed)
    grid = sitk.Image([24, 20, 16], sitk.sitkFloat32)
    grid.SetOrigin(tuple(float(v) for v in rng.normal(0.0, 200.0, 3)))
    grid.SetSpacing(tuple(float(v) for v in rng.uniform(0.3, 2.5, 3)))
    if oblique:
        grid.SetDirection(tuple(float(v) for v in np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel()))
    return grid


@pytest.mark.parametrize("seed", range(6))
def test_slab_geometry_is_that_of_region_of_interest(seed):
    grid = _grid(seed, oblique=bool(seed % 2))
    shape_zyx = grid.GetSize()[::-1]
    for axis, index in itertools.product(range(3), (0, 5, -1)):
        index = index % shape_zyx[axis]
        values = np.random.default_rng(seed).normal(size=[n for i, n in enumerate(shape_zyx) if i != axis])
        slab = slab_on_grid(values.astype(np.float32), grid, axis, index)
        size, start = list(grid.GetSize()), [0, 0, 0]
        size[2 - axis], start[2 - axis] = 1, index
        reference = sitk.RegionOfInterest(grid, size, start)
        assert slab.GetSize() == reference.GetSize()
        # bit for bit: the bundle's view maps must not move by a rounding error
        assert slab.GetOrigin() == reference.GetOrigin()
        assert slab.GetSpacing() == reference.GetSpacing() and slab.GetDirection() == reference.GetDirection()
        assert np.array_equal(np.squeeze(sitk.GetArrayFromImage(slab), axis), values.astype(np.float32))


def test_slab_outside_the_grid_is_an_error():
    with pytest.raises(IndexError):
        slab_on_grid(np.zeros((20, 24), np.float32), _grid(0, False), 0, 16)

