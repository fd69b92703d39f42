"""Training glue as Lightning callbacks: the checkpoint contract, the test-fold predictions, atomic checkpoint files.

These are the only pieces that read both the model and the data of a run (``trainer.datamodule``); the
LightningModule itself stays data-agnostic.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import TorchCheckpointIO

from ctcdam import io
from ctcdam.manifest.schema import biomarker_matrix
from ctcdam.models.checkpoint import checkpoint_record
from ctcdam.models.metrics import evaluation_metrics, predictions_table

PREDICTIONS_FILE = "predictions.csv"


def _datamodule(trainer: pl.Trainer, what: str) -> Any:
    datamodule = trainer.datamodule
    if datamodule is None or getattr(datamodule, "scaler", None) is None:
        raise RuntimeError(f"{what} needs a set-up NoduleDataModule passed to the Trainer (datamodule=...)")
    return datamodule


class NoduleRecord(Callback):
    """Writes the ``ctcdam`` entry of every checkpoint: model config with the crop geometry, label scaler, data record.

    The scaler and the split come from the run's datamodule (fitted on the training part of the fold), so the
    checkpoint alone is enough for explain and evaluate (see ctcdam.models.checkpoint).
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        datamodule = _datamodule(trainer, "NoduleRecord")
        data = datamodule.record()
        checkpoint["ctcdam"] = checkpoint_record(pl_module.model_config(data), datamodule.scaler, data)


class TestPredictionWriter(Callback):
    """Collects the test outputs by the nodule ids of the batches, writes ``predictions.csv``, logs ``test/*`` metrics.

    Rows are gathered from every rank (the distributed sampler pads with repeated rows; each nodule is kept
    once) and put in test-fold order. Truth (label, biomarkers) and the training-mean baseline come from the
    datamodule's manifest rows and label scaler. After the test epoch, :attr:`predictions` and :attr:`metrics`
    hold the table and the ``test`` block of metrics.json.

    Args:
        dirpath: folder of the predictions file (None: do not write, only collect).
        columns: constant columns appended to the table (e.g. ``{"fold": 0}``).
    """

    __test__ = False  # a Lightning callback, not a pytest class

    def __init__(self, dirpath: str | Path | None = None, columns: Mapping[str, Any] | None = None):
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.columns = dict(columns or {})
        self._batches: list[tuple[torch.Tensor, list[str], torch.Tensor]] = []
        self.predictions: pd.DataFrame | None = None
        self.metrics: dict[str, Any] | None = None

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batches.append((batch["index"].detach(), [str(n) for n in batch["nodule_id"]], outputs.detach().float()))

    def _gathered(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[np.ndarray, list[str], np.ndarray]:
        index = torch.cat([i for i, _, _ in self._batches])
        ids = [n for _, names, _ in self._batches for n in names]
        outputs = torch.cat([o for _, _, o in self._batches])
        if trainer.world_size > 1:
            # rank-major order on both paths: all_gather stacks (world, n, ...), all_gather_object lists by rank
            index = pl_module.all_gather(index).flatten(0, 1)
            outputs = pl_module.all_gather(outputs).flatten(0, 1)
            per_rank: list[list[str] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(per_rank, ids)
            ids = [n for names in per_rank for n in (names or [])]
        return index.cpu().numpy(), ids, outputs.cpu().numpy()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = _datamodule(trainer, "TestPredictionWriter")
        index, ids, outputs = self._gathered(trainer, pl_module)
        unique, first = np.unique(index, return_index=True)
        ids = [ids[i] for i in first]
        raw = outputs[first]
        rows = datamodule.rows("test").iloc[unique]
        if rows["nodule_id"].astype(str).tolist() != ids:
            raise RuntimeError("test batches name other nodules than the test rows of the datamodule (index and ids disagree)")
        scaler = datamodule.scaler
        table = predictions_table(
            ids, rows["label"].to_numpy(), raw, biomarker_matrix(rows), scaler.inverse(raw[:, 1:]), scaler.mean
        )
        self.predictions = table.assign(**self.columns) if self.columns else table
        self.metrics = evaluation_metrics(table)
        scalars = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and v is not None}
        pl_module.log_dict({f"test/{k}": float(v) for k, v in scalars.items()}, rank_zero_only=True)
        if self.dirpath is not None and trainer.is_global_zero:
            io.write_csv(self.dirpath / PREDICTIONS_FILE, self.predictions)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, published through ctcdam.io: a kill mid-write leaves the previous file intact.

    ``--ckpt_path last`` can then always read ``last.ckpt``; the temporary of an interrupted write is removed
    when the run is resumed.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with io.atomic_file(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
