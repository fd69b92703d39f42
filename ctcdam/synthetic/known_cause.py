"""The known-cause synthetic set: malignancy follows a sign painted into the image, and the sign is saved as a mask.

The same real LIDC annotation geometry and phantom chest as the default set, but every nodule with at least
three annotations carries, independently of its size and drawn from a seeded generator per nodule:

- **spicules** (p = 0.5): 5-7 thin soft-tissue spikes (radius 1.1 mm, 6-10 mm long) from one part of the margin
  (within +-60 degrees of one direction), as fins through the nodule's z extent: the evidence of malignancy;
- **popcorn calcification** (p = 0.35): 2-3 calcified foci (500 HU, radius 1.5-3 mm) inside the nodule, off its
  centre: the benign pattern, which overrides the spicules;
- **a vessel** (p = 0.5): a soft-tissue tube (radius 1.5 mm) running cranio-caudally 3-6 mm outside the margin:
  a distractor that carries no label information.

The rule: malignant exactly when spicules are painted and calcification is not. The biomarker targets follow
the signs (spiculation 4.5 with spicules, else 1; calcification 1 = popcorn when calcified, else 6 = absent);
the nodule itself is painted by its readers' texture only (no real calcification, fat or fluid), so no other
cue carries the label. The other biomarkers keep the readers' values (they have no known cause here).

Each sign is a geometric primitive in LPS millimetres, so the painted voxels of the DICOM series and the cause
masks on any grid (a nodule crop, the CT) come from the same function and agree by construction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctcdam.lidc.nodules import nodule_id, scan_clusters
from ctcdam.lidc.pylidc_compat import consensus
from ctcdam.synthetic.phantom import CONSENSUS_LEVEL, SOFT_TISSUE_HU, TEXTURE_HU, PaintedNodule

#: Bump when the painting changes: series written by another version are refused, never reused.
KNOWN_CAUSE_VERSION = 2
#: Probabilities of the signs, each drawn independently per nodule.
P_SPICULES, P_CALCIFIED, P_VESSEL = 0.5, 0.35, 0.5
SPICULE_HU, CALCIFIED_FOCUS_HU, VESSEL_HU = 20, 500, SOFT_TISSUE_HU
#: Spikes two pixels wide at LIDC pixel spacings (0.5-0.98 mm), so that the 1 mm crops still show them.
SPICULE_RADIUS_MM, VESSEL_RADIUS_MM = 1.1, 1.5
#: Nodules with this many annotations get signs (the training population).
MIN_ANNOTATIONS = 3
#: Cause mask names (files ``<nodule_id>_cause_<name>.nii.gz``) and what they mean for malignancy.
CAUSES: dict[str, str] = {"spicules": "evidence", "calcification": "counter-evidence", "vessel": "distractor"}


@dataclass(frozen=True)
class Ribbon:
    """A thin in-plane segment (x, y in mm) extended over a z range: one spike of a spiculated margin."""

    start_xy: tuple[float, float]
    end_xy: tuple[float, float]
    z_range: tuple[float, float]
    radius: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest LPS corner of a box around it."""
        xy = np.array([self.start_xy, self.end_xy])
        return (np.array([*(xy.min(0) - self.radius), self.z_range[0]]),
                np.array([*(xy.max(0) + self.radius), self.z_range[1]]))

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether LPS points (N, 3) lie inside."""
        a, b = np.asarray(self.start_xy), np.asarray(self.end_xy)
        ab = b - a
        t = np.clip(((points[:, :2] - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        distance = np.linalg.norm(points[:, :2] - (a + t[:, None] * ab), axis=1)
        return (distance <= self.radius) & (points[:, 2] >= self.z_range[0]) & (points[:, 2] <= self.z_range[1])


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid (mm): a calcified focus, at least half a slice thick so no slice misses it."""

    centre: tuple[float, float, float]
    radius_xy: float
    radius_z: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest LPS corner of a box around it."""
        extent = np.array([self.radius_xy, self.radius_xy, self.radius_z])
        return np.asarray(self.centre) - extent, np.asarray(self.centre) + extent

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether LPS points (N, 3) lie inside."""
        d = points - np.asarray(self.centre)
        return (d[:, 0] ** 2 + d[:, 1] ** 2) / self.radius_xy**2 + d[:, 2] ** 2 / self.radius_z**2 <= 1.0


@dataclass(frozen=True)
class Tube:
    """A 3D capsule (mm): a vessel."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest LPS corner of a box around it."""
        ends = np.array([self.start, self.end])
        return ends.min(0) - self.radius, ends.max(0) + self.radius

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether LPS points (N, 3) lie inside."""
        a, b = np.asarray(self.start), np.asarray(self.end)
        ab = b - a
        t = np.clip(((points - a) @ ab) / float(ab @ ab), 0.0, 1.0)
        return np.linalg.norm(points - (a + t[:, None] * ab), axis=1) <= self.radius


Primitive = Ribbon | Ellipsoid | Tube


@dataclass(frozen=True)
class NoduleSigns:
    """The signs painted on one nodule, its known-cause labels, and the primitives of each cause."""

    nodule_id: str
    nodule_index: int  # position of its painted nodule in known_cause_nodules' list
    spicules: bool
    calcified: bool
    vessel: bool
    hu: int
    causes: dict[str, tuple[Primitive, ...]] = field(default_factory=dict)

    @property
    def malignant(self) -> bool:
        """The rule: spicules and no calcification."""
        return self.spicules and not self.calcified

    def labels(self) -> dict[str, Any]:
        """Manifest label columns that the signs decide (the other biomarkers keep the readers' values)."""
        return {
            "malignancy_median": 4.5 if self.malignant else 1.5,
            "malignancy_label": int(self.malignant),
            "spiculation": 4.5 if self.spicules else 1.0,
            "calcification": 1.0 if self.calcified else 6.0,
            "calcification_mode": 1 if self.calcified else 6,
            "calcified": self.calcified,
            "sign_spicules": self.spicules,
            "sign_calcified": self.calcified,
            "sign_vessel": self.vessel,
        }

    def mask(self, cause: str, points: np.ndarray) -> np.ndarray:
        """Whether LPS points (N, 3) belong to the voxels of one cause (all False when it is not painted)."""
        inside = np.zeros(len(points), dtype=bool)
        for primitive in self.causes.get(cause, ()):
            inside |= primitive.contains(points)
        return inside


@dataclass(frozen=True)
class ScanGeometry:
    """Physical positions of the phantom series' voxels (identity orientation, as the writer writes it)."""

    origin_xy: tuple[float, float]
    pixel_spacing: float
    zvals: np.ndarray

    @classmethod
    def of(cls, scan: Any) -> ScanGeometry:
        """The geometry ``ctcdam.synthetic.writer`` gives a scan's series."""
        ps = float(scan.pixel_spacing)
        return cls((-255.5 * ps, -255.5 * ps), ps, np.asarray(scan.slice_zvals, dtype=float))

    def points(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) of pylidc indices (row i, column j, slice k)."""
        return np.stack([self.origin_xy[0] + np.asarray(j) * self.pixel_spacing,
                         self.origin_xy[1] + np.asarray(i) * self.pixel_spacing, self.zvals[np.asarray(k)]], axis=1)

    @property
    def slice_spacing(self) -> float:
        """Median distance between slices (mm)."""
        return float(np.median(np.abs(np.diff(self.zvals)))) if len(self.zvals) > 1 else 1.0


def texture_hu(cluster: Sequence[Any]) -> int:
    """The HU of a nodule of the known-cause set: its readers' median texture only (ground glass .. solid)."""
    texture = float(np.median([int(a.texture) for a in cluster]))
    return int(round(float(np.interp(texture, np.arange(1, 6), TEXTURE_HU))))


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _exit_distance(mask_points: np.ndarray, centre_xy: np.ndarray, direction: np.ndarray, step: float) -> float:
    """How far from ``centre_xy`` along ``direction`` the nodule's in-plane footprint ends (mm)."""
    along = (mask_points - centre_xy) @ direction
    across = np.abs((mask_points - centre_xy) @ np.array([-direction[1], direction[0]]))
    on_ray = along[(across <= step) & (along >= 0)]
    return float(on_ray.max()) if on_ray.size else 0.0


def plan_signs(
    painted: PaintedNodule, index: int, nid: str, geometry: ScanGeometry, rng: np.random.Generator
) -> NoduleSigns:
    """Draw the signs of one nodule and lay out their primitives around its consensus mask."""
    spicules, calcified, vessel = (bool(rng.random() < p) for p in (P_SPICULES, P_CALCIFIED, P_VESSEL))
    i, j, k = np.nonzero(painted.mask)
    rows, columns, slices = painted.bbox
    points = geometry.points(i + rows.start, j + columns.start, k + slices.start)
    centre = points.mean(axis=0)
    radius = max(float(np.cbrt(len(points) * geometry.pixel_spacing**2 * geometry.slice_spacing * 3 / (4 * np.pi))),
                 1.0)
    half_slice = geometry.slice_spacing / 2
    near_centre = points[np.abs(points[:, 2] - centre[2]) <= max(half_slice, 1.0)]
    footprint = (near_centre if len(near_centre) else points)[:, :2]
    causes: dict[str, list[Primitive]] = {name: [] for name in CAUSES}
    # Draws happen whether or not a sign is painted, so each sign's layout does not depend on the others.
    azimuth = rng.uniform(0, 2 * np.pi)
    spike_draws = [(azimuth + rng.uniform(-np.pi / 3, np.pi / 3), rng.uniform(6.0, 10.0))
                   for _ in range(rng.integers(5, 8))]
    focus_draws = [(rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.55), rng.uniform(-0.5, 0.5))
                   for _ in range(rng.integers(2, 4))]
    vessel_draw = (rng.uniform(0, 2 * np.pi), rng.uniform(3.0, 6.0), rng.uniform(-0.4, 0.4, size=2))
    if spicules:
        # Fins through the nodule's whole z extent: every axial slice of the nodule shows the spiculated margin.
        z_range = (float(points[:, 2].min()) - half_slice, float(points[:, 2].max()) + half_slice)
        for angle, length in spike_draws:
            direction = _unit(angle)
            edge = _exit_distance(footprint, centre[:2], direction, geometry.pixel_spacing)
            start = centre[:2] + direction * max(edge - 0.5, 0.0)
            end = centre[:2] + direction * (edge + length)
            causes["spicules"].append(Ribbon(tuple(start), tuple(end), z_range, SPICULE_RADIUS_MM))
    if calcified:
        focus_radius = float(np.clip(0.3 * radius, 1.5, 3.0))
        for angle, fraction, dz in focus_draws:
            xy = centre[:2] + _unit(angle) * fraction * radius
            focus = (float(xy[0]), float(xy[1]), float(centre[2] + dz * min(radius, 2 * half_slice)))
            causes["calcification"].append(Ellipsoid(focus, focus_radius, max(focus_radius, half_slice + 0.5)))
    if vessel:
        angle, gap, tilt = vessel_draw
        passing = centre + np.array([*(_unit(angle) * (radius + gap + VESSEL_RADIUS_MM)), 0.0])
        direction = np.array([tilt[0], tilt[1], 1.0]) / np.linalg.norm([tilt[0], tilt[1], 1.0])
        causes["vessel"].append(Tube(tuple(passing - 40 * direction), tuple(passing + 40 * direction), VESSEL_RADIUS_MM))
    return NoduleSigns(nid, index, spicules, calcified, vessel, texture_hu(painted.annotations),
                       {name: tuple(shapes) for name, shapes in causes.items()})


def known_cause_nodules(scan: Any, seed: int) -> tuple[list[PaintedNodule], list[NoduleSigns]]:
    """Every cluster painted by texture only, and the signs of those with >= MIN_ANNOTATIONS annotations."""
    geometry = ScanGeometry.of(scan)
    painted: list[PaintedNodule] = []
    signs: list[NoduleSigns] = []
    for index, cluster in enumerate(scan_clusters(scan)):
        mask, bbox, _ = consensus(list(cluster.annotations), clevel=CONSENSUS_LEVEL)
        nodule = PaintedNodule(tuple(cluster.annotations), mask.astype(bool), tuple(bbox), texture_hu(cluster.annotations))
        painted.append(nodule)
        if len(cluster.annotations) >= MIN_ANNOTATIONS:
            nid = nodule_id(scan.patient_id, index)
            # One generator per (seed, scan, nodule): a nodule's signs do not depend on the other nodules.
            rng = np.random.default_rng([seed, int(scan.id), index])
            signs.append(plan_signs(nodule, index, nid, geometry, rng))
    return painted, signs


_PAINT_ORDER = (("vessel", VESSEL_HU), ("spicules", SPICULE_HU), ("calcification", CALCIFIED_FOCUS_HU))
#: Causes that lie outside the nodule: neither painted over it nor counted in its voxels.
OUTSIDE_THE_NODULE = ("spicules", "vessel")


def _nodule_pixels(painted: PaintedNodule, k: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """The nodule's consensus pixels of slice k inside a (row, column) window, as a bool array of the window."""
    i0, i1, j0, j1 = window
    inside = np.zeros((i1 - i0, j1 - j0), dtype=bool)
    rows, columns, slices = painted.bbox
    if not slices.start <= k < slices.stop:
        return inside
    mask = painted.mask[:, :, k - slices.start]
    r0, r1 = max(rows.start, i0), min(rows.stop, i1)
    c0, c1 = max(columns.start, j0), min(columns.stop, j1)
    if r0 < r1 and c0 < c1:
        inside[r0 - i0:r1 - i0, c0 - j0:c1 - j0] = mask[r0 - rows.start:r1 - rows.start, c0 - columns.start:c1 - columns.start]
    return inside


def paint_signs(
    hu: np.ndarray, k: int, geometry: ScanGeometry, signs: Sequence[NoduleSigns], painted: Sequence[PaintedNodule]
) -> np.ndarray:
    """Paint the signs that cross slice k onto an already painted slice (vessel under spikes under foci)."""
    z = geometry.zvals[k]
    ps, (x0, y0) = geometry.pixel_spacing, geometry.origin_xy
    for cause, value in _PAINT_ORDER:
        for nodule in signs:
            for primitive in nodule.causes.get(cause, ()):
                low, high = primitive.bounds()
                if not low[2] <= z <= high[2]:
                    continue
                # Only the pixels of the primitive's bounding box are tested: a slice has 262,144.
                j0, j1 = (int(np.clip(np.floor((v - x0) / ps), 0, hu.shape[1])) for v in (low[0], high[0] + ps))
                i0, i1 = (int(np.clip(np.floor((v - y0) / ps), 0, hu.shape[0])) for v in (low[1], high[1] + ps))
                if i0 >= i1 or j0 >= j1:
                    continue
                i, j = np.mgrid[i0:i1, j0:j1]
                inside = primitive.contains(geometry.points(i.ravel(), j.ravel(), np.full(i.size, k)))
                window = hu[i0:i1, j0:j1]
                inside = inside.reshape(window.shape)
                if cause in OUTSIDE_THE_NODULE:
                    for other in painted:  # spikes and vessels run in the lung, never over a nodule
                        inside &= ~_nodule_pixels(other, k, (i0, i1, j0, j1))
                window[inside] = value
    return hu


def cause_mask_image(
    signs: NoduleSigns, cause: str, reference: sitk.Image, nodule_mask: sitk.Image | None = None
) -> sitk.Image:
    """The voxels of one cause on the grid of ``reference`` (uint8, with its geometry).

    ``nodule_mask`` (the nodule's consensus mask on the same grid) is cut out of the causes that lie outside
    the nodule, as the painting leaves the nodule's own voxels alone.
    """
    size = reference.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).reshape(-1, 3)
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    points = np.asarray(reference.GetOrigin()) + (index * np.asarray(reference.GetSpacing())) @ direction.T
    inside = np.ascontiguousarray(signs.mask(cause, points).reshape(size).transpose(2, 1, 0))  # (z, y, x)
    if nodule_mask is not None and cause in OUTSIDE_THE_NODULE:
        inside &= sitk.GetArrayFromImage(nodule_mask) == 0
    image = sitk.GetImageFromArray(inside.astype(np.uint8))
    image.CopyInformation(reference)
    return image
