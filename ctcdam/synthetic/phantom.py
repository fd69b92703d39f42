"""A chest phantom in Hounsfield units and nodules painted from real LIDC annotation clusters.

No library draws a CT phantom at a given DICOM grid with LIDC annotations inside it, so this
module is hand-written (research/lidc.md §5). Arrays use pylidc's index order (i = row, j = column,
k = index into ``scan.slice_zvals``) so that pylidc's masks land on the painted voxels by construction.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctcdam.lidc.pylidc_compat import consensus

ROWS = COLUMNS = 512

AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
LUNG_HU = -850
BONE_HU = 500

CALCIFIED_HU = 450
#: internalStructure 2 fluid, 3 fat, 4 air; 1 (soft tissue) is painted by texture instead.
INTERNAL_STRUCTURE_HU = {2: 10, 3: -90, 4: -950}
#: median texture 1 (ground glass) .. 5 (solid); half-integer medians are interpolated.
TEXTURE_HU = (-650, -450, -250, -60, 30)
CALCIFICATION_ABSENT = 6
CONSENSUS_LEVEL = 0.5


@dataclass(frozen=True)
class PaintedNodule:
    """One annotation cluster as painted: consensus mask in pylidc (i, j, k) index space and its HU."""

    annotations: tuple[Any, ...]
    mask: np.ndarray  # bool, shape of the bbox
    bbox: tuple[slice, slice, slice]
    hu: int

    @property
    def k_range(self) -> range:
        """Indices into ``scan.slice_zvals`` that the consensus mask spans."""
        return range(self.bbox[2].start, self.bbox[2].stop)


def _inside_ellipse(u: np.ndarray, v: np.ndarray, centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    return ((u - centre[0]) / axes[0]) ** 2 + ((v - centre[1]) / axes[1]) ** 2 <= 1.0


def chest_phantom_slice(rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """One axial slice of the chest phantom, int16 HU, indexed (row, column); anterior at row 0."""
    # Shapes are placed in fractions of the field of view, not in mm: the reconstruction FOV is
    # fitted to the patient, so the real annotation positions land inside the phantom lungs for
    # any pixel spacing far more often than with a fixed-size body.
    v, u = np.meshgrid(
        (np.arange(rows) - (rows - 1) / 2) / (rows / 2),
        (np.arange(columns) - (columns - 1) / 2) / (columns / 2),
        indexing="ij",
    )
    hu = np.full((rows, columns), AIR_HU, dtype=np.int16)
    hu[_inside_ellipse(u, v, (0.0, 0.05), (0.95, 0.76))] = FAT_HU
    hu[_inside_ellipse(u, v, (0.0, 0.05), (0.89, 0.70))] = SOFT_TISSUE_HU
    for side in (-1.0, 1.0):
        hu[_inside_ellipse(u, v, (side * 0.45, 0.08), (0.38, 0.60))] = LUNG_HU
    hu[_inside_ellipse(u, v, (0.0, 0.55), (0.10, 0.10))] = BONE_HU
    return hu


def _majority(values: Sequence[int]) -> int:
    """Most common code; ties go to the lowest code (deterministic whatever the annotation order)."""
    counts = Counter(values)
    best = max(counts.values())
    return min(code for code, n in counts.items() if n == best)


def painted_hu(cluster: Sequence[Any]) -> int:
    """The HU a cluster of pylidc annotations is painted with (calcification, internal structure, texture)."""
    if not cluster:
        raise ValueError("painted_hu needs at least one annotation")
    n_calcified = sum(int(a.calcification) != CALCIFICATION_ABSENT for a in cluster)
    if 2 * n_calcified > len(cluster):
        return CALCIFIED_HU
    structure = _majority([int(a.internalStructure) for a in cluster])
    if structure in INTERNAL_STRUCTURE_HU:
        return INTERNAL_STRUCTURE_HU[structure]
    texture = float(np.median([int(a.texture) for a in cluster]))
    return int(round(float(np.interp(texture, np.arange(1, 6), TEXTURE_HU))))


def painted_nodules(scan: Any) -> list[PaintedNodule]:
    """Every annotation cluster of a pylidc scan (any size) with its consensus mask (clevel 0.5) and HU."""
    nodules = []
    for cluster in scan.cluster_annotations(verbose=False):
        mask, bbox, _ = consensus(cluster, clevel=CONSENSUS_LEVEL)
        nodules.append(PaintedNodule(tuple(cluster), mask.astype(bool), tuple(bbox), painted_hu(cluster)))
    return nodules


def paint_slice(base: np.ndarray, k: int, nodules: Sequence[PaintedNodule]) -> np.ndarray:
    """The phantom slice k (index into ``scan.slice_zvals``) with the nodules that cross it; later clusters win."""
    hu = base.copy()
    for nodule in nodules:
        if k in nodule.k_range:
            rows, columns, slices = nodule.bbox
            region = hu[rows, columns]
            region[nodule.mask[:, :, k - slices.start]] = nodule.hu
    return hu
