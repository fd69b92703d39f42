"""Hostile DICOM: property-based mutations of a real synthetic series always end as a failures.csv reason.

Each example copies the generated LIDC-IDRI-0001 series (13 slices), damages one or all slices in one way
(a deleted tag, a wrong value representation, bad spacing, a flipped or non-orthonormal orientation, Rows or
Columns that do not match the pixels, short or oversized pixel data, absurd dimensions, a copied
SOPInstanceUID, a file that is not DICOM) and runs the scan through the preprocessing job. The job must
return (no crash, no hang, no huge allocation) with a scan-level failure row whose reason names the file
and the problem, and must publish no crop.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement

from ctcdam.lidc.scan_nodules import PreprocessConfig
from ctcdam.manifest.schema import read_failures
from ctcdam.preprocess.run import process_scan

SCAN = "LIDC-IDRI-0001"
#: Tags the loader needs (DICOM keyword -> a word its error message must contain).
REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "RescaleIntercept", "RescaleSlope")
NEEDED = [k for k in REQUIRED if k != "SOPInstanceUID"]  # an absent SOPInstanceUID alone breaks nothing


@dataclass(frozen=True)
class Damage:
    """One way of damaging a series: what it does to a slice, and the words its failure reason must hold."""

    category: str
    detail: str
    every_slice: bool
    expect: tuple[str, ...]


_BAD_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "0", "-0.7"])
_ORIENTATIONS = st.sampled_from([(-1, 0, 0, 0, 1, 0), (1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0), (1, 0, 0, 0, 0.5, 0),
                                 (0.8, 0.6, 0, -0.6, 0.8, 0)])
#: category -> strategy of its damages.
DAMAGES: dict[str, st.SearchStrategy[Damage]] = {
    "delete": st.builds(lambda k: Damage("delete", k, False, (k, "lacks the required tag")), st.sampled_from(NEEDED)),
    "delete_pixels": st.just(Damage("delete_pixels", "PixelData", False, ("pixel",))),
    "wrong_vr": st.builds(lambda k: Damage("wrong_vr", k, False, ("cannot read",)),
                          st.sampled_from(["ImagePositionPatient", "PixelSpacing", "Rows", "InstanceNumber"])),
    "spacing": st.builds(lambda v: Damage("spacing", v, True, ("PixelSpacing",)), _BAD_NUMBERS),
    "position": st.builds(lambda v: Damage("position", v, False, ("ImagePositionPatient",)),
                          st.sampled_from(["nan", "inf"])),
    "rescale": st.builds(lambda v: Damage("rescale", v, False, ("Rescale",)), st.sampled_from(["nan", "0", "inf"])),
    "orientation": st.builds(lambda o: Damage("orientation", repr(o), True, ("ImageOrientationPatient",)),
                             _ORIENTATIONS),
    "orientation_one": st.builds(lambda o: Damage("orientation_one", repr(o), False, ("ImageOrientationPatient",)),
                                 _ORIENTATIONS),
    "shape": st.builds(lambda d: Damage("shape", d, False, ("pixel data",)), st.sampled_from(["rows+1", "columns-1"])),
    "pixels": st.builds(lambda n: Damage("pixels", str(n), False, ("pixel data",)),
                        st.sampled_from([-1000, -2, 2, 5000])),
    "huge": st.builds(lambda n: Damage("huge", str(n), False, ("Rows x Columns",)), st.sampled_from([8192, 65535])),
    "duplicate_uid": st.just(Damage("duplicate_uid", "", False, ("SOPInstanceUID", "copied"))),
    "not_dicom": st.builds(lambda k: Damage("not_dicom", k, False, ("read" if k != "preamble-only" else "lacks",)),
                           st.sampled_from(["text", "random", "empty", "preamble-only"])),
}


def _apply(damage: Damage, path: Path, other: Path) -> None:
    """Damage the slice at ``path`` (``other`` is a second slice of the same series)."""
    if damage.category == "not_dicom":
        data = {"text": b"not a DICOM file\n", "random": np.random.default_rng(1).bytes(3000), "empty": b"",
                "preamble-only": b"\0" * 128 + b"DICM"}[damage.detail]
        path.write_bytes(data)
        return
    ds = pydicom.dcmread(path)
    if damage.category == "delete":
        delattr(ds, damage.detail)
    elif damage.category == "delete_pixels":
        del ds.PixelData
    elif damage.category == "wrong_vr":
        tag = ds.data_element(damage.detail).tag
        ds[tag] = DataElement(tag, "LO", "not-a-number")
    elif damage.category == "spacing":
        ds.PixelSpacing = [damage.detail, damage.detail]
    elif damage.category == "position":
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], damage.detail, ds.ImagePositionPatient[2]]
    elif damage.category == "rescale":
        ds.RescaleSlope = damage.detail
    elif damage.category in ("orientation", "orientation_one"):
        ds.ImageOrientationPatient = list(eval(damage.detail))  # a tuple literal from the strategy above
    elif damage.category == "shape":
        if damage.detail == "rows+1":
            ds.Rows = ds.Rows + 1
        else:
            ds.Columns = ds.Columns - 1
    elif damage.category == "pixels":
        n = int(damage.detail)
        ds.PixelData = ds.PixelData[:n] if n < 0 else ds.PixelData + b"\0" * n
    elif damage.category == "huge":
        ds.Rows = ds.Columns = int(damage.detail)
    elif damage.category == "duplicate_uid":
        ds.SOPInstanceUID = pydicom.dcmread(other, stop_before_pixels=True).SOPInstanceUID
    ds.save_as(path, enforce_file_format=False)


def _series_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / SCAN).rglob("*") if p.suffix.lower() == ".dcm")


def _failure_of(damage: Damage, generated_lidc: Path, slice_index: int) -> tuple[str, str, Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "root", Path(tmp) / "out"
        shutil.copytree(generated_lidc / SCAN, root / SCAN)
        files = _series_files(root)
        targets = files if damage.every_slice else [files[slice_index % len(files)]]
        for path in targets:
            _apply(damage, path, files[(slice_index + 1) % len(files)])
        outcome = process_scan(SCAN, root, out, PreprocessConfig())
        failures = read_failures(out / "crops" / SCAN / "failures.csv")
        crops = list((out / "crops" / SCAN).glob("*.nii.gz"))
        scan_level = failures[failures.nodule_id == ""]
        assert outcome.status == "failed" and len(scan_level) == 1, (damage, failures.to_dict("records"))
        assert not crops, damage
        return scan_level.iloc[0]["stage"], scan_level.iloc[0]["reason"], targets[0].relative_to(root / SCAN)


@pytest.mark.parametrize("category", sorted(DAMAGES))
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), slice_index=st.integers(min_value=0, max_value=12))
def test_hostile_series_end_as_a_reason_naming_the_file_and_the_problem(generated_lidc, category, data, slice_index):
    damage = data.draw(DAMAGES[category])
    stage, reason, damaged = _failure_of(damage, generated_lidc, slice_index)
    assert stage in ("index", "load"), (damage, stage, reason)
    assert damaged.name in reason or damage.every_slice, (damage, reason)
    assert "unexpected" not in reason, (damage, reason)
    for word in damage.expect:
        assert word.lower() in reason.lower(), (damage, reason)
