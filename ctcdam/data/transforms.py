"""Model-input transforms from HU slices, as MONAI transforms: one path for training, explanation and evaluation.

HU window -> [0, 1] -> (augmentation) -> resize to the model's img_size -> 3 channels -> normalise with the
model's mean/std. :func:`to_model_input` is the single entry point for stacks of slices.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    Flip,
    Lambda,
    NormalizeIntensity,
    RepeatChannel,
    Resize,
    Rotate90,
    ScaleIntensity,
    ScaleIntensityRange,
    ShiftIntensity,
)
from numpy.typing import ArrayLike
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

#: The lung window of the reference work: HU clamped to [-1000, 400].
DEFAULT_WINDOW: tuple[float, float] = (-1000.0, 400.0)


@dataclass(frozen=True)
class InputConfig:
    """What the model expects as input: HU window, square image size, per-channel mean/std after windowing."""

    img_size: int
    window: tuple[float, float] = DEFAULT_WINDOW
    # timm's ImageNet statistics (the pretrained cfg of the DINO ViTs); a model passes its own pretrained_cfg values
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        lo, hi = self.window
        if not lo < hi:
            raise ValueError(f"HU window must be (low, high) with low < high, got {self.window}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channel values, got mean={self.mean} std={self.std}")
        if int(self.img_size) <= 0:
            raise ValueError(f"img_size must be positive, got {self.img_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form (lists, floats) that travels inside a checkpoint."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> InputConfig:
        """Build from a mapping with keys img_size, window, mean, std (extra keys are ignored)."""
        missing = [k for k in ("img_size", "window", "mean", "std") if k not in cfg]
        if missing:
            raise KeyError(f"input configuration lacks key(s) {', '.join(missing)}")
        return cls(
            img_size=int(cfg["img_size"]),
            window=tuple(float(v) for v in cfg["window"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
        )


def as_input_config(cfg: InputConfig | Mapping[str, Any]) -> InputConfig:
    """Accept an InputConfig or a plain mapping (e.g. ``LoadedModel.config``)."""
    return cfg if isinstance(cfg, InputConfig) else InputConfig.from_mapping(cfg)


#: The eight 90-degree rotation/flip variants of a square slice (the dihedral group), as (k rotations, flip).
DIHEDRAL_VARIANTS: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))


@dataclass(frozen=True)
class SliceAugmentation:
    """One drawn augmentation of a slice: a dihedral variant (exact, cacheable) and an intensity jitter."""

    variant: int = 0
    scale: float = 1.0
    shift: float = 0.0

    @property
    def has_jitter(self) -> bool:
        """True when the intensity jitter changes the image (such images cannot share cached embeddings)."""
        return self.scale != 1.0 or self.shift != 0.0


def augmentation_transforms(aug: SliceAugmentation) -> tuple[list, list]:
    """MONAI transforms of one augmentation: (geometric ones on HU, intensity ones on the [0, 1] image)."""
    k, flip = DIHEDRAL_VARIANTS[aug.variant]
    geometric = ([Rotate90(k=k, spatial_axes=(0, 1))] if k else []) + ([Flip(spatial_axis=1)] if flip else [])
    intensity = []
    if aug.scale != 1.0:
        intensity.append(ScaleIntensity(minv=None, maxv=None, factor=aug.scale - 1.0))
    if aug.shift != 0.0:
        intensity.append(ShiftIntensity(offset=aug.shift))
    return geometric, intensity


def slice_transform(cfg: InputConfig | Mapping[str, Any], aug: SliceAugmentation | None = None) -> Compose:
    """MONAI pipeline for one (h, w) HU slice -> (3, img_size, img_size) float32 model input."""
    cfg = as_input_config(cfg)
    geometric, intensity = augmentation_transforms(aug) if aug is not None else ([], [])
    lo, hi = cfg.window
    return Compose(
        [
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
            EnsureChannelFirst(channel_dim="no_channel"),
            *geometric,
            ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            *intensity,
            # anti_aliasing only acts when shrinking (crops larger than the model input)
            Resize(spatial_size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False, anti_aliasing=True),
            RepeatChannel(repeats=3),
            NormalizeIntensity(subtrahend=np.asarray(cfg.mean), divisor=np.asarray(cfg.std), channel_wise=True),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def stack_transform(cfg: InputConfig | Mapping[str, Any]) -> Compose:
    """MONAI pipeline for an (n, h, w) stack of HU slices -> (n, 3, img_size, img_size): :func:`slice_transform`
    on every slice, in one call."""
    cfg = as_input_config(cfg)
    lo, hi = cfg.window
    # The slices ride on the channel axis: the window and the normalisation act voxel by voxel and MONAI's Resize
    # (its antialiasing and interpolation) channel by channel, so the stack gets slice_transform's values in one call
    # of each transform instead of n (torch's batched kernels may round a value 1 ulp differently).
    return Compose(
        [
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
            ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            Resize(spatial_size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False, anti_aliasing=True),
            # (n, H, W) -> (3, n, H, W): the model's channels first, so that the channel-wise normalisation applies
            # each channel's mean and std to every slice, as RepeatChannel and NormalizeIntensity do for one slice
            Lambda(lambda stack: stack.unsqueeze(0).repeat(3, 1, 1, 1)),
            NormalizeIntensity(subtrahend=np.asarray(cfg.mean), divisor=np.asarray(cfg.std), channel_wise=True),
            Lambda(lambda channels: channels.transpose(0, 1).contiguous()),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def to_model_input(slices_hu: ArrayLike, cfg: InputConfig | Mapping[str, Any]) -> torch.Tensor:
    """(n, h, w) HU slices (or one (h, w) slice) -> (n, 3, H, W) float32 tensor ready for the ViT."""
    stack = np.asarray(slices_hu, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"expected (n, h, w) HU slices, got an array of shape {stack.shape}")
    if not np.isfinite(stack).all():
        raise ValueError("HU slices contain NaN or infinite values")
    if len(stack) == 0:
        size = as_input_config(cfg).img_size
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    # one call on the whole stack: slice_transform's values slice by slice to float32 rounding
    # (tests/test_data_transforms.py), at a fraction of the cost (MONAI's per-call overhead was ~3 ms a slice, 96 slices a nodule with the 3D map)
    return stack_transform(cfg)(np.ascontiguousarray(stack))


__all__ = [
    "DEFAULT_WINDOW",
    "DIHEDRAL_VARIANTS",
    "InputConfig",
    "SliceAugmentation",
    "as_input_config",
    "augmentation_transforms",
    "slice_transform",
    "stack_transform",
    "to_model_input",
]
