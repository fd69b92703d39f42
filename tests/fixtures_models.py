"""Shared pytest fixtures (fixtures_models): tiny manifests and tiny trained checkpoints.

``demo_checkpoint`` trains a TINY ViT for a few steps on the ``synthetic_manifest`` fixture (tests/fixtures_lidc.py)
through the real training CLI and returns the best checkpoint path; explain and evaluate tests use it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

#: The tiny ViT used by tests: 2 blocks, width 32, 32 px input, 8 px patches (16 tokens).
TINY_MODEL_ARGS: tuple[str, ...] = (
    "--model.backbone=vit_tiny_patch16_224",
    "--model.weights=none",
    "--model.img_size=32",
    "--model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "--model.finetune=full",
)


def write_blob_manifest(
    root: Path,
    n_patients: int = 12,
    per_patient: int = 2,
    size: int = 16,
    seed: int = 0,
    float_crops: bool = False,
    suffix: str = ".nii.gz",
) -> Path:
    """A small manifest of spherical 'nodules' whose radius sets the label (large = malignant, mid = unlabelled)."""
    rng = np.random.default_rng(seed)
    crops = root / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    zz, yy, xx = np.mgrid[:size, :size, :size] - (size - 1) / 2
    radius_grid = np.sqrt(zz**2 + yy**2 + xx**2)
    rows = []
    for p in range(n_patients):
        for n in range(per_patient):
            i = p * per_patient + n
            kind = i % 5  # 0, 1 benign; 2, 3 malignant; 4 unlabelled (median 3)
            radius = {0: 2.0, 1: 2.5, 2: 5.0, 3: 5.5, 4: 3.5}[kind] + rng.uniform(-0.3, 0.3)
            hu = np.where(radius_grid <= radius, 40.0, -850.0) + rng.normal(0, 20, radius_grid.shape)
            image = sitk.GetImageFromArray(hu.astype(np.float32 if float_crops else np.int16))
            image.SetSpacing((1.0, 1.0, 1.0))
            nodule_id = f"P{p:03d}-n{n}"
            path = crops / f"{nodule_id}_hu{suffix}"
            sitk.WriteImage(image, str(path))
            label = {0: 0, 1: 0, 2: 1, 3: 1, 4: ""}[kind]
            score = {0: 1.5, 1: 2.0, 2: 4.0, 3: 4.5, 4: 3.0}[kind]
            rows.append(
                {
                    "scan_id": f"S{p:03d}",
                    "patient_id": f"P{p:03d}",
                    "nodule_id": nodule_id,
                    "n_annotations": 4,
                    "malignancy_median": score,
                    "malignancy_label": label,
                    "subtlety": 2 + score / 2 + rng.normal(0, 0.2),
                    "calcification": 6.0,
                    "margin": 5 - score / 2,
                    "lobulation": 1 + score / 2,
                    "spiculation": 1 + score / 3,
                    "texture": 5.0 - rng.uniform(0, 0.5),
                    "sphericity": 4 - score / 4,
                    "diameter_mm": 2 * radius,
                    "image_path": f"crops/{path.name}",
                    "mask_path": "",
                }
            )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_train_args(manifest: Path, output_dir: Path, run_name: str, extra: Sequence[str] = ()) -> list[str]:
    """Command-line arguments of a few-step tiny training run (demo config with tiny overrides)."""
    return [
        *TINY_MODEL_ARGS,
        f"--data.manifest={manifest}",
        "--data.batch_size=8",
        "--data.n_folds=3",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--threads=1",
        f"--out={output_dir}",
        f"--run={run_name}",
        *extra,
    ]


def train_tiny(manifest: Path, output_dir: Path, run_name: str, extra: Sequence[str] = ()) -> dict:
    """Run the training CLI in-process with the tiny model; returns the metrics record."""
    from ctcdam.workflows.train import main

    return main(tiny_train_args(manifest, output_dir, run_name, extra))


@pytest.fixture(scope="session")
def blob_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-nodule manifest of 16^3 spherical blobs (12 patients), independent of the LIDC code."""
    return write_blob_manifest(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="session")
def tiny_run(blob_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Metrics record of a tiny 2-epoch training on the blob manifest."""
    return train_tiny(blob_manifest, tmp_path_factory.mktemp("train"), "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: dict) -> Path:
    """Best checkpoint of the tiny blob run."""
    return Path(tiny_run["checkpoint"])


@pytest.fixture(scope="session")
def demo_checkpoint(synthetic_manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Best checkpoint of a TINY ViT trained for a few steps on the synthetic manifest (for explain/evaluate tests)."""
    # synthetic_manifest is (out_dir, manifest frame) or a manifest path
    manifest = Path(synthetic_manifest[0]) / "manifest.csv" if isinstance(synthetic_manifest, tuple) else Path(synthetic_manifest)
    frame = pd.read_csv(manifest, dtype=str)
    patients, nodules = frame["patient_id"].nunique(), len(frame)
    split = []
    if patients < 10:
        # few patients: 2 folds and a 2-way inner split still keep train, validation and test disjoint
        split = ["--data.n_folds=2", "--data.val_fraction=0.45"]
    if patients < 3:
        # the session's synthetic scans are too few patients for patient-grouped parts; this checkpoint only
        # has to exist and be loadable, so its folds group by nodule
        if nodules < 4:
            pytest.fail(f"demo_checkpoint needs >= 4 nodules in {manifest}, got {nodules}")
        split.append("--data.group_by=nodule_id")
    record = train_tiny(manifest, tmp_path_factory.mktemp("demo-train"), "demo-tiny", split)
    return Path(record["checkpoint"])
