"""Layer-wise gradient x activation: at the last block it is CDAM; at earlier blocks it matches a leaf-token route."""
from __future__ import annotations

import torch

from ctcdam.evaluate.layerwise import layer_scores
from ctcdam.explain import explain, vit
from tests.fixtures_explain import images_for, tiny_vit


def _scores_with_leaf_tokens(model, images, block: int, output: int) -> torch.Tensor:
    """S at ``blocks[block].norm1`` by making that output a leaf and differentiating w.r.t. it (all tokens)."""
    leaves = []

    def as_leaf(_module, _inputs, out):
        leaf = out.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    handle = model.blocks[block].norm1.register_forward_hook(as_leaf)
    try:
        with torch.enable_grad():
            value = model(images)[:, output].sum()
            (grad,) = torch.autograd.grad(value, leaves)
    finally:
        handle.remove()
    return (leaves[0] * grad).sum(-1).detach()


def test_last_block_scores_are_cdam_and_earlier_blocks_match_an_independent_route():
    model = tiny_vit(depth=3)
    images = images_for(model, batch=3)
    scores = layer_scores(model, images, output_index=1)
    assert scores.patches.shape == (3, 3, 4, 4) and scores.cls.shape == (3, 3)
    cdam = explain(model, images, [1], "cdam").maps[:, 0]
    torch.testing.assert_close(scores.patches[-1], cdam, rtol=1e-9, atol=1e-12)
    for block in range(3):
        reference = _scores_with_leaf_tokens(model, images, block, output=1)
        torch.testing.assert_close(scores.patches[block].flatten(1), reference[:, 1:], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(scores.cls[block], reference[:, 0], rtol=1e-9, atol=1e-12)
    # the residual stream entering block 0: the gradient x input of the embedded tokens, by autograd on them
    tokens = vit.embed_tokens(model, images).detach().requires_grad_(True)
    with torch.enable_grad():
        value = model.forward_head(model.norm(vit.run_blocks(model, tokens)))[:, 1].sum()
        (grad,) = torch.autograd.grad(value, tokens)
    residual = layer_scores(model, images, output_index=1, site="residual")
    torch.testing.assert_close(residual.patches[0].flatten(1), (tokens * grad).sum(-1)[:, 1:], rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # the model's parameter gradients are untouched
