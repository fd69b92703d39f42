"""A cohort explain run: one model load for many scans, sharded across machines, an index and a worklist for the reader.

The scans come from ``--scans``, ``--scans-file`` or ``--split`` (the checkpoint's own folds: the scans holding
its train, val or test nodules). The model loads once; worker processes (``ctcdam.workflows.explain_workers``)
load and crop the next scans and write the finished bundles while the model explains the current scan, the images
of all its nodules packed into calls of ``batch`` images (with one worker, the model's process loads and crops
each scan before its maps, and the worker only writes).

Every scan ends as one unit ``OUT/<scan_id>/``, published in one rename: its review bundle with a record,
``bundle.json`` (the settings, the stage seconds, the size and SHA-256 of every file), or, when the scan could not
be explained, the record alone (stage and reason). One scan failing never stops the others. ``shard=(i, n)``
explains every n-th selected scan from i; ``resume`` re-verifies every finished unit of the shard against its
record and redoes the missing, damaged or differently made ones. Whatever shard runs, the index covers every
selected scan, so the last shard to finish (or a final ``resume`` run, which recomputes nothing) assembles the
whole cohort:

- ``index.csv``: one row per nodule (scan, nodule, fold part, predictions, the radiologists' values, bundle path,
  note) sorted for review (most suspicious first: highest p(malignancy), or ``sort_by`` another target or
  ``scan``), then one row per nodule or scan that has no bundle, with the error;
- ``failures.csv``: scan, nodule, stage, reason of every failed scan and skipped nodule;
- ``review_cohort.py``: the worklist for 3D Slicer (``ctcdam.workflows.worklist``); the reader's ratings go to
  ``ratings.csv`` beside the index, which no run ever rewrites.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctcdam import io
from ctcdam.export.paths import check_output_root
from ctcdam.models.device import resolve_device
from ctcdam.targets import MALIGNANCY, TARGETS
from ctcdam.workflows import worklist
from ctcdam.workflows.sources import check_scan_present, existing_checkpoint, newest_checkpoint, recorded_lidc_root

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
#: Sort orders of the index: a target's prediction, highest first, or scan order.
SORT_KEYS = (*TARGETS, "scan")
FAILURES_FILE = "failures.csv"
#: Bump when a bundle's content changes meaning: --resume then redoes bundles of an older version.
COHORT_VERSION = 1
INDEX_COLUMNS = ("rank", "scan_id", "nodule_id", "nodule", "labelled", "split",
                 *(f"pred_{t}" for t in TARGETS), *(f"readers_{t}" for t in TARGETS), "bundle", "note", "error")
FAILURE_COLUMNS = ("scan_id", "nodule_id", "stage", "reason")
DEFAULT_BATCH = 256


def read_scans_file(path: Path) -> list[str]:
    """Scan ids of a text file, one per line (blank lines and ``#`` comments ignored); ValueError when it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--scans-file {path} does not exist")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"--scans-file {path} lists no scan id (one per line)")
    return ids


def split_nodules(data: Mapping[str, Any]) -> dict[str, str]:
    """The checkpoint's fold part of each nodule id: train, val or test."""
    return {str(nodule): part for part in ("train", "val", "test") for nodule in data.get(f"{part}_ids", [])}


def split_scans(data: Mapping[str, Any], split: str) -> list[str]:
    """The scans holding the checkpoint's nodules of ``split`` (train, val, test or all), via its manifest (or,
    when the manifest cannot be read, the ``<scan_id>-n<k>`` form of the nodule ids)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    parts = ("train", "val", "test") if split == "all" else (split,)
    nodules = {str(n) for part in parts for n in data.get(f"{part}_ids", [])}
    if not nodules:
        raise ValueError(f"the checkpoint's {split} fold holds no nodule (ctcdam.data.{split}_ids)")
    try:
        from ctcdam.manifest.schema import read_manifest

        frame = read_manifest(data["manifest"])
        scans = {str(s) for s, n in zip(frame["scan_id"], frame["nodule_id"].astype(str)) if n in nodules}
    except (KeyError, OSError, ValueError):
        log.warning("the checkpoint's manifest cannot be read: scan ids taken from the nodule ids")
        scans = {n.rsplit("-n", 1)[0] for n in nodules}
    return sorted(scans)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (the checkpoint's identity in the bundles' records)."""
    sha = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


@dataclass(frozen=True)
class CohortOutcome:
    """The end of a cohort run: counts for the closing summary and where the outputs are."""

    out_root: Path
    checkpoint: Path
    lidc_root: Path
    scans_selected: int
    scans_run: int  # this shard's, explained now
    scans_resumed: int  # this shard's, verified and kept
    scans_ok: int
    scans_failed: int
    scans_pending: int  # selected, without a finished unit (other shards, or a worker that died)
    nodules: int
    seconds: float

    @property
    def index(self) -> Path:
        """The cohort index."""
        return self.out_root / worklist.INDEX_FILE

    def summary(self) -> str:
        """What the CLI prints."""
        lines = [f"checkpoint: {self.checkpoint}", f"data: {self.lidc_root}",
                 f"{self.scans_selected} scan(s) selected: {self.scans_ok} explained, {self.scans_failed} failed "
                 f"(see {self.out_root / FAILURES_FILE}), {self.scans_pending} pending; this run explained "
                 f"{self.scans_run} and kept {self.scans_resumed} finished bundle(s), in {self.seconds:.1f} s",
                 f"{self.nodules} nodule(s) in the index {self.index}"]
        if self.scans_pending:
            lines.append("pending scans: other shards still running, or rerun with --resume")
        lines.append(f"worklist: Slicer --python-script {self.out_root / worklist.REVIEW_COHORT_FILE} "
                     f"(ratings go to {self.out_root / worklist.RATINGS_FILE})")
        return "\n".join(lines)


def _value(value: Any) -> str:
    """A number as the index writes it (6 significant digits: equal on every machine and thread count)."""
    return "" if value is None else f"{float(value):.6g}"


def _natural(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text)))


def _nodule_row(scan_id: str, nodule: Mapping[str, Any], parts: Mapping[str, str]) -> dict[str, str]:
    row = {"scan_id": scan_id, "nodule_id": nodule["nodule_id"], "nodule": str(nodule["index"]),
           "labelled": str(bool(nodule["labelled"])).lower(), "split": parts.get(nodule["nodule_id"], ""),
           "bundle": f"{scan_id}/{scan_id}.mrb", "note": " ".join(str(nodule.get("note", "")).split()), "error": ""}
    row |= {f"pred_{t}": _value(nodule["predictions"].get(t)) for t in TARGETS}
    row |= {f"readers_{t}": _value(nodule["radiologists"].get(t)) for t in TARGETS}
    return row


def _error_row(scan_id: str, nodule_id: str, error: str, parts: Mapping[str, str]) -> dict[str, str]:
    return {"scan_id": scan_id, "nodule_id": nodule_id, "split": parts.get(nodule_id, ""),
            "error": " ".join(error.split())}


def assemble_index(out_root: Path, scan_ids: Sequence[str], settings: Mapping[str, Any], parts: Mapping[str, str],
                   sort_by: str = MALIGNANCY) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, int]]:
    """Index rows, failure rows and counts (ok, failed, pending, nodules) from the units of ``scan_ids``."""
    from ctcdam.export.bundle import read_record, unit_problem

    rows, errors, failures = [], [], []
    counts = {"ok": 0, "failed": 0, "pending": 0, "nodules": 0}
    for scan_id in scan_ids:
        folder = Path(out_root) / scan_id
        problem = unit_problem(folder, settings, deep=False)
        record = None if problem else read_record(folder)
        if record is None:
            counts["pending"] += 1
            errors.append(_error_row(scan_id, "", f"pending: {problem or 'no record'}", parts))
            continue
        if record.get("status") == "failed":
            counts["failed"] += 1
            failure = record.get("failure", {})
            errors.append(_error_row(scan_id, "", f"{failure.get('stage', '')}: {failure.get('reason', '')}", parts))
            failures.append({"scan_id": scan_id, "nodule_id": "", **failure})
            continue
        counts["ok"] += 1
        document = json.loads((folder / "predictions.json").read_text())
        rows += [_nodule_row(scan_id, nodule, parts) for nodule in document["nodules"]]
        for skipped in document.get("skipped_nodules", []):
            errors.append(_error_row(scan_id, skipped["nodule_id"], f"not explained: {skipped['reason']}", parts))
            failures.append({"scan_id": scan_id, "nodule_id": skipped["nodule_id"], "stage": "nodule",
                             "reason": skipped["reason"]})
    counts["nodules"] = len(rows)
    if sort_by == "scan":
        rows.sort(key=lambda r: (_natural(r["scan_id"]), int(r["nodule"])))
    else:
        # Most suspicious first; a missing prediction last; ties in scan order.
        rows.sort(key=lambda r: (r[f"pred_{sort_by}"] == "", -float(r[f"pred_{sort_by}"] or 0.0),
                                 _natural(r["scan_id"]), int(r["nodule"])))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = str(rank)
    errors.sort(key=lambda r: (_natural(r["scan_id"]), _natural(r["nodule_id"])))
    failures.sort(key=lambda r: (_natural(r["scan_id"]), _natural(r["nodule_id"])))
    return rows + errors, failures, counts


def _write_table(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> Path:
    with io.atomic_file(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_review_cohort(out_root: Path) -> Path:
    """``review_cohort.py``: the worklist module's own source, runnable in 3D Slicer."""
    header = ("# The worklist of this cohort, written by ctcdam's cohort explain run (the source of\n"
              "# ctcdam/workflows/worklist.py). In 3D Slicer: Slicer --python-script review_cohort.py\n")
    return io.write_text(Path(out_root) / worklist.REVIEW_COHORT_FILE, header + inspect.getsource(worklist))


def _explain_cohort(todo: Sequence[str], pool: Any, loaded: Any, settings: Any, concept_query: str | None,
                    batch: int | None, out_root: Path, record_settings: Mapping[str, Any], checkpoint: Path,
                    lidc_root: Path) -> int:
    """Explain ``todo`` through ``pool`` (the model here, writing there, preparing there or, with one worker, here);
    returns the scans with a unit."""
    from ctcdam.export.bundle import write_failed_unit
    from ctcdam.workflows.concept import build_concept
    from ctcdam.workflows.explain_scan import explain_prepared, prepare_spec
    from ctcdam.workflows.explain_workers import PREPARE, WRITE, run_task

    concept = build_concept(loaded, concept_query) if concept_query else None  # once for the cohort
    # The model inputs (the training transforms of every slice) go to the workers when there are several; with one,
    # this process prepares the scans and makes their inputs, and the worker writes.
    spec = prepare_spec(loaded, lidc_root, settings if pool.size >= 2 else None)
    base_record = {"settings": dict(record_settings), "checkpoint": str(Path(checkpoint).resolve())}

    def failed(scan_id: str, stage: str, reason: str, seconds: Mapping[str, float]) -> None:
        log.warning("%s: %s failed: %s", scan_id, stage, reason)
        write_failed_unit(out_root, scan_id, {**base_record, "scan_id": scan_id, "seconds": dict(seconds),
                                              "failure": {"stage": stage, "reason": reason}})

    queued, ready = deque(todo), OrderedDict()
    preparing, writing, finished = set(), set(), 0
    ahead = pool.size + 1  # scans held in memory beyond the one the model works on
    # With one worker, this process prepares each scan itself (series, crops) between the model's scans and the
    # worker only writes bundles: writing is the longer part, and this process would otherwise wait for it (a
    # worker that also prepared when idle was no faster: its first scan loads pylidc and the readers cold).
    prepare_here = pool.size == 1
    while queued or ready or preparing or writing:
        outcome = None
        if prepare_here and queued and not ready:
            scan_id = queued.popleft()
            outcome = run_task(PREPARE, scan_id, spec, out_root, None)
        while not prepare_here and queued and len(preparing) + len(ready) < ahead:
            scan_id = queued.popleft()
            preparing.add(scan_id)
            pool.submit(PREPARE, scan_id, spec)
        if outcome is None and ready and len(writing) < ahead:
            scan_id, prepared = ready.popitem(last=False)
            try:
                result = explain_prepared(prepared, loaded, settings, concept, images_per_call=batch)
            except Exception as error:  # a scan the model cannot take must not end the cohort
                failed(scan_id, "explain", " ".join(f"{type(error).__name__}: {error}".split()), prepared.seconds)
                finished += 1
                continue
            timing = result.details["timing"]
            seconds = {"load": timing["load_s"], "crop": timing["crop_s"], "maps": timing["maps_s"]}
            writing.add(scan_id)
            pool.submit(WRITE, scan_id, (result, {**base_record, "scan_id": scan_id, "seconds": seconds}))
            continue
        if outcome is None:
            outcome = pool.next_outcome()
            (preparing if outcome.kind == PREPARE else writing).discard(outcome.scan_id)
        if outcome.output_error:
            raise io.OutputError(outcome.output_errno, outcome.output_error)
        if outcome.lost:
            continue
        if not outcome.ok:
            failed(outcome.scan_id, outcome.stage, outcome.reason, {})
            finished += 1
        elif outcome.kind == PREPARE:
            ready[outcome.scan_id] = outcome.value
        else:
            finished += 1
            log.info("%s: bundle written to %s", outcome.scan_id, outcome.value)
    return finished


def _settings(method: str, targets: tuple[str, ...] | None, views: tuple[str, ...] | None, volume: bool,
              concept: str | None, method_options: Mapping[str, Any] | None) -> Any:
    from ctcdam.workflows.explain_scan import ExplainSettings

    defaults = ExplainSettings()
    return ExplainSettings(method=method, targets=tuple(targets or defaults.targets),
                           views=tuple(views or defaults.views), volume=volume, concept=concept,
                           method_options=dict(method_options or {}))


def bundle_settings(loaded: Any, checkpoint: Path, lidc_root: Path, settings: Any) -> dict[str, Any]:
    """What makes two bundles of a scan the same (their records compare it on --resume): the checkpoint's bytes,
    the data root, the method and its options, targets, views, 3D map, concept, the trained preprocessing, and for
    a known-cause checkpoint the causes shown as segments."""
    from ctcdam.workflows.explain_causes import BUNDLE_CAUSES, cause_source
    from ctcdam.workflows.explain_scan import trained_config

    record = {
        "version": COHORT_VERSION, "checkpoint_sha256": file_sha256(checkpoint),
        "lidc_root": str(Path(lidc_root).resolve()), "method": settings.method, "targets": list(settings.targets),
        "views": list(settings.views), "volume": settings.volume, "concept": settings.concept,
        "method_options": dict(settings.method_options), "preprocess": trained_config(loaded).as_record()}
    if cause_source(loaded.data, lidc_root):
        # Only known-cause bundles carry it: a bundle written before they showed causes is redone on --resume,
        # every other bundle is kept.
        record["known_causes"] = list(BUNDLE_CAUSES)
    return io.json_safe(record)


@dataclass(frozen=True)
class _Plan:
    """A run's model, data root, cohort, this shard's scans (and which of them are still to explain), settings."""

    loaded: Any
    lidc_root: Path
    selected: list[str]
    mine: list[str]
    todo: list[str]
    record_settings: dict[str, Any]


def _plan(out_root: Path, checkpoint: Path, lidc_root: Path | None, explicit: Sequence[str], split: str | None,
          shard: tuple[int, int], resume: bool, device: str, settings: Any) -> _Plan:
    """Load the model, select the cohort and this shard's scans still to explain (re-verifying finished ones)."""
    from ctcdam.export.bundle import unit_problem
    from ctcdam.models.checkpoint import load_for_inference

    loaded = load_for_inference(checkpoint, map_location=resolve_device(device))
    if lidc_root is None:
        lidc_root = recorded_lidc_root(loaded.data, checkpoint)
        for scan_id in explicit:
            check_scan_present(scan_id, lidc_root)
    lidc_root = Path(lidc_root)
    selected = sorted(explicit if split is None else split_scans(loaded.data, split), key=_natural)
    record_settings = bundle_settings(loaded, checkpoint, lidc_root, settings)
    mine = selected[shard[0]::shard[1]]
    todo = []
    for scan_id in mine:
        problem = unit_problem(out_root / scan_id, record_settings) if resume else "no --resume"
        if problem is None:
            continue
        if resume and problem != "no finished bundle":
            log.warning("resume: redoing %s: %s", scan_id, problem)
        todo.append(scan_id)
    log.info("cohort: %d scan(s) selected, %d in this shard, %d to explain", len(selected), len(mine), len(todo))
    return _Plan(loaded=loaded, lidc_root=lidc_root, selected=selected, mine=mine, todo=todo,
                 record_settings=record_settings)


def run_cohort(
    out_root: Path,
    *,
    scans: Sequence[str] | None = None,
    split: str | None = None,
    scans_file: Path | None = None,
    checkpoint: Path | None = None,
    lidc_root: Path | None = None,
    method: str = "cdam",
    targets: tuple[str, ...] | None = None,
    views: tuple[str, ...] | None = None,
    volume: bool = True,
    concept: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    device: str = "auto",
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    resume: bool = False,
    batch: int | None = DEFAULT_BATCH,
    sort_by: str = MALIGNANCY,
) -> CohortOutcome:
    """Explain a cohort (exactly one of ``scans``, ``split``, ``scans_file``) into ``out_root`` (see the module)."""
    started = time.perf_counter()
    if sum(x is not None for x in (scans, split, scans_file)) != 1:
        raise ValueError("choose the cohort with exactly one of --scans, --split and --scans-file")
    shard_index, shard_count = shard
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index}/{shard_count} is invalid: need 0 <= i < n")
    if sort_by not in SORT_KEYS:
        raise ValueError(f"unknown sort key {sort_by!r}; choose one of {', '.join(SORT_KEYS)}")
    out_root = check_output_root(Path(out_root))
    checkpoint = existing_checkpoint(checkpoint) if checkpoint is not None else newest_checkpoint()
    explicit = list(dict.fromkeys(read_scans_file(scans_file) if scans_file is not None else (scans or [])))
    if lidc_root is not None:
        for scan_id in explicit:
            check_scan_present(scan_id, lidc_root)  # a mistyped id stops the run before the model loads

    from ctcdam.export.paths import prepare_output_root
    from ctcdam.workflows.explain_workers import workers as worker_pool

    out_root = prepare_output_root(out_root)
    for stale in io.remove_stale_temporaries(out_root):
        log.info("removed %s left by an interrupted run", stale)
    # The workers start first: their imports run while this process imports torch and loads the model.
    with worker_pool(workers, out_root) as pool:
        settings = _settings(method, targets, views, volume, concept, method_options)
        plan = _plan(out_root, checkpoint, lidc_root, explicit, split, shard, resume, device, settings)
        if plan.todo:
            _explain_cohort(plan.todo, pool, plan.loaded, settings, concept, batch, out_root, plan.record_settings,
                            checkpoint, plan.lidc_root)
    parts = split_nodules(plan.loaded.data)
    rows, failures, counts = assemble_index(out_root, plan.selected, plan.record_settings, parts, sort_by)
    _write_table(out_root / worklist.INDEX_FILE, INDEX_COLUMNS, rows)
    _write_table(out_root / FAILURES_FILE, FAILURE_COLUMNS, failures)
    write_review_cohort(out_root)
    return CohortOutcome(out_root=out_root, checkpoint=Path(checkpoint), lidc_root=plan.lidc_root,
                         scans_selected=len(plan.selected), scans_run=len(plan.todo),
                         scans_resumed=len(plan.mine) - len(plan.todo),
                         scans_ok=counts["ok"], scans_failed=counts["failed"], scans_pending=counts["pending"],
                         nodules=counts["nodules"], seconds=time.perf_counter() - started)
