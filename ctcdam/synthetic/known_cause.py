"""The known-cause synthetic set: malignancy follows a sign painted into the image, and the sign is saved as a mask.

The same real LIDC annotation geometry and phantom chest as the default set, but every nodule with at least
three annotations carries, independently of its size and drawn from a seeded generator per nodule:

- **spicules** (p = 0.5): 6 thin soft-tissue spikes (radius 1.1 mm, 6-10 mm long) from one part of the margin
  (within +-60 degrees of one direction), two in each view plane, extruded as fins through the nodule's
  extent, so every slice of every view through the nodule shows them: the evidence of malignancy;
- **popcorn calcification** (p = 0.35): 3 calcified foci (500 HU, radius 1.5-3 mm) inside the nodule, off its
  centre, one in each central view plane: the benign pattern, which overrides the spicules;
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
KNOWN_CAUSE_VERSION = 3
#: Probabilities of the signs, each drawn independently per nodule.
P_SPICULES, P_CALCIFIED, P_VESSEL = 0.5, 0.35, 0.5
SPICULE_HU, CALCIFIED_FOCUS_HU, VESSEL_HU = 20, 500, SOFT_TISSUE_HU
#: Spikes two pixels wide at LIDC pixel spacings (0.5-0.98 mm), so that the 1 mm crops still show them.
SPICULE_RADIUS_MM, VESSEL_RADIUS_MM = 1.1, 1.5
#: Nodules with this many annotations get signs (the training population).
MIN_ANNOTATIONS = 3
#: Scans added to the default ones for the known-cause set: its labels do not depend on the readers' ratings, so
#: any scan with nodules serves, and 120 scans (521 nodules) let a small ViT learn the signs. These are the 75
#: scans with the most annotations after the default set, none with a known database quirk (selection.py).
EXTRA_SCANS: tuple[str, ...] = (
    "LIDC-IDRI-0855",
    "LIDC-IDRI-0583",
    "LIDC-IDRI-0164",
    "LIDC-IDRI-0012",
    "LIDC-IDRI-0858",
    "LIDC-IDRI-0775",
    "LIDC-IDRI-0770",
    "LIDC-IDRI-0450",
    "LIDC-IDRI-0870",
    "LIDC-IDRI-0785",
    "LIDC-IDRI-0402",
    "LIDC-IDRI-0655",
    "LIDC-IDRI-0998",
    "LIDC-IDRI-0637",
    "LIDC-IDRI-0491",
    "LIDC-IDRI-0398",
    "LIDC-IDRI-0871",
    "LIDC-IDRI-0415",
    "LIDC-IDRI-0298",
    "LIDC-IDRI-0181",
    "LIDC-IDRI-0742",
    "LIDC-IDRI-0549",
    "LIDC-IDRI-0356",
    "LIDC-IDRI-0179",
    "LIDC-IDRI-0011",
    "LIDC-IDRI-0843",
    "LIDC-IDRI-0489",
    "LIDC-IDRI-0068",
    "LIDC-IDRI-0042",
    "LIDC-IDRI-0912",
    "LIDC-IDRI-0582",
    "LIDC-IDRI-0454",
    "LIDC-IDRI-0394",
    "LIDC-IDRI-0368",
    "LIDC-IDRI-0334",
    "LIDC-IDRI-0136",
    "LIDC-IDRI-0046",
    "LIDC-IDRI-0016",
    "LIDC-IDRI-0961",
    "LIDC-IDRI-0866",
    "LIDC-IDRI-0806",
    "LIDC-IDRI-0185",
    "LIDC-IDRI-0039",
    "LIDC-IDRI-0587",
    "LIDC-IDRI-0135",
    "LIDC-IDRI-0061",
    "LIDC-IDRI-0027",
    "LIDC-IDRI-0822",
    "LIDC-IDRI-0671",
    "LIDC-IDRI-0565",
    "LIDC-IDRI-0111",
    "LIDC-IDRI-0713",
    "LIDC-IDRI-0601",
    "LIDC-IDRI-0358",
    "LIDC-IDRI-0346",
    "LIDC-IDRI-0341",
    "LIDC-IDRI-0305",
    "LIDC-IDRI-0091",
    "LIDC-IDRI-1002",
    "LIDC-IDRI-0879",
    "LIDC-IDRI-0838",
    "LIDC-IDRI-0604",
    "LIDC-IDRI-0149",
    "LIDC-IDRI-0141",
    "LIDC-IDRI-0118",
    "LIDC-IDRI-0849",
    "LIDC-IDRI-0741",
    "LIDC-IDRI-0701",
    "LIDC-IDRI-0577",
    "LIDC-IDRI-0509",
    "LIDC-IDRI-0437",
    "LIDC-IDRI-0433",
    "LIDC-IDRI-0386",
    "LIDC-IDRI-0379",
    "LIDC-IDRI-0300",
)
#: Cause mask names (files ``<nodule_id>_cause_<name>.nii.gz``) and what they mean for malignancy.
CAUSES: dict[str, str] = {"spicules": "evidence", "calcification": "counter-evidence", "vessel": "distractor"}


@dataclass(frozen=True)
class Ribbon:
    """A thin segment in the plane of two LPS axes, extruded along the third over a range: one spike of a margin.

    ``axes`` = (a, b) are the plane's axes (0 = x, 1 = y, 2 = z); the spike is extruded along the remaining axis
    over ``extent``, so every slice of the view orthogonal to that axis through the nodule shows it.
    """

    start: tuple[float, float]
    end: tuple[float, float]
    extent: tuple[float, float]
    radius: float
    axes: tuple[int, int] = (0, 1)

    @property
    def normal_axis(self) -> int:
        """The axis the spike is extruded along."""
        return 3 - sum(self.axes)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest LPS corner of a box around it."""
        ends = np.array([self.start, self.end])
        low, high = np.zeros(3), np.zeros(3)
        low[list(self.axes)], high[list(self.axes)] = ends.min(0) - self.radius, ends.max(0) + self.radius
        low[self.normal_axis], high[self.normal_axis] = self.extent
        return low, high

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether LPS points (N, 3) lie inside."""
        a, b = np.asarray(self.start), np.asarray(self.end)
        ab = b - a
        planar = points[:, list(self.axes)]
        t = np.clip(((planar - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        distance = np.linalg.norm(planar - (a + t[:, None] * ab), axis=1)
        along = points[:, self.normal_axis]
        return (distance <= self.radius) & (along >= self.extent[0]) & (along <= self.extent[1])


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


#: The planes of the axial, coronal and sagittal views, as pairs of LPS axes.
_PLANES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))


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
    causes: dict[str, list[Primitive]] = {name: [] for name in CAUSES}
    # Draws happen whether or not a sign is painted, so each sign's layout does not depend on the others.
    azimuth = rng.uniform(0, 2 * np.pi)
    spike_draws = [(azimuth + rng.uniform(-np.pi / 3, np.pi / 3), rng.uniform(6.0, 10.0)) for _ in range(6)]
    focus_draws = [(rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.55), rng.uniform(-0.5, 0.5)) for _ in range(3)]
    vessel_draw = (rng.uniform(0, 2 * np.pi), rng.uniform(3.0, 6.0), rng.uniform(-0.4, 0.4, size=2))
    if spicules:
        # Fins in each of the three view planes, on the same side of the nodule and extruded through its whole
        # extent along the plane's normal: every slice of every view through the nodule shows spikes.
        for plane_index, (angle, length) in enumerate(spike_draws):
            axes = _PLANES[plane_index % len(_PLANES)]
            normal = 3 - sum(axes)
            near = points[np.abs(points[:, normal] - centre[normal]) <= max(half_slice, 1.0)]
            footprint = (near if len(near) else points)[:, list(axes)]
            direction = _unit(angle)
            planar_centre = centre[list(axes)]
            edge = _exit_distance(footprint, planar_centre, direction, geometry.pixel_spacing)
            start = planar_centre + direction * max(edge - 0.5, 0.0)
            end = planar_centre + direction * (edge + length)
            extent = (float(points[:, normal].min()) - half_slice, float(points[:, normal].max()) + half_slice)
            causes["spicules"].append(Ribbon(tuple(start), tuple(end), extent, SPICULE_RADIUS_MM, axes))
    if calcified:
        # One focus in each central view plane, off the centre: each view shows one.
        focus_radius = float(np.clip(0.3 * radius, 1.5, 3.0))
        for plane_index, (angle, fraction, _) in enumerate(focus_draws):
            axes = _PLANES[plane_index % len(_PLANES)]
            offset = np.zeros(3)
            offset[list(axes)] = _unit(angle) * fraction * radius
            focus = tuple(float(v) for v in centre + offset)
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
