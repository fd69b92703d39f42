"""Strict series loader: agrees with pylidc's to_volume() and SimpleITK on generated series; mutated series fail clearly."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctcdam.lidc.dicom_index import index_patient
from ctcdam.lidc.pylidc_compat import DICOM_ROOT_ENV, get_scan
from ctcdam.lidc.series import InPlaneGeometry, SeriesError, load_series, read_series, stack_to_image
from tests.fixtures_lidc import GENERATED_SCANS

SCAN = "LIDC-IDRI-0001"  # 13 slices in generated_lidc, "uid" layout


def _series_folder(root: Path, scan_id: str) -> Path:
    folders = {p.parent for p in (root / scan_id).rglob("*") if p.suffix.lower() == ".dcm"}
    assert len(folders) == 1, folders
    return folders.pop()


def _files_by_z(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".dcm"]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.fixture
def mutable_root(generated_lidc: Path, tmp_path: Path) -> Path:
    """A private copy of the generated LIDC-IDRI-0001 series to mutate."""
    shutil.copytree(generated_lidc / SCAN, tmp_path / SCAN)
    return tmp_path


def _load(root: Path, scan_id: str = SCAN):
    return load_series(get_scan(scan_id), index_patient(root, scan_id))


@pytest.mark.parametrize("scan_id", sorted(GENERATED_SCANS))
def test_loader_equals_pylidc_and_simpleitk(generated_lidc: Path, scan_id: str, monkeypatch):
    scan = get_scan(scan_id)
    index = index_patient(generated_lidc, scan_id)
    stack = read_series(scan, index, hu_clip=None)
    # pylidc resolves the folder itself (both TCIA layouts) and reads every pixel with pydicom.
    monkeypatch.setenv(DICOM_ROOT_ENV, str(generated_lidc))
    volume = scan.to_volume(verbose=False)
    assert volume.shape == (512, 512, len(stack.zvals))
    np.testing.assert_array_equal(stack.hu.transpose(1, 2, 0), volume)
    db_zvals = np.asarray(scan.slice_zvals)
    np.testing.assert_allclose(stack.zvals, db_zvals[stack.k_range[0]: stack.k_range[1] + 1], atol=1e-4)
    assert 0 < stack.k_range[0] and stack.k_range[1] < len(db_zvals) - 1  # a partial series: a subset is accepted

    series = load_series(scan, index)
    reader = sitk.ImageSeriesReader()
    folder = _series_folder(generated_lidc, scan_id)
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), scan.series_instance_uid))
    reference = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series.image), sitk.GetArrayFromImage(reference))
    assert series.image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(series.image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(series.image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(series.image.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert series.image.GetSpacing()[2] == pytest.approx(scan.slice_spacing)


def test_missing_slice_inside_the_range_is_an_error(mutable_root: Path):
    files = _files_by_z(_series_folder(mutable_root, SCAN))
    missing_z = float(pydicom.dcmread(files[5]).ImagePositionPatient[2])
    files[5].unlink()
    with pytest.raises(SeriesError, match=rf"1 slice\(s\) missing inside the present z range.*z = {missing_z:.3f}"):
        _load(mutable_root)


def test_missing_end_slice_leaves_a_valid_subset(mutable_root: Path):
    files = _files_by_z(_series_folder(mutable_root, SCAN))
    files[-1].unlink()
    assert _load(mutable_root).image.GetSize()[2] == len(files) - 1


@pytest.mark.parametrize("duplicate_is_lower", [False, True])
def test_duplicate_z_keeps_the_lower_instance_number(mutable_root: Path, duplicate_is_lower: bool):
    intact = sitk.GetArrayFromImage(_load(mutable_root).image)
    original = _files_by_z(_series_folder(mutable_root, SCAN))[4]
    ds = pydicom.dcmread(original)
    number = int(ds.InstanceNumber)
    ds.InstanceNumber = number - 1000 if duplicate_is_lower else number + 1000
    ds.PixelData = (ds.pixel_array + 100).astype(np.int16).tobytes()  # +100 HU: tells the two copies apart
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(original.with_name("duplicate.dcm"), enforce_file_format=True)

    series = _load(mutable_root)
    loaded = sitk.GetArrayFromImage(series.image)
    assert loaded.shape == intact.shape
    expected = intact[4] + 100 if duplicate_is_lower else intact[4]
    np.testing.assert_array_equal(loaded[4], np.clip(expected, -1024, 3071))
    assert any("duplicate z=" in note and "kept" in note for note in series.notes)


def test_other_series_in_the_folder_is_ignored(mutable_root: Path):
    intact = sitk.GetArrayFromImage(_load(mutable_root).image)
    first = _files_by_z(_series_folder(mutable_root, SCAN))[0]
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # e.g. a localizer stored beside the CT
    ds.Modality = "CR"
    ds.ImagePositionPatient = [0, 0, 1000.0]
    ds.save_as(first.with_name("localizer.dcm"), enforce_file_format=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_load(mutable_root).image), intact)


def test_uppercase_extension_is_read(mutable_root: Path):
    intact = sitk.GetArrayFromImage(_load(mutable_root).image)
    for path in _series_folder(mutable_root, SCAN).iterdir():
        path.rename(path.with_suffix(".DCM"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_load(mutable_root).image), intact)


def test_compressed_slice_is_decoded(mutable_root: Path):
    intact = sitk.GetArrayFromImage(_load(mutable_root).image)
    path = _files_by_z(_series_folder(mutable_root, SCAN))[3]
    ds = pydicom.dcmread(path)
    ds.compress(pydicom.uid.RLELossless)  # not readable by the uncompressed fast path
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_load(mutable_root).image), intact)


def test_truncated_file_is_an_error_naming_it(mutable_root: Path):
    path = _files_by_z(_series_folder(mutable_root, SCAN))[6]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(SeriesError, match=rf"{path.name}.*(truncated|cannot read)"):
        _load(mutable_root)


def test_corrupt_file_is_an_error_naming_it(mutable_root: Path):
    path = _files_by_z(_series_folder(mutable_root, SCAN))[2]
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(SeriesError, match=rf"cannot read .*{path.name}"):
        _load(mutable_root)


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [("PixelSpacing", r"\(0028,0030\)"), ("ImagePositionPatient", r"\(0020,0032\)"), ("RescaleIntercept", r"\(0028,1052\)")],
)
def test_missing_geometry_tag_is_an_error_naming_it(mutable_root: Path, keyword: str, tag: str):
    path = _files_by_z(_series_folder(mutable_root, SCAN))[7]
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(SeriesError, match=rf"{path.name} lacks the required tag\(s\) {keyword} {tag}"):
        _load(mutable_root)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("ImageOrientationPatient", [1, 0, 0, 0, 0.8, 0.6], "is not axial"),
        ("PixelSpacing", [0.5, 0.5], "differs from the database"),
    ],
)
def test_geometry_that_contradicts_the_database_is_an_error(mutable_root: Path, keyword, value, message):
    for path in _series_folder(mutable_root, SCAN).iterdir():
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(SeriesError, match=message):
        _load(mutable_root)


def test_series_absent_from_the_patient_folder_is_an_error(tmp_path: Path):
    (tmp_path / SCAN / "empty").mkdir(parents=True)
    with pytest.raises(SeriesError, match="no DICOM file of series"):
        _load(tmp_path)


def test_non_uniform_slices_are_resampled_on_their_real_z():
    zvals = np.array([-10.0, -9.0, -8.0, -7.5, -6.5, -5.5])  # one 0.5 mm step, as in LIDC-IDRI-0123
    stack = np.stack([np.full((4, 5), 10.0 * z, dtype=np.float32) for z in zvals])  # value = 10 * z
    plane = InPlaneGeometry(origin_xy=(-3.0, 2.0), row_cosine=(1, 0, 0), column_cosine=(0, 1, 0), spacing=(0.7, 0.8))
    image, resampled = stack_to_image(stack, zvals, plane, single_slice_spacing=1.0)
    assert resampled
    assert image.GetSpacing() == pytest.approx((0.7, 0.8, 1.0))
    for k in range(image.GetSize()[2]):
        z = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        assert image.GetPixel(2, 1, k) == pytest.approx(10.0 * z, abs=1e-4)  # linear in z: exact
    assert image.GetOrigin() == pytest.approx((-3.0, 2.0, -10.0))


def test_database_scan_with_non_uniform_slices_keeps_every_slice_at_its_real_z(tmp_path: Path):
    # LIDC-IDRI-0672: 0.625 mm slices with three 1.25 mm steps, one of them beside its nodule (research/lidc.md §4).
    from ctcdam.synthetic.writer import write_synthetic_series

    scan_id = "LIDC-IDRI-0672"
    folder = write_synthetic_series(scan_id, tmp_path, z_margin_mm=5.0, cover_min_annotations=3)
    scan = get_scan(scan_id)
    index = index_patient(tmp_path, scan_id)
    stack = read_series(scan, index)
    assert np.unique(np.round(np.diff(stack.zvals), 3)).tolist() == [0.625, 1.25]
    series = load_series(scan, index)
    assert any("non-uniform slice z" in note for note in series.notes)
    assert series.image.GetSpacing()[2] == pytest.approx(0.625)
    resampled = sitk.GetArrayFromImage(series.image)
    for k, z in enumerate(stack.zvals):
        index_z = series.image.TransformPhysicalPointToContinuousIndex((0.0, 0.0, float(z)))[2]
        assert index_z == pytest.approx(round(index_z), abs=1e-6)  # every real slice is a grid slice ...
        np.testing.assert_array_equal(resampled[round(index_z)], stack.hu[k])  # ... with its own pixels
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), scan.series_instance_uid))
    averaged = reader.Execute()
    assert averaged.GetSpacing()[2] != pytest.approx(0.625, abs=1e-3)  # what an averaged spacing would give


def test_slice_at_a_foreign_z_is_an_error(mutable_root: Path):
    path = _files_by_z(_series_folder(mutable_root, SCAN))[4]
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.3]
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(SeriesError, match=rf"1 slice\(s\) are not at any z of the database series, e.g. .*{path.name}"):
        _load(mutable_root)


def test_header_index_is_cached_and_refreshed_per_file(mutable_root: Path, tmp_path: Path, monkeypatch):
    from ctcdam.lidc import dicom_index

    read = []
    real_reader = dicom_index.read_slice_header
    monkeypatch.setattr(dicom_index, "read_slice_header", lambda path, base: read.append(path) or real_reader(path, base))
    cache = tmp_path / "cache"
    first = index_patient(mutable_root, SCAN, cache_dir=cache)
    assert len(read) == 13 and (cache / f"{SCAN}.json").is_file()
    read.clear()
    assert index_patient(mutable_root, SCAN, cache_dir=cache) == first
    assert read == []  # every header came from the cache
    changed = _files_by_z(_series_folder(mutable_root, SCAN))[0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    index_patient(mutable_root, SCAN, cache_dir=cache)
    assert read == [changed]  # only the file that changed is read again
