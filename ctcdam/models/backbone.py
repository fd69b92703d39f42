"""The timm ViT backbone: architecture from a name, weights from the hub, a local file or none, and fine-tuning modes.

One output layer (timm's head with num_classes=9) gives the malignancy logit and the eight standardised
biomarkers in ctcdam.targets.TARGETS order, so the CDAM engine takes the model as is.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ctcdam.targets import TARGETS

log = logging.getLogger(__name__)

#: Weight sources besides a path to a local file.
WEIGHT_SOURCES: tuple[str, ...] = ("hub", "none")
FinetuneMode = Literal["head", "last_n", "full"]
FINETUNE_MODES: tuple[str, ...] = ("head", "last_n", "full")


class WeightsUnavailableError(RuntimeError):
    """The requested pretrained weights cannot be loaded (offline hub without cache, missing file)."""


def _how_to_get(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    repo = (cfg.hf_hub_id if cfg is not None else None) or f"timm/{name}"
    return (
        f"On a connected machine run `hf download {repo}` (it fills the Hugging Face cache, HF_HUB_CACHE, "
        f"which works offline afterwards), or download its model.safetensors and pass the file path as weights"
    )


def build_vit(
    name: str, img_size: int, model_kwargs: Mapping[str, Any] | None = None, **timm_kwargs: Any
) -> VisionTransformer:
    """The randomly initialised architecture (no weights): timm `name` at img_size with 9 outputs."""
    try:
        model = timm.create_model(name, img_size=img_size, num_classes=len(TARGETS), **dict(model_kwargs or {}), **timm_kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models('vit_*'))") from None
        raise
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"timm model {name!r} is a {type(model).__name__}; ctcdam needs a timm VisionTransformer")
    return model


def create_backbone(
    name: str,
    weights: str = "none",
    img_size: int = 224,
    model_kwargs: Mapping[str, Any] | None = None,
) -> VisionTransformer:
    """A timm ViT with 9 outputs and weights from `hub` (timm/HF cache), a local file path, or `none` (random)."""
    if weights == "none":
        log.warning("backbone %s starts from random weights (weights='none'): the backbone is untrained", name)
        return build_vit(name, img_size, model_kwargs)
    if weights == "hub":
        try:
            return build_vit(name, img_size, model_kwargs, pretrained=True)
        except (OSError, ValueError, ConnectionError, RuntimeError) as err:
            if isinstance(err, ValueError) and "unknown timm model" in str(err):
                raise
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            where = "the hub is offline (HF_HUB_OFFLINE)" if offline else "the hub could not be reached"
            raise WeightsUnavailableError(
                f"cannot load pretrained weights for {name!r}: they are not in the local Hugging Face cache and {where} "
                f"({type(err).__name__}). {_how_to_get(name)}; or use weights: none for an untrained backbone"
            ) from err
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {str(path)!r} does not exist (weights must be 'hub', 'none' or a path to a timm weight file); "
            f"{_how_to_get(name)}"
        )
    # pretrained_cfg_overlay(file=...) goes through timm's own loader, which adapts pos-embed and channels;
    # custom_load (timm's .npz reader for some tags) only applies to .npz files
    overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
    try:
        return build_vit(name, img_size, model_kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise WeightsUnavailableError(
            f"weights file {str(path)!r} does not fit timm model {name!r} with {dict(model_kwargs or {})}: {err}"
        ) from err


def set_trainable(model: VisionTransformer, mode: FinetuneMode, last_n: int = 2) -> None:
    """Freeze the backbone for `head`, train the last `last_n` blocks (+ final norm, head) or everything for `full`."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; valid modes: {', '.join(FINETUNE_MODES)}")
    if mode == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    trainable: list[torch.nn.Module] = [model.head]
    if mode == "last_n":
        if not 1 <= last_n <= len(model.blocks):
            raise ValueError(f"last_n must be in 1..{len(model.blocks)} for this backbone, got {last_n}")
        trainable += [*model.blocks[-last_n:], model.norm, model.fc_norm]
    for module in trainable:
        module.requires_grad_(True)


def head_embedding(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The (B, D) final-norm CLS embedding that the head reads (timm forward_head with pre_logits)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)
