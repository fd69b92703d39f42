"""pipelines/explain.py on a cohort: a fold of the checkpoint, the index and the worklist, kills and resumes, shards.

The model is the hand-built soft-tissue ViT of tests/test_explain_pipeline.py, saved with a split of the synthetic
manifest: the nodules of LIDC-IDRI-0407 are its training fold, those of LIDC-IDRI-0237 its test fold. Runs are
kept small (malignancy only, centre slices, no 3D map).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
import signal
import sys
from pathlib import Path

import pydicom
import pytest
import torch

from ctcdam import io
from ctcdam.export.bundle import RECORD_FILE, read_record
from ctcdam.targets import TARGETS
from ctcdam.workflows import worklist
from ctcdam.workflows.explain_cohort import FAILURES_FILE, INDEX_COLUMNS
from tests.test_explain_pipeline import EXPLAIN_SCRIPT, SOFT_TISSUE_WINDOW, _cli_main, soft_tissue_vit

TRAIN_SCAN, TEST_SCAN = "LIDC-IDRI-0407", "LIDC-IDRI-0237"
SMALL = ["--targets", "malignancy", "--no-volume", "--threads", "1"]


@pytest.fixture(scope="module")
def fold_checkpoint(synthetic_lidc, synthetic_manifest, tmp_path_factory) -> Path:
    """The soft-tissue ViT as a ctcdam checkpoint whose folds are: train = LIDC-IDRI-0407, test = LIDC-IDRI-0237."""
    from ctcdam.data.labels import BiomarkerScaler
    from ctcdam.data.transforms import InputConfig
    from ctcdam.manifest.schema import biomarker_matrix
    from ctcdam.models.checkpoint import checkpoint_record

    out_dir, frame = synthetic_manifest
    input_config = InputConfig(img_size=32, window=SOFT_TISSUE_WINDOW)
    config = {"backbone": "vit_tiny_patch16_224", "img_size": 32, **input_config.to_dict(),
              "model_kwargs": {"patch_size": 2, "embed_dim": 4, "depth": 1, "num_heads": 1},
              "crop_shape": [32, 32, 32], "crop_mm": [32.0] * 3, "spacing_mm": [1.0] * 3,
              "views": ["axial", "coronal", "sagittal"], "targets": list(TARGETS), "finetune": "full", "weights": "none"}
    ids = {scan: frame.loc[frame["scan_id"] == scan, "nodule_id"].tolist() for scan in (TRAIN_SCAN, TEST_SCAN)}
    data = {"manifest": str((Path(out_dir) / "manifest.csv").resolve()), "lidc_root": str(synthetic_lidc.root),
            "fold": 0, "seed": 0, "train_ids": ids[TRAIN_SCAN], "val_ids": [], "test_ids": ids[TEST_SCAN]}
    record = checkpoint_record(config, BiomarkerScaler.fit(biomarker_matrix(frame)), data)
    model = soft_tissue_vit(input_config)
    path = tmp_path_factory.mktemp("fold-model") / "soft-tissue-folds.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "ctcdam": record}, path)
    return path


def _argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--scans", TRAIN_SCAN, TEST_SCAN, "--checkpoint", str(checkpoint), "--out", str(out), *SMALL,
            "--workers", "0", *extra]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _bundle_contents(folder: Path) -> dict[str, object]:
    """File name -> bytes (timings dropped from predictions.json and the record): equal runs give equal contents."""
    contents: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in ("predictions.json", RECORD_FILE):
            document = json.loads(path.read_text())
            document.pop("seconds", None)
            document.get("timing", {}).clear()
            document.get("files", {}).pop("predictions.json", None)  # its size and digest carry its timings
            contents[name] = document
        else:
            contents[name] = path.read_bytes()
    return contents


@pytest.fixture(scope="module")
def reference(fold_checkpoint, tmp_path_factory) -> tuple[Path, bytes, int]:
    """An uninterrupted cohort run of both scans, in a child that counts its write points: (out, index, points)."""
    from tests.faulty_runs import run_faulty_pipeline

    out = tmp_path_factory.mktemp("cohort-reference")
    counter = out.parent / f"{out.name}.count"
    assert run_faulty_pipeline(EXPLAIN_SCRIPT, _argv(fold_checkpoint, out), counter, at=10**9) == 0
    return out, (out / worklist.INDEX_FILE).read_bytes(), counter.stat().st_size


def test_split_test_writes_every_bundle_of_the_fold_the_index_and_the_worklist(fold_checkpoint, tmp_path, capsys):
    out = tmp_path / "test-fold"
    argv = ["--split", "test", "--checkpoint", str(fold_checkpoint), "--out", str(out), *SMALL, "--workers", "1"]
    assert _cli_main()(argv) == 0
    assert "1 scan(s) selected: 1 explained" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [TEST_SCAN]  # the test fold, nothing else
    record = read_record(out / TEST_SCAN)
    assert record["status"] == "ok" and set(record["seconds"]) == {"load", "crop", "maps", "write"}
    assert {f"{TEST_SCAN}.mrb", "predictions.json", "views.png", "report.png"} <= set(record["files"])

    rows = _rows(out / worklist.INDEX_FILE)
    assert list(rows[0]) == list(INDEX_COLUMNS)
    predictions = json.loads((out / TEST_SCAN / "predictions.json").read_text())["nodules"]
    assert [r["nodule_id"] for r in rows] == [n["nodule_id"] for n in
                                             sorted(predictions, key=lambda n: -n["predictions"]["malignancy"])]
    assert [r["rank"] for r in rows] == ["1", "2", "3"]  # most suspicious first
    by_id = {n["nodule_id"]: n for n in predictions}
    for row in rows:
        nodule = by_id[row["nodule_id"]]
        assert float(row["pred_malignancy"]) == pytest.approx(nodule["predictions"]["malignancy"], rel=1e-5)
        assert row["bundle"] == f"{TEST_SCAN}/{TEST_SCAN}.mrb" and (out / row["bundle"]).is_file()
        # the fold of each nodule: n1 (2 readers) is in no fold, n2 and n3 are the checkpoint's test nodules
        assert row["split"] == ("" if row["nodule_id"].endswith("-n1") else "test")
        if nodule["labelled"]:
            assert float(row["readers_malignancy"]) == nodule["radiologists"]["malignancy"]
    assert _rows(out / FAILURES_FILE) == []

    # The worker's long-lived Slicer renderer drew the views as Slicer opens the bundle's .mrb.
    from ctcdam.export.slicer_render import CAPTION_KEY, compose_views, render_bundle_views, rendering_problem

    if rendering_problem() is None:
        import numpy as np
        from PIL import Image

        png = Image.open(out / TEST_SCAN / "views.png")
        expected = compose_views(render_bundle_views(out / TEST_SCAN / f"{TEST_SCAN}.mrb"), png.text[CAPTION_KEY])
        written = np.asarray(png.convert("RGB")).astype(int)
        assert written.shape == expected.shape
        assert (np.abs(written - expected.astype(int)).max(axis=-1) <= 2).mean() > 0.999

    # The worklist written into the cohort folder records a rating through its own code (Slicer's MRML table node).
    pytest.importorskip("slicer", reason="3D Slicer's libraries (slicer-core) are not installed")
    import slicer

    spec = importlib.util.spec_from_file_location("review_cohort", out / worklist.REVIEW_COHORT_FILE)
    review = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = review  # as Slicer runs it: a module of its own (its dataclass needs one)
    try:
        spec.loader.exec_module(review)
    finally:
        sys.modules.pop(spec.name, None)
    table = review.worklist_table(slicer.vtkMRMLScene(), str(out), reader="dr-a")
    assert table.GetNumberOfRows() == 3 and table.GetCellText(0, 2) == rows[0]["nodule_id"]
    review.rate(table, 0, "partly", str(out), comment="edge of the nodule", reader="dr-a")
    assert _rows(out / worklist.RATINGS_FILE)[0] | {"rated_at": ""} == {
        "scan_id": TEST_SCAN, "nodule_id": rows[0]["nodule_id"], "rating": "partly", "comment": "edge of the nodule",
        "reader": "dr-a", "rated_at": ""}
    where = review.nodule_view(str(out), review.read_index(str(out))[0])
    assert Path(where["mrb"]).is_file() and where["map_name"].endswith("CDAM malignancy")


def test_a_killed_cohort_run_resumed_ends_with_the_same_index(fold_checkpoint, reference, tmp_path):
    from tests.faulty_runs import run_faulty_pipeline

    ref_out, ref_index, n_points = reference
    expected = {scan: _bundle_contents(ref_out / scan) for scan in (TRAIN_SCAN, TEST_SCAN)}
    # Inside the second scan's bundle (the first one is finished), and after both bundles, just before the index.
    for at, finished in ((n_points * 3 // 4, [TEST_SCAN]), (n_points - 6, [TEST_SCAN, TRAIN_SCAN])):
        out = tmp_path / f"killed-{at}"
        status = run_faulty_pipeline(EXPLAIN_SCRIPT, _argv(fold_checkpoint, out), tmp_path / f"count-{at}", at)
        assert status == -signal.SIGKILL, f"not killed at write point {at} of {n_points}"
        assert [s for s in (TEST_SCAN, TRAIN_SCAN) if read_record(out / s)] == finished, at
        assert not (out / worklist.INDEX_FILE).exists()
        assert _cli_main()(_argv(fold_checkpoint, out, "--resume")) == 0
        assert (out / worklist.INDEX_FILE).read_bytes() == ref_index, at
        for scan, contents in expected.items():
            assert _bundle_contents(out / scan) == contents, (at, scan)
        assert not [p for p in out.rglob("*") if io.is_temporary(p)], at


def test_two_shards_and_an_assembling_run_give_the_unsharded_index(fold_checkpoint, reference, tmp_path, capsys):
    _, ref_index, _ = reference
    out = tmp_path / "sharded"
    assert _cli_main()(_argv(fold_checkpoint, out, "--shard", "0/2")) == 0
    pending = [r for r in _rows(out / worklist.INDEX_FILE) if r["error"].startswith("pending")]
    assert [r["scan_id"] for r in pending] == [TRAIN_SCAN]  # the other shard's scan, listed until it is done
    assert _cli_main()(_argv(fold_checkpoint, out, "--shard", "1/2")) == 0
    capsys.readouterr()
    assert _cli_main()(_argv(fold_checkpoint, out, "--resume")) == 0
    assert "this run explained 0 and kept 2 finished bundle(s)" in capsys.readouterr().out
    assert (out / worklist.INDEX_FILE).read_bytes() == ref_index


def test_resume_redoes_a_damaged_bundle_and_keeps_the_others(fold_checkpoint, reference, tmp_path, caplog):
    ref_out, ref_index, _ = reference
    out = tmp_path / "damaged"
    shutil.copytree(ref_out, out)
    ct = out / TRAIN_SCAN / "ct.nii.gz"
    ct.write_bytes(ct.read_bytes()[:1000])
    kept = (out / TEST_SCAN / RECORD_FILE).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="ctcdam.workflows.explain_cohort"):
        assert _cli_main()(_argv(fold_checkpoint, out, "--resume")) == 0
    assert any(f"redoing {TRAIN_SCAN}" in r.message and "truncated" in r.message for r in caplog.records)
    assert (out / TEST_SCAN / RECORD_FILE).stat().st_mtime_ns == kept
    assert (out / worklist.INDEX_FILE).read_bytes() == ref_index


def test_a_scan_that_fails_is_one_row_and_the_others_go_on(fold_checkpoint, synthetic_lidc, tmp_path):
    root = tmp_path / "lidc"
    shutil.copytree(synthetic_lidc.root, root)
    series = sorted((root / TRAIN_SCAN).rglob("*.dcm"),
                    key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    series[len(series) // 2].unlink()  # a gap inside the series: the strict loader refuses it
    out = tmp_path / "out"
    assert _cli_main()(_argv(fold_checkpoint, out, "--lidc-root", str(root))) == 0
    failures = _rows(out / FAILURES_FILE)
    assert [(f["scan_id"], f["nodule_id"], f["stage"]) for f in failures] == [(TRAIN_SCAN, "", "load")]
    assert "missing inside the present z range" in failures[0]["reason"]
    rows = _rows(out / worklist.INDEX_FILE)
    assert {r["scan_id"] for r in rows if not r["error"]} == {TEST_SCAN}
    assert [r["scan_id"] for r in rows if r["error"]] == [TRAIN_SCAN] and rows[-1]["error"].startswith("load: ")
    assert read_record(out / TRAIN_SCAN)["status"] == "failed" and (out / TEST_SCAN / f"{TEST_SCAN}.mrb").is_file()


def test_cohort_arguments_and_inputs_are_refused_in_one_sentence(fold_checkpoint, synthetic_lidc, tmp_path, capsys):
    common = ["--checkpoint", str(fold_checkpoint), "--out", str(tmp_path / "out"), "--workers", "0"]
    cases = [
        (["--scans", TEST_SCAN, "LIDC-IDRI-0238", "--lidc-root", str(synthetic_lidc.root), *common],
         "closest scan ids there: LIDC-IDRI-0237"),
        (["--scans-file", str(tmp_path / "none.txt"), *common], "none.txt does not exist"),
        (["--split", "val", *common, "--no-volume"], "the checkpoint's val fold holds no nodule"),
    ]
    for argv, says in cases:
        assert _cli_main()(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for bad in (["--shard", "2/2"], ["--workers", "-1"], ["--scan", TEST_SCAN, "--split", "test"]):
        with pytest.raises(SystemExit) as exit_info:
            _cli_main()(["--scans", TEST_SCAN, *bad] if bad[0] != "--scan" else bad)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_bundles_and_the_index_do_not_depend_on_the_worker_processes(fold_checkpoint, reference, tmp_path, workers):
    # One worker: this process prepares the scans and the worker writes; two: the workers prepare (with the model
    # inputs) and write. Either way the bundles and the index are those of the run in one process.
    ref_out, ref_index, _ = reference
    out = tmp_path / f"workers-{workers}"
    argv = _argv(fold_checkpoint, out)
    argv[argv.index("--workers") + 1] = workers
    assert _cli_main()(argv) == 0
    assert (out / worklist.INDEX_FILE).read_bytes() == ref_index
    for scan in (TRAIN_SCAN, TEST_SCAN):
        assert _bundle_contents(out / scan) == _bundle_contents(ref_out / scan), scan
