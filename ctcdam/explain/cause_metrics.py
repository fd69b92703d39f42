"""Maps against known causes: ground-truth shares on the token grid, and a 3D map's mass centre in scan space.

* Ground truth (a benchmark whose causes are painted in, with a pixel mask per cause; token membership by the
  localisation rule of :mod:`ctcdam.explain.metrics`, ``cause_tokens``). evidence_share = positive relevance on the evidence tokens / all
  positive relevance; evidence_lift = evidence_share / the evidence tokens' share of all tokens (1 for a
  uniform map); counter_evidence_share = negative relevance on the counter-evidence tokens / all negative
  relevance, NaN for an unsigned method (``signed=False``: it cannot express counter-evidence) and for a map
  without negative relevance; cause_auroc = AUROC of the map value as a detector of cause tokens (Mann-Whitney,
  ties count one half; ``ground_truth_scores`` uses |S| against evidence and counter-evidence tokens), NaN
  when an image has no cause token or only cause tokens.
* Scan space (the exported 3D map in world coordinates, against a cause mask on its own grid). The positive
  (negative) mass centre = sum of max(v, 0) (max(-v, 0)) times the voxel centre's world position / the sum of
  those weights; undefined (NaN) without such mass. A mask is the solid union of its voxels (each the box of its
  extent, through the affine); distance_to_mask = the Euclidean distance in mm from a point to that solid (0
  inside), and a point lies in the mask dilated by r mm when that distance is <= r: a dilation in mm on any grid,
  anisotropic or rotated, not in voxels.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from ctcdam.explain.metrics import INSIDE_OVERLAP, positive_share_inside, token_overlap, tokens_inside

# --------------------------------------------------------------------------------------------------------------
# Ground truth: maps against the cause masks of a benchmark whose causes are known (painted in)

#: Columns of :func:`ground_truth_scores`, in the order of the metrics table.
GROUND_TRUTH_COLUMNS: tuple[str, ...] = ("evidence_share", "evidence_lift", "counter_evidence_share", "cause_auroc")


def cause_tokens(mask_pixels: Tensor, grid: tuple[int, int], threshold: float = INSIDE_OVERLAP) -> Tensor:
    """Tokens (B, gh, gw) of a cause mask at model-input resolution (B, H, W), by the localisation rule."""
    return tokens_inside(token_overlap(mask_pixels, grid), threshold)


def area_share(inside: Tensor) -> Tensor:
    """Share of the patch tokens (B,) that are inside (B, gh, gw)."""
    return inside.flatten(-2).to(torch.float64).mean(-1)


def evidence_share(maps: Tensor, inside: Tensor) -> Tensor:
    """Share of positive relevance (B, T) on the evidence tokens (B, gh, gw); NaN without positive relevance or them."""
    return positive_share_inside(maps, inside)


def evidence_lift(maps: Tensor, inside: Tensor) -> Tensor:
    """evidence_share / the evidence tokens' area share (B, T): 1 for a uniform map; NaN without evidence tokens."""
    area = area_share(inside).to(maps.device)[:, None]
    share = evidence_share(maps, inside).double()
    return torch.where(area > 0, share / area, torch.full_like(share, float("nan"))).to(maps.dtype)


def counter_evidence_share(maps: Tensor, inside: Tensor, *, signed: bool = True) -> Tensor:
    """Share of negative relevance (B, T) on the counter-evidence tokens (B, gh, gw).

    NaN where a map has no negative relevance or the image no counter-evidence token, and everywhere when
    ``signed`` is False: pass ``signed=method_info(method).signed``, since an unsigned method cannot express
    counter-evidence at all (its NaN means "not expressible", not "none found").
    """
    if not signed:
        return torch.full(maps.shape[:2], float("nan"), dtype=maps.dtype, device=maps.device)
    return positive_share_inside(-maps, inside)


def cause_auroc(maps: Tensor, inside: Tensor) -> Tensor:
    """AUROC (B, T) of the map value as a detector of the cause tokens inside (B, gh, gw); ties count one half.

    It is the Mann-Whitney statistic over tokens, from average ranks: the probability that a cause token
    scores higher than a non-cause token. NaN where an image has no cause token or only cause tokens (or a
    map holds NaN). The map is taken as given: pass ``maps.abs()`` to detect evidence and counter-evidence
    together with a signed map, ``-maps`` to detect counter-evidence alone.
    """
    scores = maps.flatten(-2).detach().double().cpu().numpy()
    labels = inside.flatten(-2).detach().cpu().numpy().astype(bool)
    ranks = stats.rankdata(scores, axis=-1)  # average ranks: ties share them, which scores a tie one half
    n_cause = labels.sum(-1).astype(np.float64)[:, None]  # (B, 1)
    n_other = labels.shape[-1] - n_cause
    rank_sum = (ranks * labels[:, None]).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = (rank_sum - n_cause * (n_cause + 1) / 2) / (n_cause * n_other)
    auroc = np.where((n_cause > 0) & (n_other > 0), auroc, np.nan)
    return torch.from_numpy(auroc).to(device=maps.device, dtype=maps.dtype)


def ground_truth_scores(
    maps: Tensor, evidence: Tensor, counter_evidence: Tensor | None = None, *, signed: bool = True
) -> dict[str, Tensor]:
    """Every column of :data:`GROUND_TRUTH_COLUMNS` (B, T) from evidence and counter-evidence tokens (B, gh, gw).

    cause_auroc detects the tokens of either cause by |S| (for an unsigned, non-negative map |S| = S);
    without ``counter_evidence`` the counter-evidence share is NaN and the causes are the evidence alone.
    """
    causes = evidence if counter_evidence is None else evidence | counter_evidence.to(evidence.device)
    if counter_evidence is None:
        counter = torch.full(maps.shape[:2], float("nan"), dtype=maps.dtype, device=maps.device)
    else:
        counter = counter_evidence_share(maps, counter_evidence, signed=signed)
    return {
        "evidence_share": evidence_share(maps, evidence),
        "evidence_lift": evidence_lift(maps, evidence),
        "counter_evidence_share": counter,
        "cause_auroc": cause_auroc(maps.abs(), causes),
    }


# --------------------------------------------------------------------------------------------------------------
# Scan space: a 3D map's mass centre in world coordinates against a cause mask (plain numpy: any NIfTI reader)

#: Dilation of the cause masks in scan space, in mm (as the 2D views' masks).
SCAN_SPACE_DILATION_MM = 1.0


def _affine(affine: np.ndarray) -> np.ndarray:
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"a voxel-to-world affine is a finite 4x4 matrix, got shape {matrix.shape}")
    return matrix


def voxel_positions(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World positions (N, 3) of the voxel centres of an array of ``shape`` (C order), by a 4x4 voxel-to-world affine."""
    matrix = _affine(affine)
    index = np.indices(tuple(int(n) for n in shape), dtype=np.float64).reshape(len(shape), -1)
    return (matrix[:3, :3] @ index).T + matrix[:3, 3]


def signed_mass_centre(values: np.ndarray, positions: np.ndarray, sign: int = 1) -> np.ndarray:
    """Mass centre (3,) of the positive (``sign`` = 1) or negative (-1) part of ``values`` (N,) at ``positions`` (N, 3).

    NaN where the values hold no mass of that sign (or are not finite).
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 (evidence) or -1 (counter-evidence), got {sign}")
    weights = np.maximum(sign * np.asarray(values, dtype=np.float64).reshape(-1), 0.0)
    points = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(weights) != len(points):
        raise ValueError(f"{len(weights)} values for {len(points)} positions")
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(3, np.nan)
    return weights @ points / total


def distance_to_mask(point: Sequence[float], mask: np.ndarray, affine: np.ndarray) -> float:
    """Distance in mm from a world point to the solid union of the mask's voxels (0 inside; inf for an empty mask).

    The affine's columns must be orthogonal (any rotation, flip and anisotropic spacing; no shear), so the
    nearest point of each voxel box is the point's continuous index clamped to the box, axis by axis.
    """
    matrix = _affine(affine)
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    gram = columns.T @ columns
    if np.any(spacing <= 0) or not np.allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-6 * spacing.max() ** 2):
        raise ValueError("distance_to_mask needs an affine with orthogonal, non-zero columns (no shear)")
    target = np.asarray(point, dtype=np.float64)
    cells = np.argwhere(np.asarray(mask) > 0).astype(np.float64)
    if not np.all(np.isfinite(target)) or not len(cells):
        return float("nan") if not np.all(np.isfinite(target)) else float("inf")
    continuous = np.linalg.solve(columns, target - matrix[:3, 3])
    # Per axis, how far outside the voxel's half-width box the point lies, in mm along that (orthogonal) axis.
    outside = np.maximum(np.abs(continuous - cells) - 0.5, 0.0) * spacing
    return float(np.sqrt((outside**2).sum(-1)).min())


def inside_dilated_mask(
    point: Sequence[float], mask: np.ndarray, affine: np.ndarray, dilation_mm: float = SCAN_SPACE_DILATION_MM
) -> bool:
    """Whether a world point lies in the mask dilated by ``dilation_mm`` (within that distance of a mask voxel)."""
    distance = distance_to_mask(point, mask, affine)
    return bool(np.isfinite(distance) and distance <= dilation_mm + 1e-9)
