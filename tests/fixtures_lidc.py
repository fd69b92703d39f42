"""Shared pytest fixtures (fixtures_lidc): small generated LIDC roots and the preprocessed synthetic manifest."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

#: Real scan records with 2.5 mm slices and few slices around their nodules, in both TCIA folder layouts:
#: LIDC-IDRI-0001 (one nodule, 4 readers), LIDC-IDRI-0014 (one nodule, 4 readers, malignancy median 3.5),
#: LIDC-IDRI-0021 (a calcified benign nodule, 4 readers, and two single-reader clusters).
GENERATED_SCANS: dict[str, str] = {"LIDC-IDRI-0001": "uid", "LIDC-IDRI-0014": "desc", "LIDC-IDRI-0021": "uid"}
GENERATED_Z_MARGIN_MM = 5.0


@pytest.fixture(scope="session")
def generated_lidc(tmp_path_factory) -> Path:
    """A LIDC root with the phantom series of GENERATED_SCANS (partial series: nodules +- 5 mm), never mutated."""
    from ctcdam.synthetic.writer import write_synthetic_series

    root = tmp_path_factory.mktemp("generated-lidc")
    for scan_id, layout in GENERATED_SCANS.items():
        write_synthetic_series(
            scan_id, root, layout=layout, z_margin_mm=GENERATED_Z_MARGIN_MM, cover_min_annotations=3
        )
    return root


@pytest.fixture(scope="session")
def synthetic_manifest(synthetic_lidc, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The ``synthetic_lidc`` scans preprocessed with the default settings: (out_dir, manifest)."""
    from ctcdam.manifest.schema import read_manifest
    from ctcdam.preprocess.run import run_preprocess

    out_dir = tmp_path_factory.mktemp("synthetic-preprocess")
    run_preprocess(synthetic_lidc.root, out_dir, scan_ids=synthetic_lidc.scan_ids)
    return out_dir, read_manifest(out_dir / "manifest.csv")


@pytest.fixture(scope="session")
def generated_preprocessed(generated_lidc, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """``generated_lidc`` preprocessed with the default settings (sequential, in-process): (out_dir, manifest)."""
    from ctcdam.manifest.schema import read_manifest
    from ctcdam.preprocess.run import run_preprocess

    out_dir = tmp_path_factory.mktemp("generated-preprocess")
    run_preprocess(generated_lidc, out_dir)
    return out_dir, read_manifest(out_dir / "manifest.csv")
