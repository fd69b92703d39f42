"""Test-wide settings: offline, small thread pools, shared fixtures from the fixture modules below."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network; model weights come from random init or files the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

pytest_plugins = [
    "tests.fixtures_synthetic",
    "tests.fixtures_lidc",
    "tests.fixtures_models",
    "tests.fixtures_explain",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder beside the checkout (research notes, real LIDC sample); skips when absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: tests on the real LIDC sample need ../shared beside the checkout")
    return SHARED_DIR


@pytest.fixture(scope="session")
def lidc_sample(shared_dir: Path) -> Path:
    """Root of the real LIDC-IDRI sample (partial series of LIDC-IDRI-0002 and -0003); skips when absent."""
    root = shared_dir / "lidc-sample"
    if not (root / "LIDC-IDRI-0003").is_dir():
        pytest.skip(f"{root} is absent: the real-CT integration tests need ../shared/lidc-sample")
    return root
