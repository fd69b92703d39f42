"""The embedded default data set: phantom DICOM for a fixed list of real LIDC scan records.

``DEFAULT_SCANS`` are 45 real LIDC-IDRI scan records. Written with a 16 mm margin around their
nodules with >= 3 annotations they make 2113 of their 6703 DB slices (1.1 GB of uncompressed DICOM)
and hold 283 painted annotation clusters, of them 193 nodules with >= 3 annotations:
94 benign (malignancy median < 3), 73 malignant (> 3) and 26 ambiguous (= 3), i.e. 167 labelled.
Recompute with ``python -m ctcdam.synthetic.selection --scans <DEFAULT_SCANS>``. Where the default lives
(ctcdam's cache folder) and its preprocessing are decided by ``ctcdam.workflows.defaults``; pre-generate and
preprocess it with ``python pipelines/preprocess.py``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from ctcdam.synthetic.writer import series_dir, write_synthetic_series

log = logging.getLogger(__name__)

DEFAULT_DIRNAME = "synthetic-lidc"
#: Slices kept beyond the annotated z extent of the nodules with >= 3 annotations: half of the
#: default 32 mm crop, so every such nodule's crop lies inside the written slices.
DEFAULT_Z_MARGIN_MM = 16.0
DEFAULT_COVER_MIN_ANNOTATIONS = 3
DEFAULT_SEED = 0
DEFAULT_NOISE_SD = 10.0

#: Chosen by ``python -m ctcdam.synthetic.selection --choose`` (greedy on labelled nodules per written
#: slice, >= 160 labelled for some headroom over the 150 the demo needs, scans with a known DB quirk
#: left out): many nodules per scan and few slices keep the generation short (about 40 s of CPU).
DEFAULT_SCANS: tuple[str, ...] = (
    "LIDC-IDRI-0003",
    "LIDC-IDRI-0013",
    "LIDC-IDRI-0031",
    "LIDC-IDRI-0044",
    "LIDC-IDRI-0045",
    "LIDC-IDRI-0049",
    "LIDC-IDRI-0053",
    "LIDC-IDRI-0124",
    "LIDC-IDRI-0126",
    "LIDC-IDRI-0129",
    "LIDC-IDRI-0144",
    "LIDC-IDRI-0148",
    "LIDC-IDRI-0171",
    "LIDC-IDRI-0188",
    "LIDC-IDRI-0195",
    "LIDC-IDRI-0229",
    "LIDC-IDRI-0237",
    "LIDC-IDRI-0244",
    "LIDC-IDRI-0250",
    "LIDC-IDRI-0260",
    "LIDC-IDRI-0390",
    "LIDC-IDRI-0407",
    "LIDC-IDRI-0413",
    "LIDC-IDRI-0419",
    "LIDC-IDRI-0435",
    "LIDC-IDRI-0466",
    "LIDC-IDRI-0476",
    "LIDC-IDRI-0481",
    "LIDC-IDRI-0526",
    "LIDC-IDRI-0586",
    "LIDC-IDRI-0605",
    "LIDC-IDRI-0641",
    "LIDC-IDRI-0642",
    "LIDC-IDRI-0649",
    "LIDC-IDRI-0686",
    "LIDC-IDRI-0706",
    "LIDC-IDRI-0708",
    "LIDC-IDRI-0748",
    "LIDC-IDRI-0749",
    "LIDC-IDRI-0751",
    "LIDC-IDRI-0772",
    "LIDC-IDRI-0892",
    "LIDC-IDRI-0916",
    "LIDC-IDRI-1000",
    "LIDC-IDRI-1003",
)


def _write_default_scan(scan_id: str, root: Path, known_cause_seed: int | None = None) -> str:
    write_synthetic_series(
        scan_id,
        root,
        layout="uid",
        z_margin_mm=DEFAULT_Z_MARGIN_MM,
        seed=DEFAULT_SEED,
        noise_sd=DEFAULT_NOISE_SD,
        cover_min_annotations=DEFAULT_COVER_MIN_ANNOTATIONS,
        known_cause_seed=known_cause_seed,
    )
    return scan_id


def _missing_scans(root: Path, scan_ids: Sequence[str], known_cause_seed: int | None) -> list[str]:
    """Scans whose series is absent; a present one is checked against the default settings (cheap)."""
    from ctcdam.lidc.pylidc_compat import get_scan

    missing = []
    for scan_id in scan_ids:
        if series_dir(get_scan(scan_id), root, "uid").is_dir():
            _write_default_scan(scan_id, root, known_cause_seed)  # returns at once, or says the settings changed
        else:
            missing.append(scan_id)
    return missing


def ensure_default_dicom(
    cache_dir: Path,
    progress: bool = True,
    *,
    scan_ids: Sequence[str] = DEFAULT_SCANS,
    workers: int | None = None,
    dirname: str = DEFAULT_DIRNAME,
    known_cause_seed: int | None = None,
) -> Path:
    """Generate the missing default scans into <cache_dir>/<dirname>/ and return that LIDC root.

    ``known_cause_seed`` writes the known-cause set's painting instead (``ctcdam.synthetic.known_cause``).
    """
    root = Path(cache_dir) / dirname
    root.mkdir(parents=True, exist_ok=True)
    missing = _missing_scans(root, scan_ids, known_cause_seed)
    if not missing:
        return root
    workers = max(1, min(workers or os.cpu_count() or 1, len(missing)))
    failures: dict[str, str] = {}
    with tqdm(total=len(missing), desc="synthetic LIDC", unit="scan", disable=not progress) as bar:
        if workers == 1:
            for scan_id in missing:
                try:
                    _write_default_scan(scan_id, root, known_cause_seed)
                except Exception as error:  # noqa: BLE001  (reported together below)
                    failures[scan_id] = f"{type(error).__name__}: {error}"
                bar.update()
        else:
            # spawn, not fork: pylidc keeps one SQLite session per process, which must not be shared.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(_write_default_scan, scan_id, root, known_cause_seed): scan_id for scan_id in missing}
                for future in as_completed(futures):
                    error = future.exception()
                    if error is not None:
                        failures[futures[future]] = f"{type(error).__name__}: {error}"
                    bar.update()
    if failures:
        # The other scans are complete; a rerun generates only what is still missing.
        details = "; ".join(f"{scan_id}: {reason}" for scan_id, reason in sorted(failures.items()))
        raise RuntimeError(
            f"could not generate {len(failures)} of {len(missing)} synthetic scans under {root}: {details}"
        )
    log.info("generated %d synthetic scans under %s", len(missing), root)
    return root
