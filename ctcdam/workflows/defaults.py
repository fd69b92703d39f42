"""The embedded synthetic default: ctcdam's cache folder, the default's DICOM root and its one preprocessed copy.

Every command run without data arguments uses what this module decides: ``pipelines/preprocess.py`` without
``--lidc-root`` writes the preprocessed default to :func:`default_preprocessed_dir`, and training without a
manifest trains on that same copy (:func:`ensure_default_data`). Its manifest's run record names the DICOM root,
like any preprocessed data set's, so explain finds the default's DICOM through the checkpoint, not by a name.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcdam.lidc.scan_nodules import PreprocessConfig
from ctcdam.manifest.schema import MANIFEST_FILE
from ctcdam.preprocess.run import RunSummary, run_preprocess
from ctcdam.synthetic.default import DEFAULT_SCANS, ensure_default_dicom
from ctcdam.synthetic.writer import write_synthetic_series

log = logging.getLogger(__name__)

CACHE_ENV = "CTCDAM_CACHE"
#: Under the cache folder: the preprocessed default (the DICOM is in ctcdam.synthetic.default.DEFAULT_DIRNAME).
PREPROCESSED_DIRNAME = "synthetic-preprocessed"
#: Under the cache folder: full-length synthetic series, as real downloads are (the preprocessing benchmark).
FULL_LENGTH_DIRNAME = "synthetic-lidc-full"


@dataclass(frozen=True)
class DefaultData:
    """The synthetic default, ready to train on: its DICOM root and its preprocessed manifest."""

    lidc_root: Path
    manifest: Path


def default_cache_dir() -> Path:
    """ctcdam's cache folder: $CTCDAM_CACHE, else ~/.cache/ctcdam."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ctcdam"


def default_preprocessed_dir(cache_dir: Path | None = None) -> Path:
    """Where the one preprocessed copy of the synthetic default lives (it may not exist yet)."""
    return Path(cache_dir or default_cache_dir()) / PREPROCESSED_DIRNAME


def default_dicom(cache_dir: Path | None = None, *, progress: bool = True, workers: int | None = None) -> Path:
    """The synthetic default's DICOM root, generating the scans that are missing."""
    return Path(ensure_default_dicom(Path(cache_dir or default_cache_dir()), progress, workers=workers))


def preprocess_default(
    config: PreprocessConfig | None = None,
    *,
    cache_dir: Path | None = None,
    out_dir: Path | None = None,
    scan_ids: Sequence[str] | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    resume: bool = True,
    progress: Callable[[int], Callable[[str], None]] | None = None,
) -> RunSummary:
    """Generate (if needed) and preprocess the synthetic default, into its cache folder unless ``out_dir`` says else."""
    dicom_root = default_dicom(cache_dir, workers=workers)
    return run_preprocess(
        dicom_root, out_dir or default_preprocessed_dir(cache_dir), list(scan_ids or DEFAULT_SCANS), config,
        workers=workers, shard=shard, resume=resume, progress=progress,
    )


def ensure_default_data(cache_dir: Path | None = None, workers: int | None = None) -> DefaultData:
    """The synthetic default generated and preprocessed with the default settings (reused when done; resume-safe)."""
    workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    dicom_root = default_dicom(cache_dir, workers=workers)
    out_dir = default_preprocessed_dir(cache_dir)
    summary = run_preprocess(dicom_root, out_dir, list(DEFAULT_SCANS), resume=True, workers=workers)
    if summary.nodules == 0:
        raise RuntimeError(f"preprocessing the synthetic default produced no nodules; see {summary.failures_path}")
    if summary.scans_pending:
        raise RuntimeError(
            f"{summary.scans_pending} synthetic scan(s) were not preprocessed; rerun to resume (outputs in {out_dir})"
        )
    log.info("synthetic default: %d nodules in %s", summary.nodules, summary.manifest_path)
    return DefaultData(lidc_root=dicom_root, manifest=out_dir / MANIFEST_FILE)


def full_length_dicom(scan_ids: Sequence[str], cache_dir: Path | None = None) -> Path:
    """A LIDC root with full-length synthetic series of ``scan_ids`` (written once), as real downloads are: the
    default set's partial series (~33 slices) would time the per-scan annotation work against a short read."""
    root = Path(cache_dir or default_cache_dir()) / FULL_LENGTH_DIRNAME
    for scan_id in scan_ids:
        write_synthetic_series(scan_id, root)  # returns at once for a series written before with these settings
    return root
