"""Physical-space operations on crop arrays (z, y, x) with their voxel spacing in mm."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dilate_mask(mask_zyx: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float = 1.0) -> np.ndarray:
    """A (z, y, x) mask grown by every voxel whose centre lies within ``radius_mm`` of a mask voxel (physical)."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive (z, y, x) values in mm, got {spacing_zyx}")
    reach = np.floor(radius_mm / spacing + 1e-9).astype(int)
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1) * spacing
    ball = np.linalg.norm(offsets, axis=-1) <= radius_mm + 1e-9
    return ndimage.binary_dilation(np.asarray(mask_zyx) > 0, structure=ball)
