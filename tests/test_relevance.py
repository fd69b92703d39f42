"""RP (ctcdam.explain.relevance) against Chefer et al.'s equations, written out here one image and target at a time."""
from __future__ import annotations

import pytest
import torch

from ctcdam.explain import explain, method_info
from tests.fixtures_explain import images_for, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_rp(model: torch.nn.Module, image: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """RP from the paper's equations: hooks keep each block's softmax attention A_b (timm's unfused path, at
    ``attn_drop``); one full backward of the raw target gives G_b = d target / d A_b; then R = I and, block after
    block, R <- R + mean_heads(max(G_b * A_b, 0)) R; the map is R[CLS, patch tokens]."""
    captured: list[torch.Tensor] = []
    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o)))
    try:
        leaf = image.clone().requires_grad_(True)
        features = model.forward_features(leaf)
        if isinstance(target, torch.Tensor):
            value = model.forward_head(features, pre_logits=True)[0] @ target
        else:
            value = model.forward_head(features)[0, target]
        grads = torch.autograd.grad(value, captured)
    finally:
        for block, handle in zip(model.blocks, handles):
            handle.remove()
            block.attn.fused_attn = True
    n_tokens = captured[0].shape[-1]
    relevance = torch.eye(n_tokens, dtype=image.dtype)
    for attention, grad in zip(captured, grads):
        mean_head = (grad[0] * attention[0].detach()).clamp(min=0).mean(0)
        relevance = relevance + mean_head @ relevance
    return relevance[0, model.num_prefix_tokens :]


@pytest.mark.parametrize(
    "options",
    [
        dict(patch_size=8),
        dict(patch_size=16, img_size=32, depth=3),
        dict(patch_size=8, reg_tokens=2, img_size=(24, 40)),
    ],
    ids=["patch8", "patch16-depth3", "registers"],
)
def test_rp_equals_the_paper_equations(options: dict) -> None:
    model = tiny_vit(**options)
    images = images_for(model, batch=2)
    concept = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = [0, 2, concept]
    # 3 rows per pass: several passes, and an image's target copies split across them for two of the cases
    explanation = explain(model, images, targets, "rp", chunk_elements=1)
    grid = explanation.maps.shape[-2:]
    worst = 0.0
    for b in range(len(images)):
        for t, target in enumerate(targets):
            expected = paper_rp(model, images[b : b + 1], target).view(grid)
            torch.testing.assert_close(explanation.maps[b, t], expected, rtol=1e-5, atol=1e-12)
            worst = max(worst, ((explanation.maps[b, t] - expected).abs().max() / expected.abs().max()).item())
    assert worst < 1e-5
    # batching over images and targets changes nothing
    together = explain(model, images, targets, "rp")
    torch.testing.assert_close(together.maps, explanation.maps, rtol=1e-10, atol=1e-14)


def test_rp_is_target_specific_and_unsigned() -> None:
    model = tiny_vit(depth=3)
    maps = explain(model, images_for(model), [0, 1], "rp").maps
    assert (maps >= 0).all()
    difference = (maps[:, 0] - maps[:, 1]).abs().amax((-1, -2)) / maps.abs().amax((1, 2, 3))
    assert (difference > 0.05).all()  # two targets give clearly different maps on every image
    info = method_info("rp")
    assert (info.family, info.space, info.gradients, info.target_specific, info.signed) == (
        "baseline", "token", True, True, False,
    )


def test_rp_needs_a_cls_token() -> None:
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no CLS token"):
        explain(model, images_for(model), [0], "rp")
