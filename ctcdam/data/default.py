"""The synthetic default data set, preprocessed: what ``python pipelines/train.py`` trains on without arguments."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PREPROCESSED_DIR = "synthetic-preprocessed"


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else ctcdam's cache folder ($CTCDAM_CACHE or ~/.cache/ctcdam, as for the synthetic DICOM)."""
    from ctcdam.synthetic.default import default_cache_dir as synthetic_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else synthetic_cache_dir()


def default_manifest_path(cache_dir: str | Path | None = None) -> Path:
    """Where the preprocessed synthetic default's manifest lives (it may not exist yet)."""
    return default_cache_dir(cache_dir) / PREPROCESSED_DIR / "manifest.csv"


def ensure_default_manifest(cache_dir: str | Path | None = None, workers: int | None = None) -> Path:
    """Generate the synthetic DICOM (if needed) and preprocess it into ``<cache>/synthetic-preprocessed/``; resume-safe.

    Returns the manifest path. A finished earlier run is reused; an interrupted one is resumed scan by scan.
    """
    from ctcdam.lidc.preprocess import run_preprocess
    from ctcdam.synthetic.default import DEFAULT_SCANS, ensure_default_dicom

    base = default_cache_dir(cache_dir)
    dicom_root = Path(ensure_default_dicom(base, workers=workers))
    out_dir = default_manifest_path(base).parent
    workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    summary = run_preprocess(dicom_root, out_dir, list(DEFAULT_SCANS) or None, resume=True, workers=workers)
    if summary.nodules == 0:
        raise RuntimeError(
            f"preprocessing the synthetic default in {dicom_root} produced no nodules; see {summary.failures_path}"
        )
    if summary.scans_pending:
        raise RuntimeError(
            f"{summary.scans_pending} synthetic scan(s) were not preprocessed; rerun to resume (outputs in {out_dir})"
        )
    log.info("synthetic default: %d nodules in %s", summary.nodules, summary.manifest_path)
    return Path(summary.manifest_path)
