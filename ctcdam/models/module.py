"""The LightningModule: a timm ViT with 9 outputs (malignancy logit + 8 standardised biomarkers), its losses and steps.

Self-contained as Lightning intends: it reads only its batches (``image``, ``cache_key``, ``label``, ``biomarkers_z``)
and knows no datamodule. What travels beside the weights (data record, label scaler) is written by the
:class:`ctcdam.models.callbacks.NoduleRecord` callback; test predictions by
:class:`ctcdam.models.callbacks.TestPredictionWriter`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from timm.optim import param_groups_weight_decay
from torchmetrics.classification import BinaryAUROC

from ctcdam.data.transforms import DEFAULT_WINDOW, InputConfig
from ctcdam.models.backbone import FinetuneMode, create_backbone, head_embedding, set_trainable
from ctcdam.models.feature_cache import EmbeddingCache
from ctcdam.models.losses import multitask_loss
from ctcdam.targets import TARGETS


def warmup_pct(warmup_fraction: float, total_steps: int) -> float:
    """OneCycleLR's pct_start for a warmup fraction; a warmup of exactly one step becomes two.

    OneCycleLR ends its warmup at step ``pct_start * total_steps - 1``; at exactly one step that is step 0,
    where it divides by zero (e.g. warmup 0.1 of 10 steps). Two steps is the shortest ramp it can do.
    """
    if math.isclose(warmup_fraction * total_steps, 1.0):
        return 2 / total_steps if total_steps >= 2 else 0.5
    return warmup_fraction


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

    # -- configuration that travels with the weights ------------------------------------------------
    def model_config(self, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Architecture and input settings recorded in the checkpoint, with the crop geometry of the `data` record."""
        hp = self.hparams
        data = data or {}
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

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 9) outputs in TARGETS order."""
        return self.model(images)

    def _frozen_embedding(self, images: torch.Tensor) -> torch.Tensor:
        training = self.model.training
        self.model.eval()  # a cached embedding must not depend on dropout draws
        with torch.no_grad():
            features = head_embedding(self.model, images)
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

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """(B, 9) view-averaged raw outputs; TestPredictionWriter pairs them with the batch's nodule ids."""
        return self._view_averaged(batch, "test").float()

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups_weight_decay(self.model, hp.weight_decay, self.model.no_weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=hp.lr,
            total_steps=total_steps,
            pct_start=warmup_pct(hp.warmup_fraction, total_steps),
            anneal_strategy="cos",
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
