"""Metrics of ctcdam.explain.metrics: hand-checked values for the pure functions, and a ViT whose truth is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ctcdam.data.geometry import dilate_mask
from ctcdam.explain import explain
from ctcdam.explain import metrics
from ctcdam.targets import target_index

#: Patch tokens read by output 0 and output 1 of the known-truth model (4 x 4 grid, row-major).
TOKEN_A, TOKEN_B = 5, 10
GRID = (4, 4)
PATCH = 8


def one_token_vit() -> VisionTransformer:
    """A 2-block timm ViT (32 px, 8 px patches, 16 tokens) whose output 0 is the mean intensity of patch 5 only
    and output 1 that of patch 10 only.

    How: all norms are the identity and block 0 adds nothing (its attention projection and MLP are zero), so each
    token is its patch embedding plus its position embedding. Channel 2 of a token is its patch's mean intensity;
    the position embedding puts a marker M = 8 in channel 0 of token 5, in channel 1 of token 10, and M / 2 in
    both channels of CLS. In the last block, head A's CLS query is a constant 10 on channel 0 and its keys read
    channel 0, so its CLS row gives logit 0.5 * 10 * 8 = 40 to token 5, 20 to CLS and 0 to every other token:
    attention to token 5 is 1 - 2e-9. Head B does the same with channel 1 and token 10. Both values read the
    intensity channel; the projection writes head A's into channel 3 and head B's into channel 4, the MLP adds
    nothing, and the head reads output 0 = channel 3, output 1 = channel 4. So f_0 = intensity of patch 5 and
    f_1 = intensity of patch 10 (up to 1e-8). Without token 5, head A attends to CLS, whose value is 0: f_0 = 0.
    """
    model = VisionTransformer(
        img_size=32, patch_size=PATCH, embed_dim=8, depth=2, num_heads=2, num_classes=2, mlp_ratio=1.0,
        norm_layer=nn.Identity,
    )
    marker, query = 8.0, 10.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.patch_embed.proj.weight[2] = 1.0 / (3 * PATCH * PATCH)
        model.pos_embed[0, 0, :2] = marker / 2
        model.pos_embed[0, 1 + TOKEN_A, 0] = marker
        model.pos_embed[0, 1 + TOKEN_B, 1] = marker
        qkv = model.blocks[-1].attn.qkv  # rows: q (heads A, B: 4 each), then k, then v
        qkv.bias[0], qkv.bias[4] = query, query
        qkv.weight[8, 0], qkv.weight[12, 1] = 1.0, 1.0
        qkv.weight[17, 2], qkv.weight[21, 2] = 1.0, 1.0
        model.blocks[-1].attn.proj.weight[3, 1] = 1.0
        model.blocks[-1].attn.proj.weight[4, 5] = 1.0
        model.head.weight[0, 3], model.head.weight[1, 4] = 1.0, 1.0
    return model.eval()


def patch_means(images: torch.Tensor) -> torch.Tensor:
    """Mean intensity of every patch (B, 16), computed straight from the pixels (the test's oracle)."""
    return images.mean(1).unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).mean((-1, -2)).flatten(1)


@pytest.fixture(scope="module")
def known() -> dict:
    """The known-truth model, 8 images with patch intensities in [0.2, 1], and CDAM / random maps of both outputs."""
    generator = torch.Generator().manual_seed(1)
    tokens = 0.2 + 0.8 * torch.rand(8, 1, *GRID, generator=generator)
    images = tokens.repeat_interleave(PATCH, -2).repeat_interleave(PATCH, -1).expand(-1, 3, -1, -1).contiguous()
    model = one_token_vit()
    inside = torch.zeros(8, *GRID, dtype=torch.bool)
    inside.view(8, -1)[:, TOKEN_A] = True  # the "nodule" of output 0 covers token 5 only
    return {
        "model": model,
        "images": images,
        "inside": inside,
        **{method: explain(model, images, [0, 1], method=method) for method in ("cdam", "random", "attention")},
    }


# ----------------------------------------------------------------------------------------------------------------
# The model whose truth is known


def test_known_model_reads_one_token(known: dict) -> None:
    """Sanity of the construction itself: outputs equal the oracle patch intensities."""
    outputs = known["model"](known["images"])
    means = patch_means(known["images"])
    torch.testing.assert_close(outputs, means[:, [TOKEN_A, TOKEN_B]], atol=1e-5, rtol=0)


def test_cdam_ranks_the_read_token_first(known: dict) -> None:
    order = metrics.importance_order(known["cdam"].maps)
    assert (order[:, 0, 0] == TOKEN_A).all()
    assert (order[:, 1, 0] == TOKEN_B).all()


def test_removing_the_read_token_first_drops_the_output_most(known: dict) -> None:
    model, images = known["model"], known["images"]
    curves = metrics.perturbation_curves(model, images, known["cdam"].maps, [0, 1], torch.zeros(3, 32, 32))
    truth = patch_means(images)[:, [TOKEN_A, TOKEN_B]]
    assert curves.shares[0] == 0 and curves.shares[-1] == 1
    # MIF: the read token goes at the first step, so the output falls to 0 and stays there.
    torch.testing.assert_close(curves.mif[..., 1:], -truth[..., None].expand_as(curves.mif[..., 1:]), atol=1e-5, rtol=0)
    # LIF: the read token is removed last, so the output holds until every token is gone.
    torch.testing.assert_close(curves.lif[..., :-1], torch.zeros_like(curves.lif[..., :-1]), atol=1e-5, rtol=0)
    # Insertion into a black image: pasting the read token first restores the full output at once.
    torch.testing.assert_close(curves.insertion[..., 1:], truth[..., None].expand_as(curves.insertion[..., 1:]), atol=1e-5, rtol=0)
    # No single removal can lower the output more than removing the read token (the output is >= 0 throughout).
    drops = []
    for token in range(16):
        keep = torch.ones(len(images), 16, dtype=torch.bool)
        keep[:, token] = False
        with torch.no_grad():
            drops.append(metrics.vit.forward_without_tokens(model, images, keep)[:, 0] - model(images)[:, 0])
    assert (torch.stack(drops, 1).argmin(1) == TOKEN_A).all()


def test_random_scores_clearly_worse_than_cdam(known: dict) -> None:
    model, images = known["model"], known["images"]
    baseline = torch.zeros(3, 32, 32)
    scores = {}
    for method in ("cdam", "random"):
        scores[method], _ = metrics.map_scores(model, images, known[method].maps, [0, 1], baseline, known["inside"])
    cdam, random = scores["cdam"], scores["random"]
    # correctness of CDAM = the whole area between the curves: intensity * (1 - share of the first step) ~ 0.58.
    assert cdam["correctness"].mean() > 0.5
    assert cdam["correctness"].mean() > random["correctness"].mean() + 0.3
    assert cdam["insertion_auc"].mean() > random["insertion_auc"].mean() + 0.2
    # localisation of output 0 (mask on token 5): CDAM puts all positive relevance there and points at it.
    assert cdam["localisation"][:, 0].min() > 0.99
    assert cdam["pointing_hit"][:, 0].eq(1).all()
    assert random["localisation"][:, 0].mean() < 0.3
    assert random["pointing_hit"][:, 0].mean() < 0.5
    # output 1 reads token 10, outside the mask: CDAM's relevance for it is not inside.
    assert cdam["localisation"][:, 1].max() < 0.01


def test_class_sensitivity_separates_cdam_from_attention(known: dict) -> None:
    """The two outputs read different tokens: CDAM maps differ (one-hot maps correlate at -1/15), attention's do not."""
    cdam = metrics.target_correlation(known["cdam"].maps)[:, 0, 1]
    attention = metrics.target_correlation(known["attention"].maps)[:, 0, 1]
    torch.testing.assert_close(cdam, torch.full_like(cdam, -1 / 15), atol=1e-3, rtol=0)
    torch.testing.assert_close(attention, torch.ones_like(attention), atol=1e-6, rtol=0)


def test_cascading_randomisation_changes_cdam_but_not_a_model_free_map(known: dict) -> None:
    model, images = known["model"], known["images"][:4]
    maps = explain(model, images, [0, 1], method="cdam").maps
    stages = metrics.cascading_randomisation(model, maps, lambda m: explain(m, images, [0, 1], method="cdam").maps)
    assert [name for name, _ in stages] == ["head", "head+blocks.1-1", "head+blocks.0-1"]
    for name, rho in stages[1:]:
        assert rho.shape == (4, 2)
        assert rho.abs().mean() < 0.9, name
    fixed = torch.randn(4, 2, *GRID, generator=torch.Generator().manual_seed(0))
    for _, rho in metrics.cascading_randomisation(model, fixed, lambda m: fixed.clone()):
        torch.testing.assert_close(rho, torch.ones_like(rho, dtype=torch.float64))
    # the model handed in is never modified
    torch.testing.assert_close(model(known["images"]), patch_means(known["images"])[:, [TOKEN_A, TOKEN_B]], atol=1e-5, rtol=0)


def test_baseline_removal_matches_drop_on_the_known_model(known: dict) -> None:
    """Replacing removed patches with black changes nothing for this model (a black patch carries no value either)."""
    model, images, maps = known["model"], known["images"][:4], known["cdam"].maps[:4]
    black = torch.zeros(3, 32, 32)
    dropped = metrics.perturbation_curves(model, images, maps, [0, 1], black, removal="drop")
    replaced = metrics.perturbation_curves(model, images, maps, [0, 1], black, removal="baseline")
    torch.testing.assert_close(dropped.mif, replaced.mif, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="removal must be one of"):
        metrics.perturbation_curves(model, images, maps, [0, 1], black, removal="blur")


# ----------------------------------------------------------------------------------------------------------------
# Pure functions, checked against hand values or an independent library


def test_removal_counts_follow_five_percent_steps() -> None:
    assert metrics.removal_counts(100).tolist() == list(range(0, 101, 5))
    assert metrics.removal_counts(16).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    with pytest.raises(ValueError, match="removal step"):
        metrics.removal_counts(16, step=0)


def test_importance_order_is_signed_and_breaks_ties_at_random() -> None:
    maps = torch.tensor([[[[0.5, -2.0], [3.0, 0.0]]]])
    assert metrics.importance_order(maps)[0, 0].tolist() == [2, 0, 3, 1]
    flat = torch.zeros(64, 1, 4, 4)
    firsts = metrics.importance_order(flat)[:, 0, 0]
    assert len(firsts.unique()) > 5  # a flat map gets no systematic order
    rank = metrics.importance_rank(metrics.importance_order(maps))
    assert rank[0, 0].tolist() == [1, 3, 0, 2]


def test_correctness_is_lif_minus_mif_area_in_units_of_the_scale() -> None:
    shares = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    mif = torch.tensor([[[0.0, -2.0, -2.0]]])
    lif = torch.tensor([[[0.0, 0.0, -2.0]]])
    curves = metrics.PerturbationCurves(shares, mif, lif, insertion=torch.tensor([[[0.0, 2.0, 2.0]]]))
    scores = metrics.correctness_scores(curves, scale=torch.tensor([2.0]))
    # trapezoids: MIF area -1.5, LIF area -0.5 (output units), halved by the scale 2
    assert scores["auc_mif"].item() == pytest.approx(-0.75)
    assert scores["auc_lif"].item() == pytest.approx(-0.25)
    assert scores["correctness"].item() == pytest.approx(0.5)
    assert scores["insertion_auc"].item() == pytest.approx(0.75)


def test_output_scale_is_the_spread_of_each_target() -> None:
    outputs = torch.tensor([[0.0, 1.0, 5.0], [2.0, 1.0, 5.0], [4.0, 1.0, 5.0]])
    scale = metrics.output_scale(outputs, [0, target_index("subtlety")])
    assert scale.tolist() == pytest.approx([2.0, 1.0])  # std 2; a constant output falls back to 1
    with pytest.raises(TypeError, match="output indices"):
        metrics.output_scale(outputs, [0, "subtlety"])  # the engine resolves no names


def test_compactness_hand_values() -> None:
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, -1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert metrics.near_zero_share(maps)[:, 0].tolist() == [0.75, 0.0, 1.0]
    # one token of four holds everything: sum((2i - n - 1) a_i) / (n sum a) = 3 / 4
    assert metrics.gini_index(maps)[:, 0].tolist() == pytest.approx([0.75, 0.0, 0.0])
    small = torch.tensor([[[[1.0, 0.04], [-0.06, 0.0]]]])
    assert metrics.near_zero_share(small).item() == pytest.approx(0.5)  # |S| < 0.05 max|S|: 0.04 and 0.0


def test_target_correlation_matches_numpy() -> None:
    maps = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    ours = metrics.target_correlation(maps)
    for b in range(3):
        np.testing.assert_allclose(ours[b].numpy(), np.corrcoef(maps[b].flatten(1).numpy()), atol=1e-5)
    flat = metrics.target_correlation(torch.ones(1, 2, 2, 2))
    assert torch.isnan(flat).all()


def test_spearman_matches_scipy() -> None:
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    second[0, 0] = first[0, 0] ** 3  # monotone: rho = 1
    ours = metrics.spearman(first, second)
    for b in range(2):
        for t in range(3):
            expected = stats.spearmanr(first[b, t].flatten().numpy(), second[b, t].flatten().numpy()).statistic
            assert ours[b, t].item() == pytest.approx(expected, abs=1e-9)
    assert ours[0, 0].item() == pytest.approx(1.0)


def test_dilate_mask_uses_physical_distance() -> None:
    mask = np.zeros((5, 5, 5), dtype=np.uint8)
    mask[2, 2, 2] = 1
    assert dilate_mask(mask, (1.0, 1.0, 1.0)).sum() == 7  # the voxel and its 6 face neighbours at 1 mm
    assert dilate_mask(mask, (2.0, 1.0, 1.0)).sum() == 5  # z neighbours are 2 mm away: not within 1 mm
    assert dilate_mask(mask, (1.0, 1.0, 1.0), radius_mm=1.5).sum() == 19  # plus the 12 edge neighbours (1.41 mm)
    with pytest.raises(ValueError, match="spacing"):
        dilate_mask(mask, (1.0, 0.0, 1.0))


def test_tokens_inside_need_half_a_patch_or_the_largest_overlap() -> None:
    pixels = torch.zeros(2, 16, 16)
    pixels[0, :8, :4] = 1  # half of token (0, 0)
    pixels[0, 8:, 8:10] = 1  # a quarter of token (1, 1)
    pixels[1, 0, 0] = 1  # one pixel of token (0, 0): smaller than any token
    overlap = metrics.token_overlap(pixels, (2, 2))
    assert overlap[0].tolist() == [[0.5, 0.0], [0.0, 0.25]]
    inside = metrics.tokens_inside(overlap)
    assert inside[0].tolist() == [[True, False], [False, False]]
    assert inside[1].tolist() == [[True, False], [False, False]]
    assert not metrics.tokens_inside(torch.zeros(1, 2, 2)).any()


def test_localisation_and_pointing_hand_values() -> None:
    maps = torch.tensor([[[[2.0, 1.0], [-5.0, 1.0]]]])
    inside = torch.tensor([[[False, True], [True, False]]])
    assert metrics.positive_share_inside(maps, inside).item() == pytest.approx(0.25)  # 1 of 4 positive units
    assert metrics.pointing_hit(maps, inside).item() == 0.0  # the top token (2.0) is outside
    assert torch.isnan(metrics.positive_share_inside(-maps.abs(), inside)).all()  # no positive relevance
    assert torch.isnan(metrics.pointing_hit(maps, torch.zeros_like(inside))).all()  # no mask on this slice
