"""NIfTI volume helpers of the bundle: a view map's one-slice volume lies exactly where its slice of the crop lies."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ctcdam.export.volumes import slab_on_grid


def _grid(seed: int, oblique: bool) -> sitk.Image:
    rng = np.random.default_rng(seed)
    grid = sitk.Image([24, 20, 16], sitk.sitkFloat32)
    grid.SetOrigin(tuple(float(v) for v in rng.normal(0.0, 200.0, 3)))
    grid.SetSpacing(tuple(float(v) for v in rng.uniform(0.3, 2.5, 3)))
    if oblique:
        grid.SetDirection(tuple(float(v) for v in np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel()))
    return grid


@pytest.mark.parametrize("seed", range(6))
def test_slab_geometry_is_that_of_region_of_interest(seed):
    grid = _grid(seed, oblique=bool(seed % 2))
    shape_zyx = grid.GetSize()[::-1]
    for axis, index in itertools.product(range(3), (0, 5, -1)):
        index = index % shape_zyx[axis]
        values = np.random.default_rng(seed).normal(size=[n for i, n in enumerate(shape_zyx) if i != axis])
        slab = slab_on_grid(values.astype(np.float32), grid, axis, index)
        size, start = list(grid.GetSize()), [0, 0, 0]
        size[2 - axis], start[2 - axis] = 1, index
        reference = sitk.RegionOfInterest(grid, size, start)
        assert slab.GetSize() == reference.GetSize()
        # bit for bit: the bundle's view maps must not move by a rounding error
        assert slab.GetOrigin() == reference.GetOrigin()
        assert slab.GetSpacing() == reference.GetSpacing() and slab.GetDirection() == reference.GetDirection()
        assert np.array_equal(np.squeeze(sitk.GetArrayFromImage(slab), axis), values.astype(np.float32))


def test_slab_outside_the_grid_is_an_error():
    with pytest.raises(IndexError):
        slab_on_grid(np.zeros((20, 24), np.float32), _grid(0, False), 0, 16)



@pytest.mark.parametrize("gzip_level", [0, 1])
def test_a_written_volume_is_read_back_exactly_and_equal_volumes_give_equal_bytes(tmp_path, gzip_level):
    # The CT (ISA-L, level 1) and the maps (stored, level 0) of a bundle: nibabel, the NIfTI reference reader,
    # must see SimpleITK's voxels and geometry, and a rewrite must not change a byte (no timestamp, no name).
    import gzip

    import nibabel as nib

    from ctcdam.export.volumes import write_volume

    rng = np.random.default_rng(gzip_level)
    voxels = rng.integers(-1024, 3071, size=(7, 20, 30)).astype(np.int16)
    image = sitk.GetImageFromArray(voxels)
    image.SetOrigin((-150.5, 20.25, -310.0))
    image.SetSpacing((0.7, 0.7, 2.5))
    first, second = write_volume(image, tmp_path / "a.nii.gz", gzip_level), write_volume(image, tmp_path / "b.nii.gz", gzip_level)
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes())[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header inside
    loaded = nib.load(first)
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), voxels.transpose(2, 1, 0))  # nibabel: (x, y, z)
    ras_origin = loaded.affine[:3, 3]
    np.testing.assert_allclose(ras_origin, (150.5, -20.25, -310.0), atol=1e-4)  # LPS -> RAS
    np.testing.assert_allclose(np.abs(np.diag(loaded.affine)[:3]), (0.7, 0.7, 2.5), atol=1e-6)
    stored = len(first.read_bytes()) > voxels.nbytes  # level 0 stores: the file holds every byte of the voxels
    assert stored == (gzip_level == 0)


def test_the_kept_uncompressed_volume_is_what_the_gzip_holds(tmp_path):
    # A bundle's CT: its uncompressed .nii is kept in scratch for Slicer's renderer instead of being written twice.
    import gzip

    from ctcdam.export.volumes import write_volume

    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    kept = tmp_path / "scratch" / "ct.nii"
    kept.parent.mkdir()
    written = write_volume(image, tmp_path / "ct.nii.gz", 1, keep_uncompressed=kept)
    assert gzip.decompress(written.read_bytes()) == kept.read_bytes()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(kept))), sitk.GetArrayFromImage(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "scratch"]  # no temporary left


@pytest.mark.parametrize("gzip_level", [0, 1])
def test_maps_on_a_shared_grid_are_written_as_simpleitk_writes_each(tmp_path, gzip_level):
    # A nodule's nine maps share a grid, so the grid writer reuses the first one's header: every file must still be
    # byte for byte what SimpleITK's own path writes, across grids, pixel types and metadata (no header mixed up),
    # and read back by nibabel with its own voxels and geometry.
    import nibabel as nib

    from ctcdam.export.volumes import GridVolumeWriter, image_on_grid, write_volume

    rng = np.random.default_rng(7)
    grids = [_grid(seed, seed % 2 == 1) for seed in range(3)]
    moved = _grid(0, False)  # another nodule's crop: only the origin differs
    moved.SetOrigin(tuple(v + 3.0 for v in moved.GetOrigin()))
    grids.append(moved)
    shape = (16, 20, 24)  # (z, y, x) of the grids
    tagged = image_on_grid(np.zeros(shape, np.float32), grids[0])
    tagged.SetMetaData("ITK_FileNotes", "a tagged map")  # SimpleITK writes it into the header's descrip
    writer = GridVolumeWriter()
    cases = [image_on_grid(rng.normal(size=shape).astype(np.float32), grid) for grid in grids for _ in range(3)]
    cases += [slab_on_grid(rng.normal(size=shape[:2]).astype(np.float32), grids[1], 2, 5) for _ in range(2)]
    cases += [image_on_grid(rng.integers(-5, 5, size=shape).astype(np.int16), grids[0]), tagged]
    for k, image in enumerate(cases):
        ours = writer.write(image, tmp_path / f"map{k}.nii.gz", gzip_level)
        reference = write_volume(image, tmp_path / "reference" / f"map{k}.nii.gz", gzip_level=gzip_level)
        assert ours.read_bytes() == reference.read_bytes(), k
        loaded = nib.load(ours)
        np.testing.assert_array_equal(np.asarray(loaded.dataobj), sitk.GetArrayFromImage(image).transpose(2, 1, 0))
        np.testing.assert_allclose(loaded.affine[:3, 3], np.array(image.GetOrigin()) * (-1, -1, 1), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(f"map{k}.nii.gz" for k in range(len(cases)))
