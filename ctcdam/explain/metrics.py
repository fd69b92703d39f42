"""Token-level benchmarks of explanation maps: correctness, compactness, class sensitivity, localisation, sanity.

All definitions live here (docs/evaluation.md states them in prose). Every function is batched over images and
targets: maps are ``Explanation.maps``, shape (B, T, grid_h, grid_w), signed, one map per image and target.

* Correctness (deletion). Tokens are ranked by signed relevance, most positive first (ties in random order).
  For k = round(p N) tokens, p = 0, 0.05, ..., 1, the model runs with the k most important (MIF) or the k least
  important (LIF) patch tokens removed. Removal is *dropping the tokens from the sequence* after the position
  embedding (``vit.forward_without_tokens``, as the reference token ablation does); nothing is replaced.
  The curve is the change of the target output, (f(x_p) - f(x)) / s_t, where s_t is a positive scale per
  target (the standard deviation of the unperturbed output over the evaluated images, see ``output_scale``).
  Differences instead of ratios keep the sign meaningful: a logit or a standardised regression output can be
  zero or negative, so f(x_p) / f(x) would flip or explode, while a difference is "how far removing these
  tokens moves the output", with positive relevance defined as evidence that raises f. AUCs are trapezoids over
  the removed share p in [0, 1]; correctness = AUC(LIF) - AUC(MIF), in units of s_t: higher is better (removing
  the tokens the map calls important lowers the output, removing counter-evidence raises it).
* Insertion. Starting from a baseline image (the caller's, e.g. an all-air slice), the patches of the k most
  important tokens are pasted back; the curve is (f(x_k) - f(baseline)) / s_t and insertion_auc its area
  (higher is better). It uses pixel replacement on purpose: with token dropping, "insert the top k into an
  empty sequence" is exactly "delete the N - k least important", i.e. the LIF curve read backwards.
* Compactness. near_zero_share = share of tokens with |S| < 0.05 max|S| (the reference notebook uses max S;
  max|S| is the signed-map form); gini = Gini index of |S| (Quantus ``Sparseness``). Higher is more compact.
* Class sensitivity. Pearson correlation between the maps of two targets on the same image, over tokens;
  lower means more target-specific (a target-independent method scores 1).
* Localisation. The caller's mask at model-input resolution (the evaluation dilates the consensus mask by 1 mm
  and puts it through the image's resize); the share of each token's pixels inside it is its overlap. A token
  is inside when its overlap is >= 0.5, and the token(s) of largest overlap are always inside (so a nodule
  smaller than a token still has one).
  localisation = positive relevance inside / all positive relevance; pointing_hit = 1 when the top-ranked token
  is inside.
* Sanity. Cascading re-initialisation: the head, then the head and the last block, then also the block before,
  and so on; Spearman rank correlation between each map and the map of the re-initialised model. A map that
  depends on the model changes, so |rho| should fall.
* Ground truth and scan space: :mod:`ctcdam.explain.cause_metrics`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ctcdam.explain import vit
from ctcdam.explain.perturb import FORWARD_CHUNK_ELEMENTS, rows_per_chunk

#: Share of tokens removed per step of the deletion and insertion curves.
DEFAULT_STEP = 0.05
#: |S| below this share of max|S| counts as near zero.
NEAR_ZERO_THRESHOLD = 0.05
#: Overlap with the dilated mask from which a token counts as inside.
INSIDE_OVERLAP = 0.5
#: How tokens leave the sequence in the deletion curves.
REMOVALS: tuple[str, ...] = ("drop", "baseline")


# --------------------------------------------------------------------------------------------------------------
# Ranking


def importance_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Patch-token indices (B, T, N) from most to least important by signed relevance; ties in random order."""
    flat = maps.flatten(-2)
    if generator is None:
        generator = torch.Generator(device=flat.device).manual_seed(0)
    # A random shuffle before a stable sort breaks ties at random, so a flat map gains nothing from token order.
    shuffle = torch.rand(flat.shape, generator=generator, device=flat.device).argsort(-1)
    ranked = torch.sort(flat.gather(-1, shuffle), dim=-1, descending=True, stable=True).indices
    return shuffle.gather(-1, ranked)


def importance_rank(order: Tensor) -> Tensor:
    """Rank of every token (0 = most important) from an importance order (..., N)."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def removal_counts(n_tokens: int, step: float = DEFAULT_STEP) -> Tensor:
    """Distinct token counts k = round(p N) for p = 0, step, ..., 1 (ascending, 0 and N included)."""
    if not 0 < step <= 1:
        raise ValueError(f"the removal step must be a share in (0, 1], got {step}")
    n_steps = round(1 / step)
    shares = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    return torch.unique(torch.round(shares * n_tokens).long())


# --------------------------------------------------------------------------------------------------------------
# Correctness: deletion and insertion curves


@dataclass(frozen=True)
class PerturbationCurves:
    """Output changes along the deletion (MIF, LIF) and insertion curves, in output units (divide by a scale)."""

    shares: Tensor  #: (S,) share of patch tokens removed (deletion) or pasted (insertion), 0 .. 1
    mif: Tensor  #: (B, T, S) f(x without the k most important tokens) - f(x)
    lif: Tensor  #: (B, T, S) f(x without the k least important tokens) - f(x)
    insertion: Tensor  #: (B, T, S) f(baseline with the k most important patches pasted) - f(baseline)


def area_under_curve(curve: Tensor, shares: Tensor) -> Tensor:
    """Trapezoid area of curves (..., S) over the shares (S,) in [0, 1]."""
    return torch.trapezoid(curve, shares.to(curve), dim=-1)


def output_scale(outputs: Tensor, targets: Sequence[int]) -> Tensor:
    """Per-target scale s_t (T,): the standard deviation of the unperturbed outputs (M, n_out) over images.

    A target the model does not vary (std 0, or a single image) gets scale 1, so its curves stay in output units.
    """
    columns = outputs[:, [_output_index(t, outputs.shape[-1]) for t in targets]].double()
    spread = columns.std(0) if len(columns) > 1 else torch.zeros(columns.shape[-1], dtype=torch.float64)
    return torch.where(spread > 0, spread, torch.ones_like(spread)).to(outputs.dtype)


def perturbation_curves(
    model: VisionTransformer,
    images: Tensor,
    maps: Tensor,
    targets: Sequence[int],
    baseline: Tensor,
    *,
    step: float = DEFAULT_STEP,
    removal: str = "drop",
    chunk_elements: int = FORWARD_CHUNK_ELEMENTS,
    generator: torch.Generator | None = None,
) -> PerturbationCurves:
    """Deletion (MIF, LIF) and insertion curves of each image's target outputs under the order of its maps.

    ``baseline`` (C, H, W) or (B, C, H, W) is the image removed patches become in insertion (and in deletion when
    ``removal="baseline"``; the default ``"drop"`` removes tokens from the sequence). ``targets`` are output
    indices. One forward per removal count covers every image, target and curve (at most ``chunk_elements``
    rows x tokens x width per pass).
    """
    vit.check_vit(model)
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {', '.join(REMOVALS)}, got {removal!r}")
    batch, n_targets = maps.shape[:2]
    if images.shape[0] != batch or len(targets) != n_targets:
        raise ValueError(
            f"{images.shape[0]} images, {len(targets)} targets and maps of shape {tuple(maps.shape)} do not match"
        )
    reference = model.patch_embed.proj.weight
    images = images.to(device=reference.device, dtype=reference.dtype)
    baseline = baseline.to(images).expand_as(images)
    grid = tuple(maps.shape[-2:])
    n_tokens = grid[0] * grid[1]
    rank = importance_rank(importance_order(maps.to(images.device), generator))  # (B, T, N)
    counts = removal_counts(n_tokens, step)
    chunk_rows = rows_per_chunk(chunk_elements, vit.tokens_per_image(model, tuple(images.shape[-2:])) * model.embed_dim)
    image_of_row = torch.arange(batch, device=images.device).repeat_interleave(n_targets)
    outputs_of_targets = torch.tensor([_output_index(t, None) for t in targets], device=images.device).repeat(batch)

    def target_values(keep: Tensor, replace_with: Tensor | None, curves: int) -> Tensor:
        """Target outputs (curves, B, T) with only the ``keep`` (curves, B, T, N) tokens of each row present."""
        # Identical (image, kept tokens) rows run once: every row at k = N, and all targets of a target-blind map.
        key = torch.cat([image_of_row.repeat(curves)[:, None], keep.reshape(-1, n_tokens).long()], 1)
        unique_key, row_of_key = torch.unique(key, dim=0, return_inverse=True)
        rows, flat_keep = unique_key[:, 0], unique_key[:, 1:].bool()
        if replace_with is None:
            outputs = vit.forward_without_tokens(model, images[rows], flat_keep, chunk_elements=chunk_elements)
        else:
            outputs = torch.cat([
                model(_paste_patches(images[part], replace_with[part], flat_keep[start : start + chunk_rows], grid))
                for start, part in ((s, rows[s : s + chunk_rows]) for s in range(0, len(rows), chunk_rows))
            ])
        chosen = outputs[row_of_key].gather(1, outputs_of_targets.repeat(curves)[:, None]).squeeze(1)
        return chosen.view(curves, batch, n_targets)

    deletion_baseline = baseline if removal == "baseline" else None
    mif, lif, insertion = [], [], []
    with vit.eval_mode(model), torch.no_grad():
        full = rank >= 0
        unperturbed = target_values(full[None], deletion_baseline, 1)[0]
        for k in counts.tolist():
            if k == 0:
                mif.append(torch.zeros_like(unperturbed))
                lif.append(torch.zeros_like(unperturbed))
            else:
                both = target_values(torch.stack([rank >= k, rank < n_tokens - k]), deletion_baseline, 2)
                mif.append(both[0] - unperturbed)
                lif.append(both[1] - unperturbed)
            insertion.append(target_values((rank < k)[None], baseline, 1)[0])
    inserted = torch.stack(insertion, -1)
    return PerturbationCurves(
        shares=counts.to(torch.float64) / n_tokens,
        mif=torch.stack(mif, -1).cpu(),
        lif=torch.stack(lif, -1).cpu(),
        insertion=(inserted - inserted[..., :1]).cpu(),
    )


def correctness_scores(curves: PerturbationCurves, scale: Tensor | None = None) -> dict[str, Tensor]:
    """auc_mif, auc_lif, correctness = auc_lif - auc_mif and insertion_auc (B, T), divided by the scale (T,)."""
    divisor = torch.ones(curves.mif.shape[1], dtype=curves.mif.dtype) if scale is None else scale.to(curves.mif).cpu()
    auc_mif = area_under_curve(curves.mif, curves.shares) / divisor
    auc_lif = area_under_curve(curves.lif, curves.shares) / divisor
    return {
        "correctness": auc_lif - auc_mif,
        "auc_mif": auc_mif,
        "auc_lif": auc_lif,
        "insertion_auc": area_under_curve(curves.insertion, curves.shares) / divisor,
    }


def _paste_patches(images: Tensor, background: Tensor, keep: Tensor, grid: tuple[int, int]) -> Tensor:
    """Images whose kept token patches come from ``images`` and all other pixels from ``background``."""
    height, width = images.shape[-2:]
    patch_h, patch_w = height // grid[0], width // grid[1]
    pixels = keep.view(-1, 1, *grid).repeat_interleave(patch_h, -2).repeat_interleave(patch_w, -1)
    # Pixels past the last full patch belong to no token (timm drops them); they stay as they are.
    pixels = F.pad(pixels, (0, width - pixels.shape[-1], 0, height - pixels.shape[-2]), value=True)
    return torch.where(pixels, images, background)


def _output_index(target: int, n_outputs: int | None) -> int:
    """A target's model output index, checked (metrics take indices; callers resolve their output names)."""
    if isinstance(target, (str, bool)) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"metric targets are output indices, got {target!r}; resolve names to indices first")
    index = int(target)
    if index < 0 or (n_outputs is not None and index >= n_outputs):
        raise ValueError(f"target {target!r} is not an output index in [0, {n_outputs})")
    return index


# --------------------------------------------------------------------------------------------------------------
# Compactness


def near_zero_share(maps: Tensor, threshold: float = NEAR_ZERO_THRESHOLD) -> Tensor:
    """Share of tokens (B, T) with |S| < threshold * max|S|; an all-zero map counts as all near zero."""
    magnitude = maps.flatten(-2).abs()
    peak = magnitude.amax(-1, keepdim=True)
    share = (magnitude < threshold * peak).to(maps.dtype).mean(-1)
    return torch.where(peak.squeeze(-1) > 0, share, torch.ones_like(share))


def gini_index(maps: Tensor) -> Tensor:
    """Gini index of |S| over tokens (B, T): 0 for a flat map, near 1 when one token holds all relevance."""
    # Quantus' Sparseness formula; written out because Quantus is not a dependency for three lines.
    magnitude = maps.flatten(-2).abs().double().sort(-1).values
    n = magnitude.shape[-1]
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64, device=maps.device) - n - 1
    total = magnitude.sum(-1)
    gini = (weights * magnitude).sum(-1) / (n * total.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.where(total > 0, gini, torch.zeros_like(gini)).to(maps.dtype)


# --------------------------------------------------------------------------------------------------------------
# Class sensitivity


def target_correlation(maps: Tensor) -> Tensor:
    """Pearson correlation (B, T, T) between the maps of every pair of targets of an image; NaN for a flat map."""
    flat = maps.flatten(-2).double()
    centred = flat - flat.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1)
    # nan_to_num would hide a flat map; a 0/0 correlation is reported as NaN on purpose.
    correlation = (centred @ centred.transpose(-1, -2)) / (norm[..., :, None] * norm[..., None, :])
    return correlation.to(maps.dtype)


# --------------------------------------------------------------------------------------------------------------
# Localisation


def token_overlap(mask_pixels: Tensor, grid: tuple[int, int]) -> Tensor:
    """Share of each token's pixels inside a mask at model-input resolution (B, H, W) in [0, 1] -> (B, gh, gw)."""
    height, width = mask_pixels.shape[-2:]
    patch = (height // grid[0], width // grid[1])
    covered = mask_pixels[..., : grid[0] * patch[0], : grid[1] * patch[1]].float()
    return F.avg_pool2d(covered[:, None], kernel_size=patch, stride=patch)[:, 0]


def tokens_inside(overlap: Tensor, threshold: float = INSIDE_OVERLAP) -> Tensor:
    """Tokens (B, gh, gw) that count as inside: overlap >= threshold, plus the largest-overlap token(s)."""
    flat = overlap.flatten(-2)
    largest = flat.amax(-1, keepdim=True)
    inside = (flat >= threshold) | ((flat == largest) & (largest > 0))
    return inside.view_as(overlap)


def positive_share_inside(maps: Tensor, inside: Tensor) -> Tensor:
    """Share of positive relevance (B, T) on tokens inside (B, gh, gw); NaN without positive relevance or mask."""
    positive = maps.flatten(-2).clamp_min(0).double()
    mask = inside.flatten(-2)[:, None].to(positive)
    total = positive.sum(-1)
    share = (positive * mask).sum(-1) / total
    valid = (total > 0) & (mask.sum(-1) > 0)
    return torch.where(valid, share, torch.full_like(share, float("nan"))).to(maps.dtype)


def pointing_hit(maps: Tensor, inside: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """1.0 where the top-ranked token (B, T) is inside, 0.0 where not, NaN where no token is inside."""
    top = importance_order(maps, generator)[..., :1]
    mask = inside.flatten(-2)[:, None].expand(-1, maps.shape[1], -1)
    hit = mask.gather(-1, top).squeeze(-1).to(maps.dtype)
    return torch.where(mask.any(-1), hit, torch.full_like(hit, float("nan")))


# --------------------------------------------------------------------------------------------------------------
# Sanity: cascading model-parameter randomisation


def randomisation_stages(model: VisionTransformer, n_blocks: int = 2) -> list[tuple[str, tuple[str, ...]]]:
    """(stage name, modules re-initialised so far): the head, then the head and the last 1..n_blocks blocks."""
    depth = len(model.blocks)
    if not 0 <= n_blocks <= depth:
        raise ValueError(f"n_blocks must be in [0, {depth}] for a model with {depth} blocks, got {n_blocks}")
    modules: tuple[str, ...] = ("head",)
    stages = [("head", modules)]
    for block in range(depth - 1, depth - 1 - n_blocks, -1):
        modules = (*modules, f"blocks.{block}")
        stages.append((f"head+blocks.{block}-{depth - 1}", modules))
    return stages


def reinitialised(model: nn.Module, modules: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose named submodules get fresh parameters (``reset_parameters``, seeded)."""
    fresh = copy.deepcopy(model)
    # fork_rng confines the seeded draws to this block, so the caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in modules:
            for module in fresh.get_submodule(name).modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
    return fresh


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation over tokens between two map batches (B, T, gh, gw) -> (B, T); NaN for flat maps."""
    ranks = [
        torch.from_numpy(stats.rankdata(m.flatten(-2).detach().double().cpu().numpy(), axis=-1)) for m in (first, second)
    ]
    centred = [r - r.mean(-1, keepdim=True) for r in ranks]
    denominator = centred[0].norm(dim=-1) * centred[1].norm(dim=-1)
    return (centred[0] * centred[1]).sum(-1) / denominator


def cascading_randomisation(
    model: VisionTransformer,
    maps: Tensor,
    explain_maps: Callable[[nn.Module], Tensor],
    *,
    n_blocks: int = 2,
    seed: int = 0,
) -> list[tuple[str, Tensor]]:
    """Spearman (B, T) between ``maps`` and ``explain_maps(model')`` for each cascading re-initialisation stage."""
    return [
        (stage, spearman(maps, explain_maps(reinitialised(model, modules, seed))))
        for stage, modules in randomisation_stages(model, n_blocks)
    ]


# --------------------------------------------------------------------------------------------------------------
# Everything per (image, target) at once


#: Columns of :func:`map_scores`, in the order of the metrics table.
SCORE_COLUMNS: tuple[str, ...] = (
    "correctness",
    "auc_mif",
    "auc_lif",
    "insertion_auc",
    "near_zero_share",
    "gini",
    "localisation",
    "pointing_hit",
)


def map_scores(
    model: VisionTransformer,
    images: Tensor,
    maps: Tensor,
    targets: Sequence[int],
    baseline: Tensor,
    inside: Tensor | None = None,
    scale: Tensor | None = None,
    **curve_options: object,
) -> tuple[dict[str, Tensor], PerturbationCurves]:
    """Every per-map score (B, T) of :data:`SCORE_COLUMNS` and the curves; localisation is NaN without ``inside``."""
    curves = perturbation_curves(model, images, maps, targets, baseline, **curve_options)
    scores = correctness_scores(curves, scale)
    maps = maps.detach().cpu()
    scores["near_zero_share"] = near_zero_share(maps)
    scores["gini"] = gini_index(maps)
    if inside is None:
        missing = torch.full(maps.shape[:2], float("nan"), dtype=maps.dtype)
        scores["localisation"], scores["pointing_hit"] = missing, missing.clone()
    else:
        scores["localisation"] = positive_share_inside(maps, inside.cpu())
        scores["pointing_hit"] = pointing_hit(maps, inside.cpu())
    return {name: scores[name] for name in SCORE_COLUMNS}, curves
