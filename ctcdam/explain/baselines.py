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

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ctcdam.explain import vit
from ctcdam.explain.api import Attribution, Explanation, Target, TargetWeights, attribute_method
from ctcdam.explain.perturb import (
    DEFAULT_CHUNK_ELEMENTS,
    FORWARD_CHUNK_ELEMENTS,
    MakeRows,
    average_over_samples,
    gaussian_noise,
    rows_per_chunk,
    scaled_path,
    unperturbed,
)


def mean_input_gradients(
    model: VisionTransformer,
    images: Tensor,
    weights: TargetWeights,
    n_samples: int,
    make_inputs: MakeRows,
    chunk_elements: int,
) -> Tensor:
    """Mean over samples of d target / d input, (B, n_targets, C, H, W).

    ``make_inputs(samples, images)`` builds the model inputs of a block (``ctcdam.explain.perturb``); each input
    row is repeated once per target so one backward gives all targets, and a chunk counts those repeats.
    """
    n_targets = len(weights)

    def input_gradients(inputs: Tensor) -> Tensor:
        leaf = inputs.repeat_interleave(n_targets, 0).requires_grad_(True)
        with torch.enable_grad():
            outputs, embedding = vit.head_outputs(model, model.forward_features(leaf))
            values = weights.values(
                outputs.view(-1, n_targets, outputs.shape[-1]), embedding.view(-1, n_targets, embedding.shape[-1])
            )
            (grad,) = torch.autograd.grad(values.sum(), leaf)
        return grad.view(-1, n_targets, *images.shape[1:])

    per_row = vit.tokens_per_image(model, tuple(images.shape[-2:])) * int(model.embed_dim) * n_targets
    return average_over_samples(
        input_gradients, make_inputs, n_samples=n_samples, n_images=images.shape[0],
        chunk_rows=rows_per_chunk(chunk_elements, per_row),
    )


class AttentionMap(Attribution):
    """Last-layer attention of the CLS query to each patch token, mean over heads (the same map for every target)."""

    name = "attention"

    @attribute_method
    def attribute(self, images: Tensor, targets: Sequence[Target]) -> Explanation:
        """The CLS row of the last attention, mean over heads, once per target."""
        model = self.model
        outputs, weights = self.plain_outputs(images, targets)
        block = model.blocks[-1]
        with torch.no_grad():
            probs = vit.attention_probabilities(block.attn, block.norm1(vit.last_block_input(model, images)), queries=1)
        scores = probs[:, :, 0, vit.num_prefix_tokens(model) :].mean(1)
        return Explanation.from_tokens(model, images, scores[:, None].expand(-1, len(weights), -1), outputs, self.name)


class AttentionRollout(Attribution):
    """Attention rollout (Abnar & Zuidema): product over blocks of (mean-head attention + identity) / 2; CLS row."""

    name = "rollout"

    @attribute_method
    def attribute(self, images: Tensor, targets: Sequence[Target]) -> Explanation:
        """The CLS row of the rolled-out attention, row-normalised at every block, once per target."""
        model = self.model
        outputs, weights = self.plain_outputs(images, targets)
        with torch.no_grad():
            x = model.norm_pre(vit.embed_tokens(model, images))
            eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
            rollout = eye.expand(x.shape[0], -1, -1)
            for block in model.blocks:
                attention = vit.attention_probabilities(block.attn, block.norm1(x)).mean(1)
                mixed = 0.5 * (attention + eye)
                rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
                x = block(x)
        scores = rollout[:, 0, vit.num_prefix_tokens(model) :]
        return Explanation.from_tokens(model, images, scores[:, None].expand(-1, len(weights), -1), outputs, self.name)


class TokenAblation(Attribution):
    """Token ablation map: target(all tokens) - target(without patch token i), tokens dropped from the sequence."""

    name = "token_ablation"

    @attribute_method
    def attribute(
        self, images: Tensor, targets: Sequence[Target], *, chunk_elements: int = FORWARD_CHUNK_ELEMENTS
    ) -> Explanation:
        """One forward per patch token and image, without that token; chunks in forward rows."""
        model = self.model
        outputs, weights = self.plain_outputs(images, targets)
        batch = images.shape[0]
        n_patches = vit.embed_tokens(model, images[:1]).shape[1] - vit.num_prefix_tokens(model)
        keep = ~torch.eye(n_patches, dtype=torch.bool, device=images.device)
        scores = images.new_empty((batch, len(weights), n_patches))
        with torch.no_grad():
            clean = weights.all_values(*vit.head_outputs(model, model.forward_features(images)))
            for b in range(batch):
                ablated_out, ablated_emb = vit.forward_without_tokens(
                    model, images[b : b + 1].expand(n_patches, -1, -1, -1), keep, chunk_elements=chunk_elements,
                    with_embedding=True,
                )
                scores[b] = clean[b, :, None] - weights.all_values(ablated_out, ablated_emb).T
        return Explanation.from_tokens(model, images, scores, outputs, self.name)


class IntegratedGradients(Attribution):
    """Integrated Gradients from a zero baseline: x * mean of grads at alpha = k/steps, k = 1..steps; channel mean."""

    name = "ig"

    @attribute_method
    def attribute(
        self,
        images: Tensor,
        targets: Sequence[Target],
        *,
        steps: int = 50,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> Explanation:
        """Right Riemann sum over ``steps`` path points; chunks in input rows (one per point, image and target)."""
        outputs, weights = self.plain_outputs(images, targets)
        grads = mean_input_gradients(self.model, images, weights, steps, scaled_path(images, steps), chunk_elements)
        return Explanation.from_pixels(self.model, images, (images[:, None] * grads).mean(2), outputs, self.name)


class SmoothGrad(Attribution):
    """SmoothGrad: mean raw gradient over x + N(0, (noise * (max x - min x))^2) per image; channel mean."""

    name = "smoothgrad"

    @attribute_method
    def attribute(
        self,
        images: Tensor,
        targets: Sequence[Target],
        *,
        samples: int = 50,
        noise: float = 0.15,
        seed: int | None = 0,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> Explanation:
        """Gradients averaged over ``samples`` seeded noise draws (``seed`` None: the global RNG)."""
        outputs, weights = self.plain_outputs(images, targets)
        noisy = gaussian_noise(images, noise, seed)
        grads = mean_input_gradients(self.model, images, weights, samples, noisy, chunk_elements)
        return Explanation.from_pixels(self.model, images, grads.mean(2), outputs, self.name)


class InputXGradient(Attribution):
    """Input x Gradient, channel mean."""

    name = "inputxgrad"

    @attribute_method
    def attribute(
        self, images: Tensor, targets: Sequence[Target], *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    ) -> Explanation:
        """The image times its gradient; chunks in input rows (one per image and target)."""
        outputs, weights = self.plain_outputs(images, targets)
        grads = mean_input_gradients(self.model, images, weights, 1, unperturbed(images), chunk_elements)
        return Explanation.from_pixels(self.model, images, (images[:, None] * grads).mean(2), outputs, self.name)


class RandomMap(Attribution):
    """Seeded standard-normal token scores: the floor for every metric."""

    name = "random"

    @attribute_method
    def attribute(self, images: Tensor, targets: Sequence[Target], *, seed: int = 0) -> Explanation:
        """One independent Gaussian map per image and target, from a generator seeded with ``seed``."""
        model = self.model
        outputs, weights = self.plain_outputs(images, targets)
        grid = vit.grid_size(model, tuple(images.shape[-2:]))
        generator = torch.Generator(device=images.device).manual_seed(seed)
        shape = (images.shape[0], len(weights), grid[0] * grid[1])
        scores = torch.randn(shape, generator=generator, device=images.device, dtype=images.dtype)
        return Explanation.from_tokens(model, images, scores, outputs, self.name)
