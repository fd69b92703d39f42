"""Partial LRP (ctcdam.explain.lrp) against a worked example: timm's own activations and the LRP rules in loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctcdam.explain import explain, method_info
from tests.fixtures_explain import images_for, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-9  # Chefer's stabiliser: a / (b + 1e-9)


def zplus(x: np.ndarray, weight: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """The z+ rule (LRP alpha 1, beta 0) for one linear layer, neuron by neuron:
    R_i = sum_j max(x_i w_ji, 0) / (sum_k max(x_k w_jk, 0) + eps) R_j (no bias)."""
    out = np.zeros_like(x)
    for j in range(weight.shape[0]):
        contributions = [max(x[i] * weight[j, i], 0.0) for i in range(len(x))]
        total = sum(contributions)
        for i in range(len(x)):
            out[i] += contributions[i] / (total + EPS) * relevance[j]
    return out


def split(first: np.ndarray, second: np.ndarray, relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LRP-0 through an elementwise sum: each summand gets its share."""
    return first * relevance / (first + second + EPS), second * relevance / (first + second + EPS)


def worked_partial_lrp(model: torch.nn.Module, image: torch.Tensor, weight_row: np.ndarray) -> np.ndarray:
    """Partial LRP of one image for a target that is the linear functional ``weight_row`` of the embedding.

    Every activation is taken from timm's own forward (hooks on the modules), then relevance goes back by hand:
    head z+, final norm and pooling identity, residual split, fc2 z+, GELU identity, fc1 z+, norm2 identity,
    the clone sums, residual split, proj z+, then O = A V: R_A[h, j] = A[h, j] sum_d v[h, j, d] R_O[h, d] / O[h, d],
    halved; the map is the head mean of max(R_A, 0) over the CLS query row, patch tokens.
    """
    block = model.blocks[-1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        (block, lambda m, i, o: seen.update(block_in=i[0][0, 0], block_out=o[0, 0])),
        (block.attn.qkv, lambda m, i, o: seen.update(qkv=o[0])),
        (block.attn.attn_drop, lambda m, i, o: seen.update(probs=o[0])),
        (block.attn.proj, lambda m, i, o: seen.update(proj_in=i[0][0, 0], proj_out=o[0, 0])),
        (block.mlp.fc1, lambda m, i, o: seen.update(fc1_in=i[0][0, 0])),
        (block.mlp.fc2, lambda m, i, o: seen.update(fc2_in=i[0][0, 0], fc2_out=o[0, 0])),
        (model.head, lambda m, i, o: seen.update(embedding=i[0][0])),
    ]
    block.attn.fused_attn = False
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
        block.attn.fused_attn = True
    a = {name: value.detach().numpy() for name, value in seen.items()}
    heads, head_dim = block.attn.num_heads, block.attn.head_dim
    n_tokens = a["qkv"].shape[0]
    v = a["qkv"].reshape(n_tokens, 3, heads, head_dim)[:, 2]  # (n, H, hd)
    probs = a["probs"][:, 0]  # CLS query row (H, n)
    attended = a["proj_out"]
    mid = a["block_in"] + attended  # the residual stream between attention and MLP, CLS row

    r_embedding = zplus(a["embedding"], weight_row[None], np.ones(1))
    r_mid, r_mlp = split(mid, a["fc2_out"], r_embedding)
    r_hidden = zplus(a["fc2_in"], block.mlp.fc2.weight.detach().numpy(), r_mlp)
    r_mid = r_mid + zplus(a["fc1_in"], block.mlp.fc1.weight.detach().numpy(), r_hidden)
    _, r_attended = split(a["block_in"], attended, r_mid)
    r_heads = zplus(a["proj_in"], block.attn.proj.weight.detach().numpy(), r_attended).reshape(heads, head_dim)
    out = a["proj_in"].reshape(heads, head_dim)
    r_probs = np.zeros((heads, n_tokens))
    for h in range(heads):
        for j in range(n_tokens):
            mixed = sum(v[j, h, d] * r_heads[h, d] / (out[h, d] + EPS) for d in range(head_dim))
            r_probs[h, j] = probs[h, j] * mixed / 2
    return np.maximum(r_probs, 0).mean(0)[model.num_prefix_tokens :]


@pytest.mark.parametrize(
    "options", [dict(), dict(reg_tokens=1, depth=1, img_size=(16, 24))], ids=["2-blocks", "registers"]
)
def test_partial_lrp_equals_the_worked_example(options: dict) -> None:
    model = tiny_vit(**options)
    images = images_for(model)
    concept = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    explanation = explain(model, images, [1, concept], "partial_lrp", chunk_elements=1)  # one row per pass
    grid = explanation.maps.shape[-2:]
    rows = [model.head.weight[1].detach().numpy(), concept.numpy()]
    for b in range(len(images)):
        for t, row in enumerate(rows):
            expected = worked_partial_lrp(model, images[b : b + 1], row).reshape(grid)
            assert expected.max() > 0  # the example is not trivially empty
            np.testing.assert_allclose(explanation.maps[b, t].numpy(), expected, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(explain(model, images, [1, concept], "partial_lrp").maps, explanation.maps)


def test_partial_lrp_conserves_relevance_through_the_head() -> None:
    """z+ through the head gives the embedding exactly the unit of relevance the output starts with."""
    from ctcdam.explain.lrp import alpha1_beta0

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    relevance = torch.rand(5, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(alpha1_beta0(x, weight, relevance).sum(-1), relevance.sum(-1), rtol=1e-7, atol=0)


def test_partial_lrp_is_target_specific_and_unsigned() -> None:
    model = tiny_vit()
    maps = explain(model, images_for(model), [0, 2], "partial_lrp").maps
    assert (maps >= 0).all() and (maps > 0).any()
    assert not torch.allclose(maps[:, 0], maps[:, 1], rtol=0.05, atol=0)
    info = method_info("partial_lrp")
    assert (info.family, info.space, info.target_specific, info.signed) == ("baseline", "token", True, False)


def test_partial_lrp_refuses_models_its_rules_do_not_cover() -> None:
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="not the CLS token"):
        explain(model, images_for(model), [0], "partial_lrp")
