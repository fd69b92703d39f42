"""Baseline importance estimators with CDAM's call shape (registered in the method registry).

Token-space: ``attention`` (last-layer CLS attention, mean over heads), ``rollout`` (Abnar & Zuidema),
``token_ablation`` (drop one patch token, batched). Pixel-space: ``ig`` (Integrated Gradients), ``smoothgrad``,
``inputxgrad``; their channel-mean pixel attribution is kept in ``Explanation.pixel_maps`` and summed over each
patch into ``maps``, so every method's maps live on the same token grid and metrics compare like with like.
``random`` is a seeded Gaussian map, the floor for every metric.

The pixel methods are written here rather than taken from Captum because Captum is only a development extra,
and because they follow the reference package's exact variants (right Riemann sum over alpha = 1/steps..1,
sigma relative to each image's range, channel mean), batched over steps, samples and targets at once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from timm.models.vision_transformer import VisionTransformer

from ctcdam.explain import vit
from ctcdam.explain.cdam import (
    Explanation,
    NoisePerSample,
    Target,
    TargetWeights,
    register_method,
    target_weights,
)


def _outputs_and_weights(
    model: VisionTransformer, images: Tensor, targets: Sequence[Target]
) -> tuple[Tensor, TargetWeights]:
    """Plain outputs of the images and the targets resolved against them."""
    with torch.no_grad():
        outputs, embedding = vit.head_outputs(model, model.forward_features(images))
    return outputs, target_weights(targets, outputs, embedding)


def _token_explanation(
    model: VisionTransformer, images: Tensor, scores: Tensor, outputs: Tensor, method: str
) -> Explanation:
    """An Explanation from token scores (B, n_targets, N)."""
    grid = vit.grid_size(model, tuple(images.shape[-2:]))
    return Explanation(
        maps=scores.reshape(*scores.shape[:2], *grid),
        outputs=outputs,
        method=method,
        patch_size=vit.patch_size(model),
        image_size=tuple(images.shape[-2:]),
    )


def patch_sums(pixel_maps: Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """Sum a pixel map (..., H, W) over each patch of the token grid: (..., grid_h, grid_w).

    Pixels beyond the last full patch (timm ignores them) are dropped; a grid that reaches past the image
    (dynamic padding) sees zeros there, as the padded input does.
    """
    height, width = grid[0] * patch[0], grid[1] * patch[1]
    cropped = pixel_maps[..., :height, :width]
    padded = torch.nn.functional.pad(cropped, (0, width - cropped.shape[-1], 0, height - cropped.shape[-2]))
    blocks = padded.reshape(*padded.shape[:-2], grid[0], patch[0], grid[1], patch[1])
    return blocks.sum(dim=(-3, -1))


def _pixel_explanation(
    model: VisionTransformer, images: Tensor, pixels: Tensor, outputs: Tensor, method: str
) -> Explanation:
    """An Explanation from a channel-mean pixel attribution (B, n_targets, H, W)."""
    grid = vit.grid_size(model, tuple(images.shape[-2:]))
    return Explanation(
        maps=patch_sums(pixels, grid, vit.patch_size(model)),
        outputs=outputs,
        method=method,
        patch_size=vit.patch_size(model),
        image_size=tuple(images.shape[-2:]),
        pixel_maps=pixels,
    )


def _mean_input_gradients(
    model: VisionTransformer,
    images: Tensor,
    weights: TargetWeights,
    n_samples: int,
    make_inputs: Callable[[Tensor, Tensor], Tensor],
    batch_size: int,
) -> Tensor:
    """Mean over samples of d target / d input, (B, n_targets, C, H, W).

    ``make_inputs(image_index, sample_index)`` builds the model inputs of a chunk of (image, sample) rows,
    ordered sample-major; each row is repeated once per target so one backward gives all targets.
    """
    batch, n_targets = images.shape[0], len(weights)
    image_index = torch.arange(batch, device=images.device).repeat(n_samples)
    sample_index = torch.arange(n_samples, device=images.device).repeat_interleave(batch)
    totals = images.new_zeros((batch, n_targets, *images.shape[1:]))
    rows_per_chunk = max(1, batch_size // n_targets)
    for start in range(0, batch * n_samples, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        with torch.no_grad():
            inputs = make_inputs(image_index[rows], sample_index[rows])
        leaf = inputs.repeat_interleave(n_targets, 0).requires_grad_(True)
        with torch.enable_grad():
            outputs, embedding = vit.head_outputs(model, model.forward_features(leaf))
            values = weights.values(
                outputs.view(-1, n_targets, outputs.shape[-1]), embedding.view(-1, n_targets, embedding.shape[-1])
            )
            (grad,) = torch.autograd.grad(values.sum(), leaf)
        totals.index_add_(0, image_index[rows], grad.view(-1, n_targets, *images.shape[1:]))
    return totals / n_samples


@register_method("attention")
def attention_map(model: VisionTransformer, images: Tensor, targets: Sequence[Target]) -> Explanation:
    """Last-layer attention of the CLS query to each patch token, mean over heads (the same map for every target)."""
    outputs, weights = _outputs_and_weights(model, images, targets)
    block = model.blocks[-1]
    with torch.no_grad():
        probs = vit.attention_probabilities(block.attn, block.norm1(vit.last_block_input(model, images)), queries=1)
    scores = probs[:, :, 0, vit.num_prefix_tokens(model) :].mean(1)
    return _token_explanation(model, images, scores[:, None].expand(-1, len(weights), -1), outputs, "attention")


@register_method("rollout")
def attention_rollout(model: VisionTransformer, images: Tensor, targets: Sequence[Target]) -> Explanation:
    """Attention rollout: product over blocks of (mean-head attention + identity) / 2, row-normalised; CLS row."""
    outputs, weights = _outputs_and_weights(model, images, targets)
    with torch.no_grad():
        x = model.norm_pre(vit.embed(model, images))
        eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
        rollout = eye.expand(x.shape[0], -1, -1)
        for block in model.blocks:
            attention = vit.attention_probabilities(block.attn, block.norm1(x)).mean(1)
            mixed = 0.5 * (attention + eye)
            rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
            x = block(x)
    scores = rollout[:, 0, vit.num_prefix_tokens(model) :]
    return _token_explanation(model, images, scores[:, None].expand(-1, len(weights), -1), outputs, "rollout")


@register_method("token_ablation")
def token_ablation(
    model: VisionTransformer, images: Tensor, targets: Sequence[Target], *, batch_size: int = 64
) -> Explanation:
    """Token ablation map: target(all tokens) - target(without patch token i), tokens dropped from the sequence."""
    outputs, weights = _outputs_and_weights(model, images, targets)
    batch = images.shape[0]
    n_patches = vit.embed(model, images[:1]).shape[1] - vit.num_prefix_tokens(model)
    keep = ~torch.eye(n_patches, dtype=torch.bool, device=images.device)
    scores = images.new_empty((batch, len(weights), n_patches))
    with torch.no_grad():
        clean = weights.all_values(*vit.head_outputs(model, model.forward_features(images)))
        for b in range(batch):
            ablated_out, ablated_emb = vit.forward_without_tokens(
                model, images[b : b + 1].expand(n_patches, -1, -1, -1), keep, batch_size=batch_size, with_embedding=True
            )
            scores[b] = (clean[b, :, None] - weights.all_values(ablated_out, ablated_emb).T)
    return _token_explanation(model, images, scores, outputs, "token_ablation")


@register_method("ig")
def integrated_gradients(
    model: VisionTransformer, images: Tensor, targets: Sequence[Target], *, steps: int = 50, batch_size: int = 16
) -> Explanation:
    """Integrated Gradients from a zero baseline: x * mean of grads at alpha = k/steps, k = 1..steps; channel mean."""
    outputs, weights = _outputs_and_weights(model, images, targets)

    def path_points(image_index: Tensor, sample_index: Tensor) -> Tensor:
        alpha = (sample_index + 1).to(images.dtype) / steps
        return alpha[:, None, None, None] * images[image_index]

    grads = _mean_input_gradients(model, images, weights, steps, path_points, batch_size)
    return _pixel_explanation(model, images, (images[:, None] * grads).mean(2), outputs, "ig")


@register_method("smoothgrad")
def smoothgrad(
    model: VisionTransformer,
    images: Tensor,
    targets: Sequence[Target],
    *,
    samples: int = 50,
    noise: float = 0.15,
    seed: int | None = 0,
    batch_size: int = 16,
) -> Explanation:
    """SmoothGrad: mean raw gradient over x + N(0, (noise * (max x - min x))^2) per image; channel mean."""
    outputs, weights = _outputs_and_weights(model, images, targets)
    sigma = (noise * (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3)))).tolist()
    draws = NoisePerSample(images, seed)

    def noisy(image_index: Tensor, sample_index: Tensor) -> Tensor:
        rows = images.new_empty((len(image_index), *images.shape[1:]))
        for row, image, k in zip(rows, image_index.tolist(), sample_index.tolist()):
            torch.add(images[image], draws(range(k, k + 1))[0], alpha=sigma[image], out=row)
        return rows

    grads = _mean_input_gradients(model, images, weights, samples, noisy, batch_size)
    return _pixel_explanation(model, images, grads.mean(2), outputs, "smoothgrad")


@register_method("inputxgrad")
def input_x_gradient(
    model: VisionTransformer, images: Tensor, targets: Sequence[Target], *, batch_size: int = 16
) -> Explanation:
    """Input x Gradient, channel mean."""
    outputs, weights = _outputs_and_weights(model, images, targets)
    grads = _mean_input_gradients(model, images, weights, 1, lambda image_index, _: images[image_index], batch_size)
    return _pixel_explanation(model, images, (images[:, None] * grads).mean(2), outputs, "inputxgrad")


@register_method("random")
def random_map(model: VisionTransformer, images: Tensor, targets: Sequence[Target], *, seed: int = 0) -> Explanation:
    """Seeded standard-normal token scores: the floor for every metric."""
    outputs, weights = _outputs_and_weights(model, images, targets)
    grid = vit.grid_size(model, tuple(images.shape[-2:]))
    generator = torch.Generator(device=images.device).manual_seed(seed)
    shape = (images.shape[0], len(weights), grid[0] * grid[1])
    scores = torch.randn(shape, generator=generator, device=images.device, dtype=images.dtype)
    return _token_explanation(model, images, scores, outputs, "random")
