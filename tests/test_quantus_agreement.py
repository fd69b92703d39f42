"""Our deletion curves and Gini index against Quantus (an independent toolkit) on the same maps and model.

Quantus' RegionPerturbation with patch_size = the ViT's patch replaces whole patches (all channels) of the image
by a constant, most (``morf``) or least (``lerf``) relevant first, one patch per step, and reports
y(x) - y(x perturbed). Our ``perturbation_curves(removal="baseline")`` pastes the same constant over the removed
tokens' patches in the same order, at k = round(p N) tokens for p = 0, 0.05, ..., 1, and reports
f(x perturbed) - f(x): so Quantus' value after k patches must be minus ours at k. Quantus casts inputs to
float32; the images and the baseline here are float32 values, so the two agree to float64 rounding: the
tolerance is 1e-10 in output units (outputs here are of order 1). Quantus' Sparseness is the Gini index of
|a| / max|a| + 1e-7 per pixel of the nearest-upsampled map (the Gini index is unchanged by repeating every
value the same number of times), so it equals our token-level ``gini_index`` to within 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import quantus  # a dev extra (pyproject.toml): imported plainly so that a missing install fails, never skips
import torch
from torch import nn

from ctcdam.explain import explain, metrics
from tests.fixtures_explain import images_for, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

#: The constant that replaced patches become (a normalised intensity, as an all-air slice would be).
BASELINE = -1.5
CURVE_TOLERANCE = 1e-10
GINI_TOLERANCE = 1e-5


class OneOutput(nn.Module):
    """One output of a ViT, shape (B, 1), as Quantus wants a model returning the logits of its y_batch class."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quantus hands float32 tensors; the ViT under test is float64.
        return self.model(x.to(self.model.patch_embed.proj.weight.dtype))[:, self.index : self.index + 1]


@pytest.mark.parametrize("img_size, patch_size", [(32, 8), (64, 16), (64, 8)])
@pytest.mark.parametrize("method", ["cdam", "rp"])
def test_region_perturbation_equals_our_pixel_replacement_curves(img_size: int, patch_size: int, method: str) -> None:
    model = tiny_vit(img_size=img_size, patch_size=patch_size)
    images = images_for(model, batch=2).float().double()  # float32 values, so Quantus' cast loses nothing
    target = 1
    explanation = explain(model, images, [target], method)
    n_tokens = explanation.maps[0, 0].numel()
    ours = metrics.perturbation_curves(
        model, images, explanation.maps, [target], torch.full(images.shape[1:], BASELINE), removal="baseline"
    )
    counts = torch.round(ours.shares * n_tokens).long()
    wrapper = OneOutput(model, target).eval()
    a_batch = explanation.upsample()[:, :1].numpy()  # (B, 1, H, W), nearest: each token covers its patch
    worst = 0.0
    for order, curve in (("morf", ours.mif), ("lerf", ours.lif)):
        theirs = quantus.RegionPerturbation(
            patch_size=patch_size, order=order, regions_evaluation=n_tokens, normalise=False, abs=False,
            perturb_baseline=BASELINE, disable_warnings=True, display_progressbar=False,
        )(
            model=wrapper, x_batch=images.numpy(), y_batch=np.zeros(len(images), dtype=int), a_batch=a_batch,
            channel_first=True, softmax=False, device="cpu",
        )
        theirs = np.stack([np.asarray(row) for row in theirs])  # (B, N): after 1, 2, ..., N patches
        assert theirs.shape == (len(images), n_tokens)
        expected = -curve[:, 0, 1:].numpy()  # ours at k = counts[1:] tokens, sign flipped
        np.testing.assert_allclose(theirs[:, counts[1:].numpy() - 1], expected, rtol=0, atol=CURVE_TOLERANCE)
        worst = max(worst, float(np.abs(theirs[:, counts[1:].numpy() - 1] - expected).max()))
        assert np.abs(expected).max() > 1e-3  # the curves move: the agreement is not between two flat lines
    assert worst < CURVE_TOLERANCE


def test_sparseness_equals_our_gini_index() -> None:
    model = tiny_vit(img_size=64, patch_size=8)
    images = images_for(model, batch=3).float().double()
    maps = explain(model, images, [0, 2], "cdam").maps  # signed maps: both compare on |S|
    ours = metrics.gini_index(maps)
    wrapper = OneOutput(model, 0).eval()
    for t in range(2):
        theirs = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
            model=wrapper, x_batch=images.numpy(), y_batch=np.zeros(len(images), dtype=int),
            a_batch=torch.nn.functional.interpolate(maps[:, t : t + 1], scale_factor=8, mode="nearest").numpy(),
            channel_first=True, softmax=False, device="cpu",
        )
        np.testing.assert_allclose(np.asarray(theirs), ours[:, t].numpy(), rtol=0, atol=GINI_TOLERANCE)
    assert ours.std() > 0.01  # the maps differ in compactness, so agreement is not a coincidence of constants
