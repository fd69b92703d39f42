"""The engine's call shape: ``Method(model).attribute(images, targets, ...) -> Explanation``, and ``explain()``.

Targets are output indices or concept vectors (1-D, the width of the embedding the head reads). The engine
knows no dataset: a caller that names its outputs passes ``output_names`` (the name of each output, in order)
and may then give targets by name; without it a name is an error, never a silent index.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ctcdam.explain import vit
from ctcdam.explain.perturb import FORWARD_CHUNK_ELEMENTS, rows_per_chunk
from ctcdam.explain.registry import get_method

#: A target: an output index, an output name (with ``output_names``), or a concept vector (1-D, size D).
Target = int | str | Tensor


@dataclass(frozen=True)
class Explanation:
    """Token-grid maps for each image and target, with the model outputs they explain."""

    maps: Tensor  #: (B, n_targets, grid_h, grid_w), signed, unnormalised
    outputs: Tensor  #: (B, n_outputs), raw model outputs of the unperturbed images
    method: str
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    pixel_maps: Tensor | None = None  #: (B, n_targets, H, W) for pixel-space methods, else None

    @classmethod
    def from_tokens(
        cls,
        model: VisionTransformer,
        images: Tensor,
        scores: Tensor,
        outputs: Tensor,
        method: str,
        pixel_maps: Tensor | None = None,
    ) -> Explanation:
        """The Explanation of patch-token scores (B, n_targets, N) (or already on the grid) of ``images``."""
        grid = vit.grid_size(model, tuple(images.shape[-2:]))
        return cls(
            maps=scores.reshape(*scores.shape[:2], *grid),
            outputs=outputs,
            method=method,
            patch_size=vit.patch_size(model),
            image_size=tuple(images.shape[-2:]),
            pixel_maps=pixel_maps,
        )

    @classmethod
    def from_pixels(
        cls, model: VisionTransformer, images: Tensor, pixel_maps: Tensor, outputs: Tensor, method: str
    ) -> Explanation:
        """The Explanation of a pixel attribution (B, n_targets, H, W): token maps are its sums over each patch."""
        grid = vit.grid_size(model, tuple(images.shape[-2:]))
        scores = vit.patch_sums(pixel_maps, grid, vit.patch_size(model))
        return cls.from_tokens(model, images, scores, outputs, method, pixel_maps=pixel_maps)

    def upsample(self, mode: str = "nearest") -> Tensor:
        """Maps at pixel resolution (B, n_targets, H, W): each token covers its patch (nearest, as the reference)."""
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"upsample mode must be 'nearest' or 'bilinear', got {mode!r}")
        grid_h, grid_w = self.maps.shape[-2:]
        size = (grid_h * self.patch_size[0], grid_w * self.patch_size[1])
        options = {"align_corners": False} if mode == "bilinear" else {}
        pixels = F.interpolate(self.maps, size=size, mode=mode, **options)
        # Pixels beyond the last full patch belong to no token (timm drops them): they get 0.
        height, width = self.image_size
        pixels = pixels[..., :height, :width]
        return F.pad(pixels, (0, width - pixels.shape[-1], 0, height - pixels.shape[-2]))


@dataclass(frozen=True)
class TargetWeights:
    """Targets as linear functionals: value = outputs . output_weights[t] + embedding . embedding_weights[t]."""

    output_weights: Tensor  #: (n_targets, n_outputs)
    embedding_weights: Tensor  #: (n_targets, D)

    def __len__(self) -> int:
        return self.output_weights.shape[0]

    def values(self, outputs: Tensor, embedding: Tensor) -> Tensor:
        """Values (..., n_targets), target t read from copy t: outputs (..., T, n_outputs), embeddings (..., T, D)."""
        return (outputs * self.output_weights).sum(-1) + (embedding * self.embedding_weights).sum(-1)

    def all_values(self, outputs: Tensor, embedding: Tensor) -> Tensor:
        """Every target's value for every row: (B, n_targets) from outputs (B, n_outputs) and embeddings (B, D)."""
        return outputs @ self.output_weights.T + embedding @ self.embedding_weights.T


def _as_index(target: object) -> int | None:
    """An integer (Python, NumPy) as an index; None for anything else, booleans included."""
    if isinstance(target, bool):
        return None
    try:
        return operator.index(target)
    except TypeError:
        return None


def _name_index(position: int, name: str, output_names: Sequence[str] | None) -> int:
    """The output index of a target given by name."""
    if output_names is None:
        raise ValueError(
            f"target {position} is the name {name!r}, but the engine takes output indices: resolve names first, "
            "or pass output_names (the name of each model output, in order)"
        )
    if name not in output_names:
        raise ValueError(f"unknown target {name!r}; the outputs are named {', '.join(output_names)}")
    return list(output_names).index(name)


def target_weights(
    targets: Sequence[Target], outputs: Tensor, embedding: Tensor, output_names: Sequence[str] | None = None
) -> TargetWeights:
    """Resolve targets against a model's outputs (B, n_outputs) and head embedding (B, D) into linear functionals."""
    if len(targets) == 0:
        raise ValueError("targets is empty: give at least one output index, output name or concept vector")
    n_outputs, dim = outputs.shape[-1], embedding.shape[-1]
    if output_names is not None and len(output_names) != n_outputs:
        raise ValueError(f"output_names names {len(output_names)} outputs, but the model has {n_outputs}")
    output_weights = outputs.new_zeros((len(targets), n_outputs))
    embedding_weights = embedding.new_zeros((len(targets), dim))
    for t, target in enumerate(targets):
        if isinstance(target, Tensor):
            if target.shape != (dim,):
                raise ValueError(
                    f"target {t} is a tensor of shape {tuple(target.shape)}; a concept vector must have shape ({dim},)"
                )
            embedding_weights[t] = target.to(embedding_weights)
            continue
        index = _name_index(t, target, output_names) if isinstance(target, str) else _as_index(target)
        if index is None or not 0 <= index < n_outputs:
            raise ValueError(f"target {t} ({target!r}) is not an output index in [0, {n_outputs})")
        output_weights[t, index] = 1.0
    return TargetWeights(output_weights, embedding_weights)


# --------------------------------------------------------------------------------------------------------------
# Methods: Captum's shape, one class per method with typed options on ``attribute``


class Attribution:
    """An explanation method bound to a timm ViT: ``Method(model).attribute(images, targets, **options)``."""

    name: ClassVar[str]  #: the registry name, stamped on every Explanation

    def __init__(self, model: nn.Module, *, output_names: Sequence[str] | None = None) -> None:
        self.model: VisionTransformer = vit.check_vit(model)
        self.output_names = None if output_names is None else tuple(output_names)

    def target_weights(self, targets: Sequence[Target], outputs: Tensor, embedding: Tensor) -> TargetWeights:
        """The targets resolved against this model's outputs (B, n_outputs) and head embedding (B, D)."""
        return target_weights(targets, outputs, embedding, self.output_names)

    def plain_outputs(self, images: Tensor, targets: Sequence[Target]) -> tuple[Tensor, TargetWeights]:
        """Outputs of the unperturbed images (no autograd) and the targets resolved against them."""
        with torch.no_grad():
            outputs, embedding = vit.head_outputs(self.model, self.model.forward_features(images))
        return outputs, self.target_weights(targets, outputs, embedding)


AttributeFn = TypeVar("AttributeFn", bound=Callable[..., Explanation])


def attribute_method(fn: AttributeFn) -> AttributeFn:
    """Wrap an ``attribute`` implementation: check and cast its inputs, list its targets, run in eval mode.

    The model's train/eval flags are restored afterwards; the wrapped signature (the typed options) is kept.
    """

    @functools.wraps(fn)
    def attribute(self: Attribution, images: Tensor, targets: Sequence[Target], **options: object) -> Explanation:
        if isinstance(targets, (int, str)) or (isinstance(targets, Tensor) and targets.ndim < 2):
            raise TypeError("targets must be a list (of output indices, output names or concept vectors)")
        if images.ndim != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
        reference = self.model.patch_embed.proj.weight
        images = images.to(device=reference.device, dtype=reference.dtype)
        with vit.eval_mode(self.model):
            return fn(self, images, list(targets), **options)

    return attribute  # type: ignore[return-value]


def explain(
    model: nn.Module,
    images: Tensor,
    targets: Sequence[Target],
    method: str = "cdam",
    *,
    output_names: Sequence[str] | None = None,
    **options: object,
) -> Explanation:
    """Explain ``targets`` of a timm ViT on ``images`` (B, C, H, W) with ``method`` (see ``list_methods()``).

    ``targets`` lists output indices or concept vectors (D,), or output names when ``output_names`` names every
    output. ``options`` are the keyword options of the method's ``attribute`` (each class documents its own;
    ``method_info(name).options`` lists them). The model runs in eval mode during the call; its train/eval
    flags, hooks and parameter gradients are as before afterwards.
    """
    return get_method(method)(model, output_names=output_names).attribute(images, targets, **options)


def concept_vector(model: nn.Module, images: Tensor, chunk_elements: int = FORWARD_CHUNK_ELEMENTS) -> Tensor:
    """Mean head embedding (final-norm CLS embedding) of example images: a concept target, shape (D,)."""
    vit.check_vit(model)
    reference = model.patch_embed.proj.weight
    images = images.to(device=reference.device, dtype=reference.dtype)
    per_image = vit.tokens_per_image(model, tuple(images.shape[-2:])) * int(model.embed_dim)
    with vit.eval_mode(model), torch.no_grad():
        chunks = images.split(rows_per_chunk(chunk_elements, per_image))
        embeddings = [vit.cls_embedding(model, chunk) for chunk in chunks]
    return torch.cat(embeddings).mean(0)
