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
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist, pdist

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.nodules import (
    MAX_READERS,
    AnnotationFeatures,
    Cluster,
    annotation_features,
)

#: pylidc's cluster_annotations defaults (metric "min"): shrink factor and the smallest tolerance tried.
_CLUSTER_FACTOR, _CLUSTER_MIN_TOL = 0.9, 1e-1
#: Up to this many point pairs cdist is faster than a k-d tree search.
_CDIST_PAIRS = 20_000


def _least_distance(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    """The least distance between two point sets (``cdist(a, b).min()``) when it is <= tol, else a value > tol.

    Clustering compares the distances only with tol and smaller ones, so a larger distance need not be exact. For
    many points, a shared point (integer (i, j, k) keys) gives 0 at once, and otherwise a k-d tree search bounded
    by tol finds the same least distance as cdist (sqrt of the same integer sum) without computing every pair."""
    if len(a) * len(b) <= _CDIST_PAIRS:
        return float(cdist(a, b).min())
    # readers' outlines of one nodule mostly share a point: the least distance is then exactly 0
    low = np.minimum(a.min(axis=0), b.min(axis=0))
    span = np.maximum(a.max(axis=0), b.max(axis=0)) - low + 1
    keys_a, keys_b = (((p[:, 0] - low[0]) * span[1] + p[:, 1] - low[1]) * span[2] + p[:, 2] - low[2] for p in (a, b))
    if np.isin(keys_a, keys_b).any():
        return 0.0
    nearest, _ = cKDTree(b).query(a, k=1, distance_upper_bound=tol * (1 + 1e-6) + 1e-9)
    return float(nearest.min())  # inf when no pair is within the bound


def _inside_blocks(polygons: Sequence[np.ndarray], origin: np.ndarray, shape: tuple[int, int]) -> list:
    """Per closed polygon, pylidc's ``Path(polygon, closed=True).contains_points`` over the (i, j) grid of a box
    (``origin`` its first point, ``shape`` its size), as ((row slice, column slice), mask) of the polygon's own
    bounding box within the box, or None when that is empty.

    Only the points inside a polygon's bounding box are tested (exact, checked against pylidc's consensus in
    tests/test_scan_annotations.py): matplotlib's per-point crossing test finds no crossing, or an even number,
    for a point outside the box of the vertices. One call per polygon: matplotlib tests every point against every
    edge of the path it is given, so a path made of all of an annotation's contours cost 4x more (96 vs 24 ms for
    the 32 annotations of three default scans)."""
    blocks: list = [None] * len(polygons)
    for n, points in enumerate(polygons):
        low = np.maximum(points.min(axis=0) - origin, 0)
        high = np.minimum(points.max(axis=0) - origin, np.asarray(shape) - 1)
        if np.any(low > high):
            continue
        rows = np.arange(low[0], high[0] + 1) + origin[0]
        columns = np.arange(low[1], high[1] + 1) + origin[1]
        grid = np.empty((rows.size * columns.size, 2), dtype=np.int64)
        grid[:, 0] = np.repeat(rows, columns.size)  # row-major, as np.indices' flattened grid
        grid[:, 1] = np.tile(columns, rows.size)
        found = mplpath.Path(points, closed=True).contains_points(grid)
        blocks[n] = (slice(low[0], high[0] + 1), slice(low[1], high[1] + 1)), found.reshape(rows.size, columns.size)
    return blocks


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
    lines = coords.split("\n")
    if all(line.count(",") == 1 for line in lines):  # one pair per line: the same ints, parsed in one pass
        pairs = np.fromiter(map(int, coords.replace("\n", ",").split(",")), dtype=np.int64, count=2 * len(lines))
        return pairs.reshape(-1, 2)[:, ::-1].copy()
    return np.array([[int(cc) for cc in c.split(",")][::-1] for c in lines])  # pylidc's own parse (it fails alike)


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
        # The boxes' distance is a lower bound of the points' distance; tol only shrinks, so a pair whose boxes
        # are farther apart than tol is never adjacent and its exact distance is not needed. (The coordinates are
        # integers: the squared gaps are exact, whichever order numpy sums them in.)
        gaps = np.sqrt(np.square(np.maximum(0.0, np.maximum(low[:, None] - high[None], low[None] - high[:, None])))
                       .sum(axis=-1))
        for i in range(n):
            for j in range(i + 1, n):
                distance = np.inf if gaps[i, j] > tol else _least_distance(matrices[i], matrices[j], tol)
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
        # inclusion regions on first, then exclusion regions off, each contour in pylidc's order
        ordered = [c for inclusion in (True, False) for c in contours if c.inclusion == inclusion]
        polygons = []
        for contour in ordered:
            points = contour.ij
            if (points[0] != points[-1]).any():
                points = np.append(points, points[0].reshape(1, 2), axis=0)
            polygons.append(points)
        for contour, points, block in zip(ordered, polygons, _inside_blocks(polygons, bbox[:2, 0], (ni, nj))):
            zi = index_of_z[contour.z] - bbox[2, 0]
            if block is not None:  # outside its block a contour's inside is empty: the mask keeps its values there
                (rows, columns), inside = block
                if contour.inclusion:
                    mask[rows, columns, zi] |= inside
                else:
                    mask[rows, columns, zi] &= ~inside
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


def scan_annotations(scan: Any, records: pylidc_compat.ScanRecords | None = None) -> ScanAnnotations:
    """Read a pylidc Scan's annotations and contours once (one query for all contours) and parse them;
    with ``records`` (the scan's ``ScanRecords``, ``scan`` one of its records) the contours they read are used."""
    slice_zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    annotations = tuple(scan.annotations)
    rows: dict[int, list[ContourPoints]] = {a.id: [] for a in annotations}
    read = records.contour_rows if records is not None else _contour_rows
    for annotation_id, contour_id, inclusion, z, coords in read([a.id for a in annotations]):
        k = int(np.abs(slice_zvals - z).argmin())
        rows[annotation_id].append(ContourPoints(contour_id, bool(inclusion), float(z), k, _parse_ij(coords)))
    contours = {annotation_id: tuple(found) for annotation_id, found in rows.items()}
    matrices = {}
    for annotation_id, found in contours.items():
        by_z = sorted(found, key=lambda c: c.z)  # stable: equal z keeps the id order, as pylidc's sorted()
        matrices[annotation_id] = np.vstack([np.c_[c.ij, np.full(c.ij.shape[0], c.k)].astype(int) for c in by_z])
    return ScanAnnotations(scan=scan, annotations=annotations, contours=contours, matrices=matrices,
                           n_slices=len(slice_zvals))
