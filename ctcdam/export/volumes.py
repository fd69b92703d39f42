"""NIfTI volumes of a bundle: the CT and the CDAM maps, written by SimpleITK so that qform == sform."""
from __future__ import annotations

import contextlib
import gzip
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from isal import igzip

from ctcdam import io

_COPY_CHUNK = 1 << 22


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


#: gzip level of the CT, compressed by ISA-L (``isal``, levels 0-3): level 1 halves int16 HU as ITK's own zlib
#: level does; on a 16 MB CT it took 0.06 s against 0.21 s for zlib's level 1, for 4 % more bytes.
CT_GZIP_LEVEL = 1
#: gzip level of the heat maps: float32 CDAM values shrink by about 12 % at any level, so they are stored
#: (level 0, zlib's: a valid gzip stream of uncompressed blocks; every reader, Slicer's included, opens it).
MAP_GZIP_LEVEL = 0


@contextlib.contextmanager
def _gzip_file(temporary: Path, gzip_level: int) -> Iterator[Any]:
    """A gzip stream into ``temporary``, without a name or timestamp in its header (equal data, equal bytes): zlib's
    for level 0 (stored blocks), ISA-L's for 1-3."""
    packer = gzip.GzipFile if gzip_level == 0 else igzip.IGzipFile
    with open(temporary, "wb") as target, packer(filename="", mode="wb", fileobj=target, compresslevel=gzip_level,
                                                 mtime=0) as packed:
        yield packed


def write_volume(image: sitk.Image, path: Path, gzip_level: int | None = None,
                 keep_uncompressed: Path | None = None) -> Path:
    """Write a volume with SimpleITK (NIfTI: qform_code = sform_code = 1, identical matrices).

    With ``gzip_level`` a ``.nii.gz`` is SimpleITK's own uncompressed ``.nii`` (the same header and voxels) wrapped
    in gzip, without a timestamp or name in the gzip header, so equal volumes give equal bytes: level 0 stores
    (zlib), levels 1-3 are ISA-L's. ``keep_uncompressed`` (a scratch path, not an output) keeps that ``.nii``.
    """
    path = Path(path)
    if gzip_level is None or not path.name.endswith(".nii.gz"):
        return io.write_image(path, image)
    with io.atomic_file(path) as temporary:
        # a temporary name too, unless the caller keeps it
        uncompressed = (Path(keep_uncompressed) if keep_uncompressed is not None
                        else temporary.with_name(temporary.name.removesuffix(".gz")))
        try:
            sitk.WriteImage(image, str(uncompressed), useCompression=False)
            with open(uncompressed, "rb") as source, _gzip_file(temporary, gzip_level) as packed:
                shutil.copyfileobj(source, packed, _COPY_CHUNK)
        finally:
            if keep_uncompressed is None:
                uncompressed.unlink(missing_ok=True)
    return path


def _grid_key(image: sitk.Image) -> tuple:
    """What a NIfTI header that SimpleITK writes depends on: geometry, pixel type and metadata."""
    metadata = tuple((key, image.GetMetaData(key)) for key in sorted(image.GetMetaDataKeys()))
    return (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetPixelID(),
            image.GetNumberOfComponentsPerPixel(), metadata)


class GridVolumeWriter:
    """``write_volume`` for many volumes on few grids (a nodule's nine maps share one): SimpleITK writes the first
    volume of each grid, and the others reuse its header, whose bytes depend only on the key of ``_grid_key``.

    Bytes equal to ``write_volume``'s; it saves a temporary ``.nii`` written and read back per map (about 60 % of
    writing 36 maps a nodule). A header is only reused after SimpleITK's own file was checked to be that header
    followed by the array's bytes; otherwise every volume of that grid goes through SimpleITK.
    """

    def __init__(self) -> None:
        self._headers: dict[tuple, bytes | None] = {}

    def write(self, image: sitk.Image, path: Path, gzip_level: int = MAP_GZIP_LEVEL) -> Path:
        """Write ``image`` to a ``.nii.gz`` at ``gzip_level``, as ``write_volume`` would."""
        path = Path(path)
        key = _grid_key(image)
        header = self._headers.get(key)
        voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
        if header is None:
            if key in self._headers or not path.name.endswith(".nii.gz"):  # checked and refused, or not gzip
                return write_volume(image, path, gzip_level=gzip_level)
            with tempfile.TemporaryDirectory(prefix="ctcdam-nii-") as scratch:
                uncompressed = Path(scratch) / "volume.nii"
                write_volume(image, path, gzip_level=gzip_level, keep_uncompressed=uncompressed)
                written = uncompressed.read_bytes()
            body = voxels.tobytes()
            fits = len(written) > len(body) and written[len(written) - len(body):] == body
            self._headers[key] = written[:len(written) - len(body)] if fits else None
            return path
        with io.atomic_file(path) as temporary, _gzip_file(temporary, gzip_level) as packed:
            packed.write(header)
            packed.write(memoryview(voxels).cast("B"))
        return path


def written_geometry(path: Path) -> sitk.Image:
    """An empty uint8 image with the geometry of a volume file as readers see it (NIfTI stores it in float32,
    so this can differ from the in-memory image by ~1e-7 mm); its voxels are not read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    grid = sitk.Image([int(v) for v in reader.GetSize()], sitk.sitkUInt8)
    grid.SetOrigin(reader.GetOrigin())
    grid.SetSpacing(reader.GetSpacing())
    grid.SetDirection(reader.GetDirection())
    return grid


def nearest_voxel_centre(image: sitk.Image, point_lps: tuple[float, float, float]) -> tuple[float, float, float]:
    """The centre (LPS) of the voxel of ``image`` nearest to ``point_lps``, clamped into the image: slice views
    placed there cut through voxel centres, so the CT is shown without blending two slices."""
    index = np.round(image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point_lps)))
    index = np.clip(index, 0, np.array(image.GetSize()) - 1).astype(int)
    return tuple(float(v) for v in image.TransformIndexToPhysicalPoint([int(v) for v in index]))


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
    if not 0 <= start[itk_axis] < grid.GetSize()[itk_axis]:
        raise IndexError(f"slice {index} along axis {axis_zyx} is outside a grid of size {grid.GetSize()}")
    # The geometry RegionOfInterest gives the slab (the same origin, bit for bit: ITK computes it with
    # TransformIndexToPhysicalPoint too), without copying the grid's voxels through a filter: 27 slabs a nodule.
    slab = sitk.Image(size, sitk.sitkUInt8)
    slab.SetSpacing(grid.GetSpacing())
    slab.SetDirection(grid.GetDirection())
    slab.SetOrigin(grid.TransformIndexToPhysicalPoint(start))
    return image_on_grid(np.expand_dims(np.asarray(values_2d), axis_zyx), slab)


def axis_spacing_ras(image: sitk.Image) -> tuple[float, float, float]:
    """The voxel spacing along the R, A and S axes: that of the index axis closest to each (exact when the image
    is axis-aligned, as CT series are)."""
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))  # rows: L/R, P/A, S/I; columns: index axes
    spacing = np.array(image.GetSpacing())
    return tuple(float(spacing[int(np.argmax(direction[row]))]) for row in range(3))
