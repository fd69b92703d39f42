"""Ground-truth metrics of ctcdam.explain.metrics on maps whose answer is known by construction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctcdam.explain import cause_metrics


def grid_mask(*cells: tuple[int, int], size: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """A (1, gh, gw) token mask with the given cells inside."""
    mask = torch.zeros(1, *size, dtype=torch.bool)
    for row, col in cells:
        mask[0, row, col] = True
    return mask


def test_evidence_share_and_lift_hand_values() -> None:
    maps = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    maps[0, 0, 0, 0], maps[0, 0, 0, 1], maps[0, 0, 3, 3] = 3.0, 1.0, -5.0  # 3 of 4 positive units on (0, 0)
    maps[0, 1] = 1.0  # a uniform map
    evidence = grid_mask((0, 0), (1, 1))  # 2 of 16 tokens
    share = cause_metrics.evidence_share(maps, evidence)
    assert share[0].tolist() == pytest.approx([0.75, 2 / 16])
    lift = cause_metrics.evidence_lift(maps, evidence)
    assert lift[0].tolist() == pytest.approx([0.75 / (2 / 16), 1.0])  # a uniform map has lift 1
    assert math.isnan(cause_metrics.evidence_lift(maps, grid_mask())[0, 0].item())  # no evidence on this image
    assert math.isnan(cause_metrics.evidence_share(-maps.abs(), evidence)[0, 0].item())  # no positive relevance


def test_counter_evidence_share_is_negative_relevance_inside() -> None:
    maps = torch.tensor([[[[2.0, -1.0], [-3.0, 4.0]]]])
    counter = torch.tensor([[[False, False], [True, False]]])
    assert cause_metrics.counter_evidence_share(maps, counter).item() == pytest.approx(0.75)  # 3 of 4 negative units
    assert math.isnan(cause_metrics.counter_evidence_share(maps, counter, signed=False).item())  # cannot express it
    assert math.isnan(cause_metrics.counter_evidence_share(maps.abs(), counter).item())  # expressed none
    assert math.isnan(cause_metrics.counter_evidence_share(maps, torch.zeros_like(counter)).item())


def test_cause_auroc_known_orders_and_ties() -> None:
    cause = grid_mask((0, 0), (0, 1), size=(2, 2))  # two cause tokens, two others
    perfect = torch.tensor([[[[4.0, 3.0], [1.0, 2.0]]]])
    assert cause_metrics.cause_auroc(perfect, cause).item() == 1.0
    assert cause_metrics.cause_auroc(-perfect, cause).item() == 0.0
    flat = torch.ones(1, 1, 2, 2)
    assert cause_metrics.cause_auroc(flat, cause).item() == 0.5  # all ties: one half
    # one tie between a cause token and another: pairs (4>1, 4>2, 2=2 -> 0.5, 2>1) = 3.5 of 4
    tied = torch.tensor([[[[4.0, 2.0], [1.0, 2.0]]]])
    assert cause_metrics.cause_auroc(tied, cause).item() == pytest.approx(3.5 / 4)
    assert math.isnan(cause_metrics.cause_auroc(perfect, torch.zeros_like(cause)).item())  # no cause token
    assert math.isnan(cause_metrics.cause_auroc(perfect, torch.ones_like(cause)).item())  # only cause tokens


def test_cause_auroc_matches_sklearn_on_random_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (3, 2, 4, 4), generator=generator).double()  # many ties
    inside = torch.rand(3, 4, 4, generator=generator) < 0.3
    ours = cause_metrics.cause_auroc(maps, inside)
    for b in range(3):
        for t in range(2):
            expected = roc_auc_score(inside[b].flatten().numpy(), maps[b, t].flatten().numpy())
            assert ours[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_cause_tokens_come_from_the_pixel_mask() -> None:
    pixels = torch.zeros(1, 32, 32)
    pixels[0, :8, :8] = 1  # all of token (0, 0)
    pixels[0, 8:12, 8:16] = 1  # half of token (1, 1)
    pixels[0, 20, 20] = 1  # one pixel of token (2, 2): below half
    tokens = cause_metrics.cause_tokens(pixels, (4, 4))
    assert tokens[0].nonzero().tolist() == [[0, 0], [1, 1]]
    assert cause_metrics.area_share(tokens).item() == pytest.approx(2 / 16)


def test_ground_truth_scores_on_a_map_that_is_the_truth() -> None:
    """A signed map that is +1 on the evidence, -1 on the counter-evidence and 0 elsewhere scores perfectly."""
    evidence, counter = grid_mask((0, 0), (0, 1)), grid_mask((3, 3))
    maps = (evidence.double() - counter.double())[:, None]
    scores = cause_metrics.ground_truth_scores(maps, evidence, counter, signed=True)
    assert list(scores) == list(cause_metrics.GROUND_TRUTH_COLUMNS)
    assert scores["evidence_share"].item() == 1.0
    assert scores["evidence_lift"].item() == pytest.approx(8.0)  # everything on 2 of 16 tokens
    assert scores["counter_evidence_share"].item() == 1.0
    assert scores["cause_auroc"].item() == 1.0  # |S| singles out all three cause tokens
    unsigned = cause_metrics.ground_truth_scores(maps.abs(), evidence, counter, signed=False)
    assert math.isnan(unsigned["counter_evidence_share"].item())
    assert unsigned["evidence_share"].item() == pytest.approx(2 / 3)  # the counter-evidence token is positive here
    alone = cause_metrics.ground_truth_scores(maps, evidence)
    assert math.isnan(alone["counter_evidence_share"].item())
    # with evidence alone, |S| = 1 on the two evidence tokens and on the (non-cause) counter token, 0 on 13 others:
    # each cause token beats 13 of 14 others and ties one: (13 + 0.5) / 14
    assert alone["cause_auroc"].item() == pytest.approx(13.5 / 14)


def test_batched_over_images_and_targets() -> None:
    generator = torch.Generator().manual_seed(4)
    maps = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    evidence = torch.rand(3, 4, 4, generator=generator) < 0.4
    counter = torch.rand(3, 4, 4, generator=generator) < 0.2
    scores = cause_metrics.ground_truth_scores(maps, evidence, counter)
    for b in range(3):
        for t in range(2):
            single = cause_metrics.ground_truth_scores(maps[b : b + 1, t : t + 1], evidence[b : b + 1], counter[b : b + 1])
            for name in cause_metrics.GROUND_TRUTH_COLUMNS:
                np.testing.assert_allclose(scores[name][b, t].item(), single[name].item(), rtol=1e-12)
