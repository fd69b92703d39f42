"""The checkpoint contract: what training stores beside the weights, and the one loader that explain and evaluate use.

A training checkpoint is a Lightning checkpoint whose ``state_dict`` holds the ViT under ``model.`` and whose
``ctcdam`` entry holds plain data only (so it loads with ``torch.load(weights_only=True)``)::

    ctcdam = {"format": CHECKPOINT_FORMAT,
              "config":   {backbone, model_kwargs, img_size, window, mean, std, crop_shape, crop_mm, spacing_mm,
                           views, targets, finetune, weights},
              "scaler":   {names, mean, std},                       # biomarker standardisation (training rows)
              "data":     {manifest, lidc_root, fold, n_folds, seed, train_ids, val_ids, test_ids},
              "versions": {python package versions}}
"""
from __future__ import annotations

import importlib.metadata
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from timm.models.vision_transformer import VisionTransformer

from ctcdam.data.labels import BiomarkerScaler
from ctcdam.data.transforms import InputConfig, to_model_input
from ctcdam.data.views import VIEWS, central_slices
from ctcdam.models.backbone import build_vit
from ctcdam.targets import BIOMARKERS, MALIGNANCY, TARGETS

CHECKPOINT_FORMAT = "ctcdam.nodule-vit.v1"
#: Keys every checkpoint's ctcdam entry must hold, per section.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "config": ("backbone", "model_kwargs", "img_size", "window", "mean", "std", "crop_shape", "views", "targets"),
    "scaler": ("names", "mean", "std"),
    "data": ("manifest", "lidc_root", "fold", "seed", "train_ids", "val_ids", "test_ids"),
}
#: The state_dict prefix of the ViT inside the LightningModule.
MODEL_PREFIX = "model."
_PACKAGES = ("ctcdam", "torch", "timm", "monai", "lightning", "numpy", "torchmetrics")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, incomplete, or from another configuration."""


def library_versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint (recorded inside it)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def checkpoint_record(config: Mapping[str, Any], scaler: BiomarkerScaler, data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ctcdam`` entry of a checkpoint, checked for completeness before it is written."""
    record = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(config),
        "scaler": scaler.to_dict(),
        "data": dict(data),
        "versions": library_versions(),
    }
    _check_record(record, "<new checkpoint>")
    return record


def _check_record(record: Any, path: str) -> None:
    if not isinstance(record, Mapping):
        raise CheckpointError(f"checkpoint {path} has no 'ctcdam' entry: it was not written by ctcdam training")
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {record.get('format')!r} (key ctcdam.format), expected {CHECKPOINT_FORMAT!r}"
        )
    for section, keys in REQUIRED_KEYS.items():
        if not isinstance(record.get(section), Mapping):
            raise CheckpointError(f"checkpoint {path} lacks the key ctcdam.{section}")
        for key in keys:
            if key not in record[section]:
                raise CheckpointError(f"checkpoint {path} lacks the key ctcdam.{section}.{key}")
    if tuple(record["config"]["targets"]) != TARGETS:
        raise CheckpointError(
            f"checkpoint {path} predicts targets {tuple(record['config']['targets'])} (key ctcdam.config.targets), "
            f"this version of ctcdam expects {TARGETS}"
        )


def check_matches(record_config: Mapping[str, Any], expected: Mapping[str, Any], path: str) -> None:
    """Raise naming the first key whose value differs between a checkpoint's config and an expected configuration."""
    for key, want in expected.items():
        if key not in record_config:
            raise CheckpointError(f"checkpoint {path} lacks the key ctcdam.config.{key} that the configuration sets")
        have = record_config[key]
        if _normalised(have) != _normalised(want):
            raise CheckpointError(
                f"checkpoint {path} is from another configuration: ctcdam.config.{key} is {have!r}, "
                f"the configuration asks for {want!r}"
            )


def _normalised(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class LoadedModel:
    """A trained model ready for inference, with everything that travelled inside its checkpoint."""

    model: VisionTransformer
    config: dict[str, Any]
    scaler: BiomarkerScaler
    data: dict[str, Any]
    path: Path
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def input_config(self) -> InputConfig:
        """The model-input transform settings (window, img_size, mean, std)."""
        return InputConfig.from_mapping(self.config)

    def view_inputs(self, volume_crop_hu: ArrayLike) -> torch.Tensor:
        """(len(views), 3, H, W) model inputs: the central slice of each view of one (z, y, x) HU crop."""
        views = self.config.get("views", VIEWS)
        return torch.cat([to_model_input(s, self.input_config) for s in central_slices(volume_crop_hu, views)])

    @torch.no_grad()
    def predict(self, volume_crops_hu: ArrayLike) -> dict[str, np.ndarray]:
        """Predict for one (z, y, x) HU crop or a stack (n, z, y, x): outputs averaged over the three central views.

        Returns ``raw`` (n, 9) view-averaged outputs (logit + standardised biomarkers), ``malignancy_logit``,
        ``malignancy`` (probability) and each biomarker in its original units, each of shape (n,).
        """
        crops = np.asarray(volume_crops_hu, dtype=np.float32)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.ndim != 4:
            raise ValueError(f"expected a (z, y, x) crop or an (n, z, y, x) stack, got shape {crops.shape}")
        expected = self.config.get("crop_shape")
        if expected is not None and tuple(crops.shape[1:]) != tuple(expected):
            # another crop size means another physical scale per pixel: the model would be silently wrong
            raise ValueError(
                f"crops of shape {tuple(crops.shape[1:])} do not match the training crops {tuple(expected)} "
                f"({self.config.get('crop_mm')} mm at {self.config.get('spacing_mm')} mm) of checkpoint {self.path}"
            )
        n_views = len(self.config.get("views", VIEWS))
        device = next(self.model.parameters()).device
        inputs = torch.cat([self.view_inputs(c) for c in crops]).to(device)
        raw = self.model(inputs).float().reshape(len(crops), n_views, len(TARGETS)).mean(1).cpu().numpy()
        biomarkers = self.scaler.inverse(raw[:, 1:])
        out = {
            "raw": raw,
            "malignancy_logit": raw[:, 0],
            MALIGNANCY: 1.0 / (1.0 + np.exp(-raw[:, 0])),
        }
        out.update({name: biomarkers[:, i] for i, name in enumerate(BIOMARKERS)})
        return out


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load a checkpoint with weights_only=True, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with `python pipelines/train.py`)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses every global outside tensors and plain data before calling it, so nothing ran.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise CheckpointError(f"checkpoint {path} cannot be read as a torch checkpoint: {err}") from None
        what = f" (it asks for {found.group(1)})"
        raise CheckpointError(
            f"checkpoint {path} was refused: its pickle would run code or build objects other than tensors and "
            f"plain data{what}, and ctcdam only loads weights-only checkpoints"
        ) from None
    except Exception as err:  # torch raises RuntimeError/EOFError for foreign or broken files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a weights-only torch checkpoint: {first_line}"
        ) from None


def load_for_inference(
    path: str | Path, map_location: str | torch.device = "cpu", expected: Mapping[str, Any] | None = None
) -> LoadedModel:
    """Load a training checkpoint into an eval-mode ViT with its config, label scaler and data split.

    `expected` (optional) lists config values the caller relies on (e.g. ``{"img_size": 224}``); a differing
    value raises CheckpointError naming the key.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    record = checkpoint.get("ctcdam") if isinstance(checkpoint, Mapping) else None
    _check_record(record, str(path))
    config = dict(record["config"])
    if expected:
        check_matches(config, expected, str(path))
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} lacks the key state_dict")
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise CheckpointError(f"checkpoint {path} has no weights under state_dict['{MODEL_PREFIX}*']")
    model = build_vit(config["backbone"], int(config["img_size"]), config["model_kwargs"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    mismatched = [k for k, v in model.state_dict().items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or mismatched:
        key = (missing or unexpected or mismatched)[0]
        raise CheckpointError(
            f"checkpoint {path} is from another configuration: its weights do not fit backbone "
            f"{config['backbone']!r} with {config['model_kwargs']} at img_size {config['img_size']} "
            f"(first offending key: {key!r}; {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} of another shape)"
        )
    model.to(map_location).eval()
    return LoadedModel(
        model=model,
        config=config,
        scaler=BiomarkerScaler.from_dict(record["scaler"]),
        data=dict(record["data"]),
        path=path,
        versions=dict(record.get("versions", {})),
    )
