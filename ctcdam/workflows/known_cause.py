"""The known-cause benchmark's data: generate the painted set, preprocess it, and write its labels and cause masks.

``known_cause_data()`` returns a manifest that trains and evaluates like any other, but whose malignancy,
spiculation and calcification labels follow the painted signs (``ctcdam.synthetic.known_cause``) and whose rows
name each nodule's cause masks on its crop grid (``cause_spicules_path``, ``cause_calcification_path``,
``cause_vessel_path``). Layout under the cache folder::

    known-cause-lidc/                    the DICOM root (real annotation geometry, painted signs)
    known-cause-preprocessed/            the ordinary preprocessing of it (manifest.csv, crops/, ...)
        known_cause.csv, known_cause.json   the known-cause manifest and its run record
        causes/<scan_id>/<nodule_id>_cause_<name>.nii.gz   one unit folder per scan, published atomically
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ctcdam import io
from ctcdam.lidc.pylidc_compat import get_scan
from ctcdam.manifest.schema import MANIFEST_FILE, read_run_record, run_record_path
from ctcdam.preprocess.run import run_preprocess
from ctcdam.synthetic.default import DEFAULT_SCANS, ensure_default_dicom
from ctcdam.synthetic.known_cause import (
    CAUSES,
    EXTRA_SCANS,
    KNOWN_CAUSE_VERSION,
    cause_mask_image,
    known_cause_nodules,
)
from ctcdam.workflows.defaults import default_cache_dir

log = logging.getLogger(__name__)

DICOM_DIRNAME = "known-cause-lidc"
PREPROCESSED_DIRNAME = "known-cause-preprocessed"
MANIFEST_NAME = "known_cause.csv"
KNOWN_CAUSE_SCANS: tuple[str, ...] = (*DEFAULT_SCANS, *EXTRA_SCANS)
#: Label columns the signs decide, and the columns the known-cause manifest adds.
SIGN_COLUMNS: tuple[str, ...] = ("sign_spicules", "sign_calcified", "sign_vessel")
CAUSE_COLUMNS: tuple[str, ...] = tuple(f"cause_{name}_path" for name in CAUSES)


@dataclass(frozen=True)
class KnownCauseData:
    """The known-cause set, ready to train on: its DICOM root and its manifest."""

    lidc_root: Path
    manifest: Path


def _record(seed: int, scans: Sequence[str]) -> dict:
    return {"seed": seed, "version": KNOWN_CAUSE_VERSION, "scans": list(scans)}


def write_cause_masks(out_dir: Path, scan_id: str, rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The scan's rows with known-cause labels and cause-mask paths; the masks go into one atomic unit folder."""
    _, signs = known_cause_nodules(get_scan(scan_id), seed)
    by_id = {s.nodule_id: s for s in signs}
    unit = out_dir / "causes" / scan_id
    labelled = []
    with io.atomic_dir(unit) as staging:
        for row in rows.to_dict("records"):
            nodule = by_id[row["nodule_id"]]
            crop = sitk.ReadImage(str(out_dir / row["image_path"]))
            consensus = sitk.ReadImage(str(out_dir / row["mask_path"]))
            for name in CAUSES:
                file = f"{row['nodule_id']}_cause_{name}.nii.gz"
                io.write_image(staging / file, cause_mask_image(nodule, name, crop, consensus))
                row[f"cause_{name}_path"] = (unit / file).relative_to(out_dir).as_posix()
            labelled.append({**row, **nodule.labels()})
    return pd.DataFrame(labelled)


def known_cause_data(
    cache_dir: Path | None = None, *, scans: Sequence[str] = KNOWN_CAUSE_SCANS, seed: int = 0, workers: int | None = None,
) -> KnownCauseData:
    """Generate (if needed), preprocess and label the known-cause set; reused when already complete."""
    cache_dir = Path(cache_dir or default_cache_dir())
    workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    dicom_root = ensure_default_dicom(cache_dir, scan_ids=scans, workers=workers, dirname=DICOM_DIRNAME,
                                      known_cause_seed=seed)
    # Another scan list (the demo's short version) gets its own preprocessed copy: one manifest per list.
    suffix = "" if tuple(scans) == KNOWN_CAUSE_SCANS else f"-{len(scans)}scans"
    out_dir = cache_dir / f"{PREPROCESSED_DIRNAME}{suffix}"
    manifest_path = out_dir / MANIFEST_NAME
    record = _record(seed, scans)
    if manifest_path.is_file() and (read_run_record(manifest_path) or {}).get("known_cause") == record:
        return KnownCauseData(dicom_root, manifest_path)
    summary = run_preprocess(dicom_root, out_dir, list(scans), resume=True, workers=workers)
    if summary.scans_pending:
        raise RuntimeError(f"{summary.scans_pending} known-cause scan(s) were not preprocessed; rerun to resume")
    manifest = pd.read_csv(out_dir / MANIFEST_FILE, dtype={"annotation_ids": str, "malignancy_label": str})
    parts = [write_cause_masks(out_dir, scan_id, rows, seed) for scan_id, rows in manifest.groupby("scan_id", sort=True)]
    labelled = pd.concat(parts, ignore_index=True)
    # The known-cause manifest carries the preprocessing's run record (settings, DICOM root) plus its own.
    base = read_run_record(out_dir / MANIFEST_FILE) or {}
    io.write_csv(manifest_path, labelled)
    io.write_text(run_record_path(manifest_path), json.dumps({**base, "known_cause": record}, indent=1, sort_keys=True))
    log.info("known-cause set: %d nodules (%d malignant) in %s", len(labelled),
             int(labelled["malignancy_label"].astype(int).sum()), manifest_path)
    return KnownCauseData(dicom_root, manifest_path)


# -- the benchmark --------------------------------------------------------------------------------------------

#: The demo's short version: the default set's scans, fewer epochs, a few nodules and the fast methods.
QUICK_METHODS: tuple[str, ...] = ("cdam", "integrated", "rp", "ig", "token_ablation", "uniform", "centred_gaussian")
#: The targets whose causes are painted (ctcdam.evaluate.ground_truth.TARGET_CAUSES).
BENCHMARK_TARGETS: tuple[str, ...] = ("malignancy", "spiculation", "calcification")


@dataclass(frozen=True)
class BenchmarkSettings:
    """One known-cause benchmark run: which data, which model (trained on first use) and what to evaluate."""

    out_dir: Path = Path("outputs/known-cause")
    cache_dir: Path | None = None
    scans: tuple[str, ...] = KNOWN_CAUSE_SCANS
    checkpoint: Path | None = None  #: None: train (or reuse) <out_dir>/train/<model_run>/best.ckpt
    depth: int = 4  #: transformer blocks of the trained ViT (the depth study varies it)
    fold: int | None = None  #: None: the first fold whose test part passes the size check (size_neutral_fold)
    epochs: int = 60
    methods: tuple[str, ...] | None = None  #: None: every registered method
    max_nodules: int | None = None
    sanity_nodules: int = 2
    device: str = "auto"
    threads: int | None = 1
    workers: int | None = None
    #: The scan-space step: a cohort explain of the test scans (malignancy, 3D maps) scored in world coordinates.
    scan_space: bool = True

    def model_run(self, fold: int) -> str:
        """The training run's folder name: one per fold, depth and epoch count."""
        scans = "" if self.scans == KNOWN_CAUSE_SCANS else f"-{len(self.scans)}scans"
        return f"fold{fold}-depth{self.depth}-e{self.epochs}{scans}"


#: Diameter alone must stay near chance on the benchmark's test part, or size could stand in for the signs.
SIZE_NEUTRAL_AUROC = (0.4, 0.6)


def fold_size_aurocs(manifest: Path, n_folds: int = 5, seed: int = 0) -> list[float]:
    """AUROC of diameter alone for malignancy on each fold's test part (the training recipe's folds)."""
    from sklearn.metrics import roc_auc_score

    from ctcdam.data.folds import split_fold
    from ctcdam.manifest.schema import read_manifest

    frame = read_manifest(manifest)
    aurocs = []
    for fold in range(n_folds):
        test = frame.iloc[split_fold(frame, fold, n_folds, seed=seed).test].dropna(subset=["label"])
        aurocs.append(float(roc_auc_score(test["label"], test["diameter_mm"])))
    return aurocs


def size_neutral_fold(manifest: Path) -> int:
    """The first fold whose test part has diameter-alone AUROC inside SIZE_NEUTRAL_AUROC (chosen before training).

    When no fold passes (a small scan list), the fold closest to 0.5 is taken and a warning says so.
    """
    aurocs = fold_size_aurocs(manifest)
    passing = [k for k, a in enumerate(aurocs) if SIZE_NEUTRAL_AUROC[0] <= a <= SIZE_NEUTRAL_AUROC[1]]
    fold = passing[0] if passing else int(np.argmin(np.abs(np.asarray(aurocs) - 0.5)))
    listed = ", ".join(f"{a:.3f}" for a in aurocs)
    if passing:
        log.info("known-cause benchmark: fold %d (diameter-alone AUROC %.3f on its test part; all folds: %s)",
                 fold, aurocs[fold], listed)
    else:
        log.warning("known-cause benchmark: no fold has diameter-alone AUROC in %s (%s); fold %d is the closest",
                    SIZE_NEUTRAL_AUROC, listed, fold)
    return fold


def train_model(settings: BenchmarkSettings, manifest: Path, fold: int) -> Path:
    """Train the benchmark's ViT on the known-cause set (demo recipe, ``settings.depth`` blocks); reused when done."""
    from ctcdam.workflows.train import main as train_main

    checkpoint = settings.out_dir / "train" / settings.model_run(fold) / "best.ckpt"
    if checkpoint.is_file() and (checkpoint.parent / "metrics.json").is_file():
        return checkpoint
    args = [
        "--config", "demo", f"--data.manifest={manifest}", f"--out={settings.out_dir / 'train'}",
        f"--run={settings.model_run(fold)}", f"--data.fold={fold}", f"--trainer.max_epochs={settings.epochs}",
        "--trainer.enable_progress_bar=false",
        f"--model.backbone_kwargs={{patch_size: 4, embed_dim: 128, depth: {settings.depth}, num_heads: 4}}",
        f"--device={settings.device}",
    ]
    if settings.threads:
        args.append(f"--threads={settings.threads}")
    record = train_main(args)
    return Path(record["checkpoint"])


def _model_summary(checkpoint: Path) -> dict[str, float | int | None]:
    """The model's held-out malignancy AUROC against diameter alone, from its training record."""
    record = json.loads((checkpoint.parent / "metrics.json").read_text())
    test = record.get("test", record)
    return {"auroc": test.get("auroc"), "diameter_auroc": test.get("diameter_auroc"), "n": test.get("n")}


def benchmark_summary(run_dir: Path, checkpoint: Path, methods: Sequence[str]) -> dict:
    """The benchmark's JSON: the model, and per method the malignancy means over test nodules."""
    from ctcdam.evaluate.ground_truth import malignancy_summary
    from ctcdam.evaluate.summary import per_nodule

    table = pd.read_csv(run_dir / "ground_truth.csv")
    scores = pd.read_csv(run_dir / "metrics.csv")
    truth = malignancy_summary(table, methods)
    correctness = per_nodule(scores[scores["target"] == "malignancy"], ["correctness"]).groupby("method")["correctness"]
    means = correctness.mean()
    methods_out = {
        method: {**truth[method], "correctness": float(means[method]) if method in means else None}
        for method in methods
    }
    return {"model": _model_summary(checkpoint), "methods": methods_out}


def scan_space_rows(checkpoint: Path, max_nodules: int | None = None) -> pd.DataFrame:
    """The checkpoint's test-fold manifest rows (the first ``max_nodules``), cause-mask paths made absolute."""
    from ctcdam.manifest.schema import read_manifest
    from ctcdam.models.checkpoint import read_checkpoint

    data = read_checkpoint(checkpoint)["ctcdam"]["data"]
    manifest = Path(data["manifest"])
    frame = read_manifest(manifest).set_index("nodule_id", drop=False)
    ids = [str(i) for i in data["test_ids"] if str(i) in frame.index][: max_nodules or None]
    rows = frame.loc[ids].reset_index(drop=True)
    for column in CAUSE_COLUMNS:
        rows[column] = [str(path if Path(path).is_absolute() else manifest.parent / path) for path in rows[column]]
    return rows


def scan_space_step(settings: BenchmarkSettings, checkpoint: Path, run_dir: Path) -> dict:
    """Explain the test scans (malignancy, 3D maps, review bundles) and score the maps' mass centres in world space.

    The bundles go to ``<out_dir>/explain/<model run>/`` (kept and re-verified on a rerun); ``run_dir`` gets
    ``scan_space.csv`` and a section of ``summary.md``; the result is the benchmark JSON's ``scan_space``.
    """
    import time

    from ctcdam.cli.common import torch_threads
    from ctcdam.evaluate.scan_space import (
        SCAN_SPACE_HEADING,
        scan_space_markdown,
        scan_space_summary,
        scan_space_table,
    )
    from ctcdam.explain.cause_metrics import SCAN_SPACE_DILATION_MM
    from ctcdam.targets import MALIGNANCY
    from ctcdam.workflows.explain_cohort import run_cohort

    method = "cdam"
    rows = scan_space_rows(checkpoint, settings.max_nodules)
    scans = list(dict.fromkeys(rows["scan_id"].astype(str)))
    cohort_root = settings.out_dir / "explain" / checkpoint.parent.name
    started = time.perf_counter()
    with torch_threads(settings.threads):
        # One target and the 3D map: what the step reads; the bundles are the ordinary ones a reader opens.
        outcome = run_cohort(cohort_root, scans=scans, checkpoint=checkpoint, method=method, targets=(MALIGNANCY,),
                             volume=True, device=settings.device, workers=1, resume=True, sort_by="scan")
    explain_s = time.perf_counter() - started
    started = time.perf_counter()
    table = scan_space_table(cohort_root, rows, method, MALIGNANCY, SCAN_SPACE_DILATION_MM)
    score_s = time.perf_counter() - started
    io.write_csv(run_dir / "scan_space.csv", table)
    summary = {
        "target": MALIGNANCY, "method": method, "coordinates": "LPS", "dilation_mm": SCAN_SPACE_DILATION_MM,
        "explain_dir": str(cohort_root), "scans": len(scans), "scans_explained": outcome.scans_run,
        "scans_failed": outcome.scans_failed, "seconds": {"explain": round(explain_s, 1), "score": round(score_s, 1)},
        "signs": scan_space_summary(table),
    }
    report = run_dir / "summary.md"
    text = report.read_text() if report.is_file() else ""
    # A rerun on the same run folder replaces its section instead of adding a second one.
    kept = text.split("\n" + SCAN_SPACE_HEADING, 1)[0].rstrip("\n")
    io.write_text(report, kept + "\n" + scan_space_markdown(summary))
    log.info("scan space: %d scan(s) explained in %.1f s, %d rows scored in %.1f s (%s)", outcome.scans_run,
             explain_s, len(table), score_s, run_dir / "scan_space.csv")
    return summary


def run_benchmark(settings: BenchmarkSettings) -> tuple[Path, dict]:
    """Data, model, evaluation of every method on the known-cause set, tables and a picture; (run folder, JSON)."""
    from ctcdam.evaluate import DEFAULT_METHODS, EvaluationConfig, evaluate

    data = known_cause_data(settings.cache_dir, scans=settings.scans, workers=settings.workers)
    if settings.checkpoint:
        checkpoint = Path(settings.checkpoint)
    else:
        fold = settings.fold if settings.fold is not None else size_neutral_fold(data.manifest)
        checkpoint = train_model(settings, data.manifest, fold)
    methods = tuple(settings.methods or DEFAULT_METHODS)
    run_dir = evaluate(EvaluationConfig(
        checkpoint=checkpoint, out_dir=settings.out_dir / "evaluate", run=checkpoint.parent.name, methods=methods,
        targets=BENCHMARK_TARGETS, max_nodules=settings.max_nodules, sanity_nodules=settings.sanity_nodules,
        device=settings.device, progress=False,
    ))
    summary = benchmark_summary(run_dir, checkpoint, methods)
    if settings.scan_space:
        summary["scan_space"] = scan_space_step(settings, checkpoint, run_dir)
    summary = io.json_safe(summary)  # what the file holds (JSON has no NaN)
    io.write_json(run_dir / "known_cause.json", summary)
    from ctcdam.evaluate.known_cause_figure import write_known_cause_figure

    write_known_cause_figure(checkpoint, data.manifest, run_dir / "known_cause.png")
    return run_dir, summary
