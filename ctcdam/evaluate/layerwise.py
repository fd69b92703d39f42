"""Where in the network a cause acts: CDAM's gradient x activation read at every block, not only the last.

CDAM scores the tokens T of the last block (the output of ``blocks[-1].norm1``) by S_i = sum_j T_ij df/dT_ij. The
same product read at ``blocks[l].norm1`` for every l shows at which depth the relevance for a target still sits on
the painted cause tokens and where it has moved elsewhere. The CLS token gets the same score: relevance the model
has already gathered into the CLS token is invisible to CDAM, which scores patch tokens only. This explains the
known-cause benchmark's finding that CDAM puts little negative malignancy relevance on the calcified foci
(README, "Known-cause benchmark"); at the last block the patch scores equal those of :mod:`ctcdam.explain.cdam`
(tests/test_layerwise.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ctcdam.data.transforms import InputConfig, to_model_input
from ctcdam.evaluate.ground_truth import TARGET_CAUSES
from ctcdam.evaluate.inputs import NoduleViews
from ctcdam.explain import cause_metrics, vit


@dataclass(frozen=True)
class LayerScores:
    """Gradient x activation at every block's norm1 output: ``patches`` (blocks, B, gh, gw), ``cls`` (blocks, B)."""

    patches: Tensor
    cls: Tensor


#: Where the tokens are read: the attention's input (``blocks[l].norm1`` output, CDAM's choice) or the residual
#: stream entering block l (every path to the output, attention and skip connection alike).
SITES: tuple[str, ...] = ("norm1", "residual")


def layer_scores(model: VisionTransformer, images: Tensor, output_index: int, site: str = "norm1") -> LayerScores:
    """S = sum_j T_ij df/dT_ij at ``site`` of every block l and every token (f: output ``output_index``)."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    tokens: list[Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        tokens.append(output)

    def keep_input(_module: torch.nn.Module, inputs: tuple[Tensor, ...]) -> None:
        tokens.append(inputs[0])

    if site == "norm1":
        handles = [block.norm1.register_forward_hook(keep) for block in model.blocks]
    else:
        handles = [block.register_forward_pre_hook(keep_input) for block in model.blocks]
    try:
        # autograd.grad w.r.t. the tokens only: the parameters' .grad stay as they were
        with vit.eval_mode(model), torch.enable_grad():
            outputs = model(images)
            grads = torch.autograd.grad(outputs[:, output_index].sum(), tokens)
    finally:
        for handle in handles:
            handle.remove()
    prefix = vit.num_prefix_tokens(model)
    grid = vit.grid_size(model, tuple(images.shape[-2:]))
    scores = torch.stack([(t * g).sum(-1).detach() for t, g in zip(tokens, grads)])  # (blocks, B, prefix + N)
    return LayerScores(scores[..., prefix:].reshape(*scores.shape[:2], *grid), scores[..., 0])


def layer_table(model: VisionTransformer, nodules: Sequence[NoduleViews], input_config: InputConfig,
                target: str, output_index: int, site: str = "norm1") -> pd.DataFrame:
    """Per image and block: evidence and counter-evidence shares of the patch scores, the share of negative relevance
    on the nodule outside the counter-evidence, and the CLS token's share of |S|."""
    evidence_cause, counter_cause = TARGET_CAUSES.get(target, (None, None))
    rows = []
    for nodule in nodules:
        images = to_model_input(nodule.slices_hu, input_config)
        scores = layer_scores(model, images, output_index, site)
        for block in range(scores.patches.shape[0]):
            maps = scores.patches[block][:, None]  # (views, 1, gh, gw)
            total = scores.patches[block].flatten(1).abs().sum(-1) + scores.cls[block].abs()
            for view in range(maps.shape[0]):
                row = {"scan_id": nodule.scan_id, "nodule_id": nodule.nodule_id, "label": nodule.label,
                       "view": view, "block": block, "target": target, "site": site,
                       "cls_score": float(scores.cls[block, view]),
                       "cls_share": float(scores.cls[block, view].abs() / total[view]),
                       "patch_sum": float(scores.patches[block, view].sum())}
                for column, cause, share in (("evidence_share", evidence_cause, cause_metrics.evidence_share),
                                             ("counter_evidence_share", counter_cause, cause_metrics.counter_evidence_share)):
                    mask = nodule.causes.get(cause) if cause else None
                    row[column] = float(share(maps[view : view + 1], mask[view : view + 1])[0, 0]) if (
                        mask is not None and mask[view].any()) else float("nan")
                counter = nodule.causes.get(counter_cause) if counter_cause else None
                if nodule.inside is not None and counter is not None and counter[view].any():
                    rest = nodule.inside[view : view + 1] & ~counter[view : view + 1]
                    row["negative_on_rest_of_nodule"] = float(cause_metrics.counter_evidence_share(maps[view : view + 1], rest)[0, 0])
                rows.append(row)
    return pd.DataFrame(rows)
