"""Trivial controls (ctcdam.explain.controls): uniform and centred-Gaussian maps, checked by construction."""
from __future__ import annotations

import math

import pytest
import torch

from ctcdam.explain import CentredGaussian, UniformMap, cause_metrics, explain, method_info, metrics
from tests.fixtures_explain import images_for, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniform_is_flat_for_every_target() -> None:
    model = tiny_vit(reg_tokens=1, img_size=(24, 40))
    images = images_for(model)
    explanation = UniformMap(model).attribute(images, [0, torch.randn(32, dtype=torch.float64)])
    assert explanation.maps.shape == (2, 2, 3, 5)
    torch.testing.assert_close(explanation.maps, torch.full_like(explanation.maps, 1 / 15), rtol=0, atol=0)
    torch.testing.assert_close(explanation.outputs, model(images).detach())
    flat = torch.zeros(2, 2, dtype=torch.float64)
    torch.testing.assert_close(metrics.gini_index(explanation.maps), flat, rtol=0, atol=1e-12)
    evidence = torch.zeros(2, 3, 5, dtype=torch.bool)
    evidence[:, 1, 1:3] = True
    torch.testing.assert_close(cause_metrics.evidence_lift(explanation.maps, evidence), torch.ones(2, 2, dtype=torch.float64))


def test_centred_gaussian_hand_values_and_per_image_sigma() -> None:
    model = tiny_vit()  # 32 px, 8 px patches: patch centres at 4, 12, 20, 28 px, image centre at 16 px
    images = images_for(model, batch=2)
    maps = explain(model, images, [0, 1], "centred_gaussian", sigma_px=torch.tensor([8.0, 4.0])).maps
    offsets = torch.tensor([-12.0, -4.0, 4.0, 12.0], dtype=torch.float64)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    for b, sigma in enumerate([8.0, 4.0]):
        expected = torch.exp(-squared / (2 * sigma**2))
        torch.testing.assert_close(maps[b, 0], expected)
        torch.testing.assert_close(maps[b, 1], expected)  # the same map for every target
    assert maps[0, 0, 1, 1].item() == pytest.approx(math.exp(-32 / 128))
    # one float for all images is the same as that value per image
    single = CentredGaussian(model).attribute(images, [0], sigma_px=8.0).maps
    torch.testing.assert_close(single[:, 0], maps[:1, 0].expand(2, -1, -1))


def test_centred_gaussian_is_centred_on_non_square_images() -> None:
    model = tiny_vit(img_size=(24, 40))  # grid 3 x 5: the middle token's patch centre is the image centre
    maps = explain(model, images_for(model), [0], "centred_gaussian", sigma_px=6.0).maps[0, 0]
    assert maps[1, 2].item() == 1.0
    assert maps.flatten().argmax().item() == 7
    torch.testing.assert_close(maps, maps.flip(0).flip(1))


def test_centred_gaussian_checks_sigma() -> None:
    model = tiny_vit()
    images = images_for(model)
    with pytest.raises(ValueError, match="one per image"):
        explain(model, images, [0], "centred_gaussian", sigma_px=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        explain(model, images, [0], "centred_gaussian", sigma_px=0.0)
    fallback = explain(model, images, [0], "centred_gaussian").maps
    torch.testing.assert_close(fallback, explain(model, images, [0], "centred_gaussian", sigma_px=4.0).maps)


def test_controls_metadata() -> None:
    for name in ("uniform", "centred_gaussian"):
        info = method_info(name)
        assert (info.family, info.space, info.gradients, info.target_specific, info.signed) == (
            "control", "token", False, False, False,
        )
    assert method_info("centred_gaussian").options == ("sigma_px",)
