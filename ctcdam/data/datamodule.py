"""LightningDataModule over a preprocessing manifest: patient-grouped folds, training-only label scaling, view datasets."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from ctcdam.data.dataset import AugmentConfig, EvalViewsDataset, NoduleTargets, TrainSliceDataset
from ctcdam.data.folds import FoldSplit, split_fold
from ctcdam.data.labels import BiomarkerScaler
from ctcdam.data.transforms import InputConfig
from ctcdam.data.views import VIEWS
from ctcdam.manifest.schema import CropGrid, biomarker_matrix, load_crops, read_manifest, read_run_record

log = logging.getLogger(__name__)


class NoduleDataModule(pl.LightningDataModule):
    """Nodule crops of one cross-validation fold as 2D view slices (train: random view/slice; val/test: all views).

    Args:
        manifest: preprocessing manifest.csv (``null`` in a config: the training workflow puts the synthetic
            default's here, see ctcdam.workflows.defaults).
        lidc_root: the LIDC-IDRI DICOM root the manifest came from (recorded in the checkpoint for explain);
            None: the root named by the manifest's run record.
        fold: test fold index; ``"all"`` is resolved by the training CLI (one run per fold).
        n_folds: patient-grouped, malignancy-stratified folds.
        val_fraction: share of the training folds' patients held out for checkpoint selection.
        split_seed: seed of the fold assignment (independent of the training seed).
        group_by: manifest column that keeps rows in one part (patient_id; nodule_id only for toy data).
        input_config: the model's input settings; linked from the model by the CLI.
        embedding_cache: drop the intensity jitter so that identical images can share cached embeddings
            (linked from the model by the CLI: true for head fine-tuning with caching).
    """

    def __init__(
        self,
        manifest: str | None = None,
        lidc_root: str | None = None,
        fold: int | Literal["all"] = 0,
        n_folds: int = 5,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        group_by: str = "patient_id",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        slice_jitter: int = 2,
        rotate: bool = True,
        flip: bool = True,
        intensity_jitter: float = 0.05,
        input_config: InputConfig | None = None,
        embedding_cache: bool = False,
    ):
        super().__init__()
        self.manifest = manifest
        self.lidc_root = lidc_root
        self.fold = fold
        self.n_folds = n_folds
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.group_by = group_by
        if group_by != "patient_id":
            log.warning("folds grouped by %s, not by patient: nodules of one patient may land in train and test", group_by)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.input_config = input_config
        if embedding_cache and intensity_jitter > 0:
            log.info("intensity jitter off: cached backbone embeddings need images that repeat exactly")
            intensity_jitter = 0.0
        self.augment = AugmentConfig(slice_jitter=slice_jitter, rotate=rotate, flip=flip, intensity_jitter=intensity_jitter)
        self.views = VIEWS
        self.frame: pd.DataFrame | None = None
        self.split: FoldSplit | None = None
        self.scaler: BiomarkerScaler | None = None
        self.geometry: CropGrid | None = None
        self.datasets: dict[str, Any] = {}

    # -- locations ---------------------------------------------------------------------------------
    def manifest_path(self) -> Path:
        """The manifest this module reads; ValueError when none was given."""
        if self.manifest is None:
            raise ValueError("NoduleDataModule needs a manifest (data.manifest); the training workflow fills in the "
                             "synthetic default's when the configuration leaves it null")
        return Path(self.manifest)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read the manifest, split the fold, fit the biomarker scaler on the training part, build the datasets."""
        if self.datasets:
            return
        if self.fold == "all":
            raise ValueError("fold 'all' runs one training per fold through pipelines/train.py; set an integer fold here")
        if self.input_config is None:
            raise ValueError("NoduleDataModule needs input_config (the model's input settings; the CLI links it)")
        frame = read_manifest(self.manifest_path())
        split = split_fold(frame, int(self.fold), self.n_folds, self.val_fraction, self.split_seed, self.group_by)
        crops, geometry = load_crops(frame)
        biomarkers = biomarker_matrix(frame)
        scaler = BiomarkerScaler.fit(biomarkers[split.train])

        def targets(rows: np.ndarray) -> NoduleTargets:
            ids = frame["nodule_id"].astype(str).to_numpy()[rows]
            return NoduleTargets(ids, frame["label"].to_numpy()[rows], scaler.transform(biomarkers[rows]), biomarkers[rows])

        self.frame, self.split, self.scaler, self.geometry = frame, split, scaler, geometry
        self.datasets = {
            "train": TrainSliceDataset(crops[split.train], targets(split.train), self.input_config, self.augment, self.views),
            "val": EvalViewsDataset(crops[split.val], targets(split.val), self.input_config, self.views),
            "test": EvalViewsDataset(crops[split.test], targets(split.test), self.input_config, self.views),
        }
        log.info(
            "fold %s/%s: %d train, %d val, %d test nodules (%d patients); crops %s at %s mm",
            self.fold, self.n_folds, len(split.train), len(split.val), len(split.test),
            frame["patient_id"].nunique(), geometry.shape, geometry.spacing_mm,
        )

    def rows(self, stage: str) -> pd.DataFrame:
        """Manifest rows of a part ('train', 'val' or 'test'), in dataset order."""
        if self.frame is None or self.split is None:
            raise RuntimeError("call setup() first")
        return self.frame.iloc[getattr(self.split, stage)].reset_index(drop=True)

    # -- loaders -----------------------------------------------------------------------------------
    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[stage],
            batch_size=self.batch_size if stage == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- provenance --------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """What travels inside the checkpoint about the data: manifest, DICOM root and preprocessing settings (from
        the manifest's run record unless given), fold, seed, split ids, crop geometry."""
        if self.frame is None or self.split is None or self.geometry is None:
            raise RuntimeError("call setup() first")
        ids = self.frame["nodule_id"].astype(str).to_numpy()
        run = read_run_record(self.manifest_path()) or {}
        lidc_root = self.lidc_root if self.lidc_root is not None else run.get("lidc_root")
        return {
            "manifest": str(self.manifest_path().resolve()),
            "lidc_root": None if lidc_root is None else str(lidc_root),
            "preprocess": run.get("preprocess"),
            "fold": int(self.fold),
            "n_folds": int(self.n_folds),
            "seed": int(self.split_seed),
            "group_by": self.group_by,
            "val_fraction": float(self.val_fraction),
            "train_ids": ids[self.split.train].tolist(),
            "val_ids": ids[self.split.val].tolist(),
            "test_ids": ids[self.split.test].tolist(),
            "augment": asdict(self.augment),
            "crop_shape": list(self.geometry.shape),
            "spacing_mm": list(self.geometry.spacing_mm),
            "crop_mm": list(self.geometry.size_mm),
            "views": list(self.views),
        }
