"""Slicer segmentation (``.seg.nrrd``): nodule masks on a sub-grid of the CT, with names, colours and tags.

The header keys are those of Slicer's ``vtkMRMLSegmentationStorageNode`` (research/conventions.md §1.2):
``Segment<i>_{ID,Name,Color,Tags,Extent,LabelValue,Layer,...}`` and ``Segmentation_*``. SimpleITK writes
custom metadata as ``key:=value`` lines, which is what Slicer's NRRD reader gives back to that storage node.
The file holds one layer (distinct label values per nodule) on the smallest CT sub-grid covering every mask;
``Segmentation_ReferenceImageExtentOffset`` tells Slicer where that sub-grid lies in the CT's voxel grid, and
the ``Reference image geometry`` conversion parameter names the whole CT lattice, so Slicer's Segment Editor
paints anywhere on the CT (without it, only inside the nodules' bounding box; research/slicer_core.md D5).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctcdam import io

log = logging.getLogger(__name__)

#: Slicer's tag serialisation splits on "|" and on the first ":" of each pair.
_TAG_FORBIDDEN = ("|",)
#: Slicer's description of the parameter (vtkSegmentationConverter), written as its own writer does.
_REFERENCE_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is created in course of "
    "conversion."
)


@dataclass(frozen=True)
class Segment:
    """One segment: a binary mask (any grid; voxels > 0 are inside) and how Slicer should show it."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    mask: sitk.Image
    tags: Mapping[str, str] = field(default_factory=dict)


def _index_box_on(reference: sitk.Image, image: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (x, y, z) index box of ``reference`` voxels covering the physical extent of ``image``."""
    size = np.array(image.GetSize())
    corners = [
        reference.TransformPhysicalPointToContinuousIndex(
            image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        )
        for corner in itertools.product(*[(-0.5, s - 0.5) for s in size])
    ]
    corners_array = np.array(corners)
    low = np.maximum(np.floor(corners_array.min(axis=0) + 0.5).astype(int), 0)
    high = np.minimum(np.ceil(corners_array.max(axis=0) - 0.5).astype(int), np.array(reference.GetSize()) - 1)
    if np.any(high < low):
        return None
    return low, high


def _sub_grid(reference: sitk.Image, low: np.ndarray, high: np.ndarray) -> sitk.Image:
    """The reference's geometry restricted to an inclusive (x, y, z) index box (origin moved, spacing kept)."""
    grid = sitk.Image([int(v) for v in high - low + 1], sitk.sitkUInt8)
    grid.SetSpacing(reference.GetSpacing())
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in low]))
    return grid


def covering_grid(reference: sitk.Image, image: sitk.Image) -> sitk.Image | None:
    """The reference's lattice restricted to the voxels covering ``image``'s box (the sub-grid a mask of that box
    is placed on), or None when they do not overlap."""
    box = _index_box_on(reference, image)
    return None if box is None else _sub_grid(reference, *box)


def _mask_on_reference(mask: sitk.Image, reference: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """(low (x, y, z) index, (z, y, x) boolean array) of a mask resampled onto the reference's voxel lattice."""
    box = _index_box_on(reference, mask)
    if box is None:
        return None
    low, high = box
    grid = _sub_grid(reference, low, high)
    # Nearest neighbour keeps the mask binary; on an identical lattice it copies the voxels unchanged.
    resampled = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return low, sitk.GetArrayFromImage(resampled) > 0


def _tags_string(tags: Mapping[str, str]) -> str:
    for key, value in tags.items():
        if ":" in key or any(c in key or c in str(value) for c in _TAG_FORBIDDEN):
            raise ValueError(f"segment tag {key!r}={value!r} contains ':' in the key or '|', which Slicer cannot read")
    return "".join(f"{key}:{value}|" for key, value in tags.items())


def _extent_string(array_zyx: np.ndarray, offset_zyx: Sequence[int] = (0, 0, 0)) -> str:
    """Slicer's inclusive 'i0 i1 j0 j1 k0 k1' (file voxel indices) of the nonzero voxels of a block that starts at
    ``offset_zyx`` in the file; empty = '0 -1 0 -1 0 -1'."""
    nonzero = np.argwhere(array_zyx)
    if nonzero.size == 0:
        return "0 -1 0 -1 0 -1"
    offset = np.asarray(offset_zyx, dtype=int)
    low, high = (nonzero.min(axis=0) + offset)[::-1], (nonzero.max(axis=0) + offset)[::-1]
    return " ".join(f"{lo} {hi}" for lo, hi in zip(low, high))


def reference_geometry_string(reference: sitk.Image) -> str:
    """Slicer's geometry string of a whole image: the 16 row-major IJK-to-RAS entries, then the inclusive extent.

    The matrix comes from SimpleITK's own index-to-physical mapping (LPS), turned to RAS by negating x and y.
    """
    origin = np.array(reference.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0)))
    columns = [np.array(reference.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in unit))) - origin
               for unit in np.eye(3)]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.stack(columns, axis=1)
    ijk_to_lps[:3, 3] = origin
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    entries = ";".join(repr(float(v) + 0.0) for v in ijk_to_ras.reshape(-1))  # + 0.0: no "-0.0"
    extent = ";".join(f"0;{int(n) - 1}" for n in reference.GetSize())
    return f"{entries};{extent};"


def segmentation_image(segments: Sequence[Segment], reference: sitk.Image) -> sitk.Image:
    """One uint8 layer on the CT sub-grid covering all masks, label value k+1 for segment k, with Slicer metadata."""
    placed = [_mask_on_reference(segment.mask, reference) for segment in segments]
    boxes = [(low, low + np.array(array.shape[::-1]) - 1) for low, array in (p for p in placed if p is not None)]
    if boxes:
        low = np.min([b[0] for b in boxes], axis=0)
        high = np.max([b[1] for b in boxes], axis=0)
    else:  # nothing to show: a 1-voxel image still carries the segment names (as Slicer itself writes)
        low = high = np.zeros(3, dtype=int)
    grid = _sub_grid(reference, low, high)
    labels = np.zeros(tuple(int(v) for v in (high - low + 1)[::-1]), dtype=np.uint8)
    # Each segment's extent from its own window: the whole layer is large, its masks are small.
    extents = ["0 -1 0 -1 0 -1"] * len(segments)
    for value, (segment, entry) in enumerate(zip(segments, placed), start=1):
        if entry is None:
            log.warning("segment %s lies outside the CT; it is written empty", segment.segment_id)
            continue
        mask_low, mask = entry
        start = (mask_low - low)[::-1]
        window = tuple(slice(int(s), int(s) + n) for s, n in zip(start, mask.shape))
        overlap = mask & (labels[window] > 0)
        if overlap.any():
            # One layer cannot hold overlapping segments; consensus masks of distinct nodules never overlap in
            # practice, so the first segment keeps the shared voxels and the overlap is reported.
            log.warning("segment %s overlaps an earlier segment in %d voxels", segment.segment_id, int(overlap.sum()))
        labels[window][mask & ~overlap] = value
        extents[value - 1] = _extent_string(mask & ~overlap, [w.start for w in window])

    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grid)
    metadata = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": " ".join(str(int(v)) for v in low),
        # "name|value|description&" per parameter, as vtkMRMLSegmentationStorageNode writes them.
        "Segmentation_ConversionParameters": (f"Reference image geometry|{reference_geometry_string(reference)}"
                                              f"|{_REFERENCE_GEOMETRY_DESCRIPTION}&"),
    }
    for k, segment in enumerate(segments):
        value, (red, green, blue) = k + 1, segment.color
        metadata |= {
            f"Segment{k}_ID": segment.segment_id,
            f"Segment{k}_Name": segment.name,
            f"Segment{k}_NameAutoGenerated": "0",
            f"Segment{k}_Color": f"{red:.6g} {green:.6g} {blue:.6g}",
            f"Segment{k}_ColorAutoGenerated": "0",
            f"Segment{k}_LabelValue": str(value),
            f"Segment{k}_Layer": "0",
            f"Segment{k}_Extent": extents[k],
            f"Segment{k}_Tags": _tags_string(segment.tags),
        }
    for key, text in metadata.items():
        image.SetMetaData(key, text)
    return image


def write_segmentation(segments: Sequence[Segment], reference: sitk.Image, path: Path) -> Path:
    """Write ``segments`` as a Slicer ``.seg.nrrd`` on a sub-grid of ``reference`` (the CT)."""
    if not str(path).endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    return io.write_image(path, segmentation_image(segments, reference))
