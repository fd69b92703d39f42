"""NIfTI volumes of a bundle: the CT and the CDAM maps, written by SimpleITK so that qform == sform."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def image_on_grid(values_zyx: np.ndarray, grid: sitk.Image, dtype: type = np.float32) -> sitk.Image:
    """A SimpleITK image holding a (z, y, x) array with the geometry of ``grid`` (shapes must match)."""
    expected = tuple(reversed(grid.GetSize()))
    if values_zyx.shape != expected:
        raise ValueError(f"array of shape {values_zyx.shape} does not fit a grid of (z, y, x) shape {expected}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(values_zyx, dtype=dtype))
    image.CopyInformation(grid)
    return image


def ct_volume(ct: sitk.Image) -> sitk.Image:
    """The CT as int16 HU (values outside the int16 range are clipped, which no CT reaches)."""
    if ct.GetPixelID() == sitk.sitkInt16:
        return ct
    return sitk.Cast(sitk.Clamp(ct, sitk.sitkFloat32, -32768, 32767), sitk.sitkInt16)


def write_volume(image: sitk.Image, path: Path) -> Path:
    """Write a volume with SimpleITK (NIfTI: qform_code = sform_code = 1, identical matrices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def symmetric_window(image: sitk.Image) -> float:
    """Half-width of a window centred at zero that shows the whole signed range (max |v|, at least 1e-12)."""
    values = sitk.GetArrayViewFromImage(image)
    return float(max(np.abs(values).max(initial=0.0), 1e-12))


def slab_on_grid(values_2d: np.ndarray, grid: sitk.Image, axis_zyx: int, index: int) -> sitk.Image:
    """A one-slice volume holding a 2D map at slice ``index`` along (z, y, x) axis ``axis_zyx`` of ``grid``,
    with the geometry of that slice of the grid (so it opens in Slicer exactly where the slice lies)."""
    size, start = list(grid.GetSize()), [0, 0, 0]
    itk_axis = 2 - axis_zyx  # SimpleITK indexes (x, y, z)
    size[itk_axis], start[itk_axis] = 1, int(index)
    slab = sitk.RegionOfInterest(grid, size, start)
    return image_on_grid(np.expand_dims(np.asarray(values_2d), axis_zyx), slab)
