"""Trivial controls that every map should beat: a uniform map and a centred Gaussian of the nodule's size.

Crops are centred on their nodule, so a map that only knows "the middle, about this big" already localises
well; these controls show what a metric gives for that knowledge alone. Neither reads the model (the outputs
are computed only to fill ``Explanation.outputs``), and the same map is returned for every target.

* ``uniform``: every patch token scores 1 / N (the map sums to 1).
* ``centred_gaussian``: token i scores exp(-|c_i - c|^2 / (2 sigma^2)), with c_i the centre of its patch and
  c the centre of the image, both in model-input pixels ((row + 0.5) x patch height, (H / 2, W / 2)), and
  sigma = ``sigma_px`` in model-input pixels, one value for all images or one per image. Convention: pass the
  nodule's radius (half its diameter) converted to model-input pixels, so the 1-sigma circle is the nodule's
  outline. Without ``sigma_px`` sigma is an eighth of the image's shorter side, a generic fallback only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ctcdam.explain import vit
from ctcdam.explain.api import Attribution, Explanation, Target, attribute_method

#: sigma of the centred Gaussian, as a share of the image's shorter side, when no ``sigma_px`` is given.
FALLBACK_SIGMA_SHARE = 1 / 8


class UniformMap(Attribution):
    """Every patch token the same score 1 / N, for every target."""

    name = "uniform"

    @attribute_method
    def attribute(self, images: Tensor, targets: Sequence[Target]) -> Explanation:
        """A flat map per image and target."""
        model = self.model
        outputs, weights = self.plain_outputs(images, targets)
        rows, cols = vit.grid_size(model, tuple(images.shape[-2:]))
        scores = images.new_full((images.shape[0], len(weights), rows * cols), 1.0 / (rows * cols))
        return Explanation.from_tokens(model, images, scores, outputs, self.name)


def centred_gaussian_scores(
    grid: tuple[int, int], patch: tuple[int, int], image_size: tuple[int, int], sigma_px: Tensor
) -> Tensor:
    """exp(-d^2 / (2 sigma^2)) of each token's patch centre to the image centre, (B, gh * gw) for sigma_px (B,)."""
    rows = (torch.arange(grid[0], dtype=sigma_px.dtype, device=sigma_px.device) + 0.5) * patch[0] - image_size[0] / 2
    cols = (torch.arange(grid[1], dtype=sigma_px.dtype, device=sigma_px.device) + 0.5) * patch[1] - image_size[1] / 2
    squared = (rows[:, None] ** 2 + cols[None, :] ** 2).flatten()
    return torch.exp(-squared / (2 * sigma_px[:, None] ** 2))


class CentredGaussian(Attribution):
    """A Gaussian centred on the image centre with sigma = the nodule's radius in input pixels, for every target."""

    name = "centred_gaussian"

    @attribute_method
    def attribute(
        self, images: Tensor, targets: Sequence[Target], *, sigma_px: float | Tensor | None = None
    ) -> Explanation:
        """The centred Gaussian per image; ``sigma_px`` a float or (B,) per image, in model-input pixels."""
        model = self.model
        outputs, weights = self.plain_outputs(images, targets)
        batch, image_size = images.shape[0], tuple(images.shape[-2:])
        if sigma_px is None:
            sigma_px = FALLBACK_SIGMA_SHARE * min(image_size)
        sigma = torch.as_tensor(sigma_px, dtype=images.dtype, device=images.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma_px must be one value or one per image ({batch}), got shape {tuple(sigma.shape)}")
        if not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError(f"sigma_px must be positive and finite, got {sigma.tolist()}")
        grid = vit.grid_size(model, image_size)
        scores = centred_gaussian_scores(grid, vit.patch_size(model), image_size, sigma)
        return Explanation.from_tokens(model, images, scores[:, None].expand(-1, len(weights), -1), outputs, self.name)
