"""Baselines (ctcdam.explain.baselines) and token removal (ctcdam.explain.vit) against independent computations."""
from __future__ import annotations

import pytest
import torch

from ctcdam.explain import explain, forward_without_tokens
from ctcdam.explain.vit import patch_sums
from tests.fixtures_explain import images_for, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_attention(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax attention as timm's own unfused code computes it, captured at ``attn_drop``."""
    captured: list[torch.Tensor] = []
    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o.detach())))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for block, handle in zip(model.blocks, handles):
            handle.remove()
            block.attn.fused_attn = True
    return captured


def test_attention_map_is_timm_cls_attention_mean_over_heads() -> None:
    model = tiny_vit(reg_tokens=2, img_size=(24, 40))
    images = images_for(model)
    expected = _timm_attention(model, images)[-1][:, :, 0, 3:].mean(1).view(2, 3, 5)
    explanation = explain(model, images, [0, 1], "attention")
    torch.testing.assert_close(explanation.maps[:, 0], expected)
    torch.testing.assert_close(explanation.maps[:, 1], expected)


def test_rollout_follows_abnar_zuidema() -> None:
    model = tiny_vit(depth=3)
    images = images_for(model)
    rollout = torch.eye(17, dtype=torch.float64).expand(2, 17, 17)
    for attention in _timm_attention(model, images):
        mixed = 0.5 * attention.mean(1) + 0.5 * torch.eye(17, dtype=torch.float64)
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    explanation = explain(model, images, [0], "rollout")
    torch.testing.assert_close(explanation.maps[:, 0].flatten(1), rollout[:, 0, 1:])


def _without(model: torch.nn.Module, image: torch.Tensor, drop: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, head embedding) of one image with patch tokens ``drop`` cut out after the position embedding."""
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(image))
        prefix = model.num_prefix_tokens
        keep = [i for i in range(tokens.shape[1]) if i < prefix or i - prefix not in drop]
        embedding = model.forward_head(model.norm(model.blocks(tokens[:, keep])), pre_logits=True)
        return model.head(embedding)[0], embedding[0]


def test_forward_without_tokens_matches_cutting_each_sequence() -> None:
    model = tiny_vit(reg_tokens=1)
    images = images_for(model, batch=3)
    keep = torch.ones(3, 16, dtype=torch.bool)
    keep[0, [2, 7]] = False
    keep[2, 0] = False
    with torch.no_grad():
        everything = torch.ones(3, 16, dtype=torch.bool)
        torch.testing.assert_close(forward_without_tokens(model, images, everything), model(images))
        outputs = forward_without_tokens(model, images, keep, chunk_elements=1)  # one row per pass
    for b, drop in enumerate([[2, 7], [], [0]]):
        torch.testing.assert_close(outputs[b], _without(model, images[b : b + 1], drop)[0])
    with pytest.raises(ValueError, match="keep has shape"):
        forward_without_tokens(model, images, keep[:, :5])


def test_token_ablation_is_output_drop_per_removed_token() -> None:
    model = tiny_vit(img_size=(16, 24))
    images = images_for(model)
    concept = torch.randn(32, dtype=torch.float64)
    # 4 rows of 6 tokens (CLS and 5 patches) x width 32 per pass: the 6 ablations of an image in two passes
    explanation = explain(model, images, [1, concept], "token_ablation", chunk_elements=4 * 6 * 32)
    with torch.no_grad():
        clean = model(images)
        clean_embedding = model.forward_head(model.forward_features(images), pre_logits=True)
    for b in range(2):
        for i in range(6):
            without, embedding = _without(model, images[b : b + 1], [i])
            row, col = divmod(i, 3)
            torch.testing.assert_close(explanation.maps[b, 0, row, col], clean[b, 1] - without[1])
            torch.testing.assert_close(explanation.maps[b, 1, row, col], (clean_embedding[b] - embedding) @ concept)


def _input_gradient(model: torch.nn.Module, images: torch.Tensor, target: int) -> torch.Tensor:
    leaf = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    return grad


def test_inputxgrad_and_noiseless_smoothgrad_are_channel_mean_gradients() -> None:
    model = tiny_vit()
    images = images_for(model)
    grad = _input_gradient(model, images, 2)
    inputxgrad = explain(model, images, [2], "inputxgrad")
    torch.testing.assert_close(inputxgrad.pixel_maps[:, 0], (images * grad).mean(1))
    smoothgrad = explain(model, images, [2], "smoothgrad", noise=0.0, samples=2)
    torch.testing.assert_close(smoothgrad.pixel_maps[:, 0], grad.mean(1))


def test_smoothgrad_is_seeded() -> None:
    model = tiny_vit()
    images = images_for(model)
    first = explain(model, images, [0], "smoothgrad", samples=3, seed=4).maps
    torch.testing.assert_close(explain(model, images, [0], "smoothgrad", samples=3, seed=4).maps, first)
    assert not torch.allclose(explain(model, images, [0], "smoothgrad", samples=3, seed=5).maps, first)


def test_ig_matches_captum_and_is_complete() -> None:
    """Right Riemann IG equals Captum's ``riemann_right``; with many steps it sums to f(x) - f(0)."""
    captum_attr = pytest.importorskip("captum.attr")
    model = tiny_vit(img_size=(16, 24))
    images = images_for(model)
    # 7 rows of 7 tokens x width 32 per pass; each (image, path point) row goes once per target: 3 such rows a pass
    ours = explain(model, images, [0, 2], "ig", steps=20, chunk_elements=7 * 7 * 32)
    for t, target in enumerate([0, 2]):
        theirs = captum_attr.IntegratedGradients(model).attribute(
            images, baselines=torch.zeros_like(images), target=target, n_steps=20, method="riemann_right"
        )
        torch.testing.assert_close(ours.pixel_maps[:, t], theirs.mean(1))
    fine = explain(model, images, [0], "ig", steps=400, chunk_elements=200 * 7 * 32)
    with torch.no_grad():
        gain = model(images)[:, 0] - model(torch.zeros_like(images))[:, 0]
    torch.testing.assert_close(3 * fine.maps[:, 0].sum((1, 2)), gain, rtol=0.02, atol=1e-3)


def test_pixel_maps_are_summed_over_each_patch() -> None:
    model = tiny_vit(img_size=(16, 24))
    explanation = explain(model, images_for(model), [0, 1], "inputxgrad")
    for row in range(2):
        for col in range(3):
            patch = explanation.pixel_maps[:, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
            torch.testing.assert_close(explanation.maps[:, :, row, col], patch.sum((-2, -1)))
    pixels = torch.arange(2 * 5 * 7, dtype=torch.float64).view(2, 5, 7)
    # Pixels past the last full patch are ignored, as timm ignores them.
    torch.testing.assert_close(patch_sums(pixels, (2, 3), (2, 2))[0, 0, 0], pixels[0, :2, :2].sum())
    assert patch_sums(pixels, (2, 3), (2, 2)).shape == (2, 2, 3)


def test_random_map_is_seeded_floor() -> None:
    model = tiny_vit()
    images = images_for(model)
    first = explain(model, images, [0, 1], "random", seed=1)
    torch.testing.assert_close(explain(model, images, [0, 1], "random", seed=1).maps, first.maps)
    assert not torch.allclose(explain(model, images, [0, 1], "random", seed=2).maps, first.maps)
    assert first.maps.shape == (2, 2, 4, 4)
    torch.testing.assert_close(first.outputs, model(images).detach())
