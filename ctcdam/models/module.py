"""The LightningModule: a timm ViT with 9 outputs (malignancy logit + 8 standardised biomarkers), its losses and metrics."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from timm.optim import param_groups_weight_decay
from torchmetrics.classification import BinaryAUROC

from ctcdam.data.labels import BiomarkerScaler
from ctcdam.data.manifest import biomarker_matrix
from ctcdam.data.transforms import DEFAULT_WINDOW, InputConfig
from ctcdam.models.backbone import FinetuneMode, create_backbone, embed, set_trainable
from ctcdam.models.checkpoint import checkpoint_record
from ctcdam.models.feature_cache import EmbeddingCache
from ctcdam.models.losses import multitask_loss
from ctcdam.models.metrics import evaluation_metrics, predictions_table
from ctcdam.targets import TARGETS


class NoduleModule(pl.LightningModule):
    """Fine-tunes a timm ViT whose single head predicts TARGETS (malignancy logit, then 8 standardised biomarkers).

    Args:
        backbone: timm model name (any timm VisionTransformer), e.g. ``vit_small_patch8_224.dino``.
        weights: ``hub`` (timm / Hugging Face cache), ``none`` (random init) or a path to a timm weight file.
        img_size: model input size in pixels (timm adapts the position embedding).
        backbone_kwargs: architecture overrides passed to timm (patch_size, embed_dim, depth, num_heads, ...).
        window: HU window mapped to [0, 1].
        mean, std: input normalisation; None takes the backbone's pretrained config.
        finetune: ``head`` (frozen backbone), ``last_n`` blocks, or ``full``.
        cache_embeddings: in head mode, compute each image's backbone embedding once and reuse it.
        malignancy_weight, biomarker_weight: loss weights (0 switches a task off).
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch8_224.dino",
        weights: str = "hub",
        img_size: int = 224,
        backbone_kwargs: dict[str, Any] | None = None,
        window: tuple[float, float] = DEFAULT_WINDOW,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        finetune: FinetuneMode = "head",
        last_n: int = 2,
        cache_embeddings: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        malignancy_weight: float = 1.0,
        biomarker_weight: float = 1.0,
        huber_delta: float = 1.0,
    ):
        super().__init__()
        if malignancy_weight <= 0 and biomarker_weight <= 0:
            raise ValueError("both tasks are off (malignancy_weight and biomarker_weight are 0); switch one on")
        self.save_hyperparameters()
        self.model = create_backbone(backbone, weights, img_size, backbone_kwargs)
        set_trainable(self.model, finetune, last_n)
        pretrained = self.model.pretrained_cfg
        self.input_config = InputConfig(
            img_size=img_size,
            window=tuple(window),
            mean=tuple(mean) if mean is not None else tuple(pretrained["mean"]),
            std=tuple(std) if std is not None else tuple(pretrained["std"]),
        )
        self.uses_embedding_cache = finetune == "head" and cache_embeddings
        self.caches: dict[str, EmbeddingCache] = {}
        self.val_auroc = BinaryAUROC()
        self.scaler: BiomarkerScaler | None = None
        self.data_record: dict[str, Any] | None = None
        self._test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.test_predictions: pd.DataFrame | None = None
        self.test_metrics: dict[str, Any] | None = None

    # -- configuration that travels with the weights ------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        """Architecture and input settings recorded in the checkpoint (with the data's crop geometry)."""
        hp = self.hparams
        data = self.data_record or {}
        return {
            "backbone": hp.backbone,
            "model_kwargs": dict(hp.backbone_kwargs or {}),
            "weights": str(hp.weights),
            "finetune": hp.finetune,
            **self.input_config.to_dict(),
            "crop_shape": data.get("crop_shape"),
            "crop_mm": data.get("crop_mm"),
            "spacing_mm": data.get("spacing_mm"),
            "views": data.get("views"),
            "targets": list(TARGETS),
        }

    def setup(self, stage: str) -> None:
        """Take the label scaler and split record from the datamodule (fitted on the training part of the fold)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or getattr(datamodule, "scaler", None) is None:
            raise RuntimeError("NoduleModule needs a NoduleDataModule passed to the Trainer (datamodule=...)")
        self.scaler = datamodule.scaler
        self.data_record = datamodule.record()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ctcdam"] = checkpoint_record(self.model_config(), self.scaler, self.data_record)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("ctcdam")
        if record is not None:
            self.scaler = BiomarkerScaler.from_dict(record["scaler"])
            self.data_record = dict(record["data"])

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 9) outputs in TARGETS order."""
        return self.model(images)

    def _frozen_embedding(self, images: torch.Tensor) -> torch.Tensor:
        training = self.model.training
        self.model.eval()  # a cached embedding must not depend on dropout draws
        with torch.no_grad():
            features = embed(self.model, images)
        self.model.train(training)
        return features

    def _outputs(self, images: torch.Tensor, keys: torch.Tensor, stage: str) -> torch.Tensor:
        if not self.uses_embedding_cache:
            return self.model(images)
        cache = self.caches.setdefault(stage, EmbeddingCache())
        return self.model.head(cache.embed(keys, images, self._frozen_embedding))

    def _view_averaged(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        images = batch["image"]  # (B, n_views, 3, H, W)
        b, v = images.shape[:2]
        outputs = self._outputs(images.flatten(0, 1), batch["cache_key"].flatten(), stage)
        return outputs.reshape(b, v, -1).mean(dim=1)

    def _loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        hp = self.hparams
        return multitask_loss(
            outputs, batch["label"], batch["biomarkers_z"], hp.malignancy_weight, hp.biomarker_weight, hp.huber_delta
        )

    # -- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self._outputs(batch["image"], batch["cache_key"], "train")
        loss, parts = self._loss(outputs, batch)
        n = len(outputs)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self._view_averaged(batch, "val")
        loss, parts = self._loss(outputs, batch)
        n = len(outputs)
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, batch_size=n, sync_dist=True)
        labelled = ~torch.isnan(batch["label"])
        if bool(labelled.any()):
            self.val_auroc.update(torch.sigmoid(outputs[labelled, 0]), batch["label"][labelled].long())
            self.log("val/auroc", self.val_auroc, prog_bar=True, batch_size=int(labelled.sum()))

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._test_outputs.append((batch["index"], self._view_averaged(batch, "test").float()))

    def on_test_epoch_end(self) -> None:
        """Gather the test predictions of all ranks, de-standardise, compute and log the test metrics."""
        index = torch.cat([i for i, _ in self._test_outputs])
        outputs = torch.cat([o for _, o in self._test_outputs])
        if self.trainer.world_size > 1:
            # the distributed sampler pads with repeated rows; gather everything, keep one row per nodule
            index = self.all_gather(index).flatten(0, 1)
            outputs = self.all_gather(outputs).flatten(0, 1)
        index_np = index.cpu().numpy()
        unique, first = np.unique(index_np, return_index=True)
        raw = outputs.cpu().numpy()[first]
        rows = self.trainer.datamodule.rows("test").iloc[unique]
        self.test_predictions = predictions_table(
            rows["nodule_id"].astype(str).tolist(),
            rows["label"].to_numpy(),
            raw,
            biomarker_matrix(rows),
            self.scaler.inverse(raw[:, 1:]),
            self.scaler.mean,
        )
        self.test_metrics = evaluation_metrics(self.test_predictions)
        scalars = {k: v for k, v in self.test_metrics.items() if isinstance(v, (int, float)) and v is not None}
        self.log_dict({f"test/{k}": float(v) for k, v in scalars.items()}, rank_zero_only=True)

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups_weight_decay(self.model, hp.weight_decay, self.model.no_weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=hp.lr,
            total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=hp.warmup_fraction,
            anneal_strategy="cos",
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
