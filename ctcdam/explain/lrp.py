"""Partial LRP: LRP relevance of the last layer's attention, CLS row, head mean (Voita et al. 2019; Chefer's baseline).

Definition (Chefer, Gur & Wolf 2021, ``baselines/ViT/ViT_orig_LRP.py`` with ``modules/layers_lrp.py``,
``generate_LRP(method="last_layer", is_ablation=False)``, the partial-LRP baseline of the CDAM paper): the
target's relevance starts as 1 at the output and is propagated back, layer by layer, to the attention
probabilities A of the last block; the map is mean over heads of max(R_A, 0), CLS row, patch tokens. The rules:

* Linear layers (head, MLP, attention projection): LRP alpha = 1, beta = 0 with positive and negative inputs
  kept apart, biases not counted: R_in = x+ (S W+) + x- (S W-) with S = R / (x+ W+^T + x- W-^T).
  Chefer's ``layers_lrp.py`` divides the x- term by ``Z2 + Z2`` (a typo for ``Z1 + Z2``); the published
  rule (and ``layers_ours.py``) has ``Z1 + Z2``, used here, which conserves relevance.
* Residual sums x + f(x): LRP-0, R_x = x R / (x + f(x)), R_f = f(x) R / (x + f(x)); a clone sums relevance.
* LayerNorm, GELU (any elementwise activation), dropout, drop path, layer scale, CLS pooling: relevance
  passes unchanged (Chefer's ``RelProp`` identity; layer scale and drop path are not in his model).
* The attention product O = A V: LRP-0, R_A = A * ((R / O) V^T), then halved as Chefer halves both factors.

Divisions use Chefer's stabiliser ``safe_divide`` (a / (b + 1e-9), and 0 where b = 0). The target reads the CLS
token only, so only the CLS row of the last block carries relevance and only the CLS query row of A gets
any: everything is computed for that row, batched over images and targets, without autograd. Targets are
output indices (a row of a linear head) or concept vectors (a linear functional of the head's embedding):
both are one weight vector on the embedding, whose alpha-beta rule gives the embedding's relevance.

Why by hand, not with a library (checked with lxt 2.1 and zennit 0.5.1, the newest that install here):

* ``lxt`` (AttnLRP) cannot be imported beside this project: ``import lxt.efficient`` imports HuggingFace
  ``transformers`` model code at import time; with transformers 5.x it fails (``No module named
  'transformers.modeling_attn_mask_utils'``), and transformers 4.x requires ``huggingface-hub<1.0`` while the
  project runs huggingface-hub 2.x. With those pinned down in a scratch folder, ``monkey_patch`` on timm
  raises ``ValueError: timm.models.vision_transformer not yet supported`` (it maps HuggingFace models and
  torchvision's ViT only); a custom patch map replaces ``torch.nn.LayerNorm.forward`` (and GELU) for the
  whole process with no undo, which would silently change every other method's gradients; timm's
  ``Attention`` computes q, k, softmax and A V inside one ``forward`` (fused by default), so its rule needs
  a rewritten forward anyway. And its rules are AttnLRP / CP-LRP (gradient x input with epsilon rules),
  not the alpha-beta rules of the partial LRP the paper compares.
* ``zennit`` attaches rules to modules only (Linear, Conv, activations); on a timm ViT the attention
  products, softmax and LayerNorm are unhooked tensor operations, so plain gradients flow through them and
  relevance is not conserved: on a 2-block ViT, EpsilonPlusFlat's input relevance summed to 7e-9 for an
  output of 0.054, EpsilonAlpha2Beta1's to 6.8e5. zennit has no attention rules (its maintainers' issue
  chr5tphr/zennit#184) and no way to read relevance at A.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ctcdam.explain import vit
from ctcdam.explain.api import Attribution, Explanation, Target, TargetWeights, attribute_method
from ctcdam.explain.perturb import FORWARD_CHUNK_ELEMENTS, rows_per_chunk

#: Chefer's stabiliser of LRP denominators.
EPSILON = 1e-9


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """Chefer's ``safe_divide``: numerator / (denominator + 1e-9), and 0 where the denominator is exactly 0."""
    den = denominator.clamp(min=EPSILON) + denominator.clamp(max=EPSILON)
    den = den + den.eq(0).to(den.dtype) * EPSILON
    return numerator / den * denominator.ne(0).to(denominator.dtype)


def alpha1_beta0(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """LRP alpha = 1, beta = 0 through a linear layer: inputs x (..., in), weight (out, in), relevance (..., out)."""
    positive_w, negative_w = weight.clamp(min=0), weight.clamp(max=0)
    positive_x, negative_x = x.clamp(min=0), x.clamp(max=0)
    scale = safe_divide(relevance, positive_x @ positive_w.T + negative_x @ negative_w.T)
    return positive_x * (scale @ positive_w) + negative_x * (scale @ negative_w)


def lrp_split(first: Tensor, second: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """LRP-0 through a sum first + second: each part gets its share of ``relevance``."""
    scale = safe_divide(relevance, first + second)
    return first * scale, second * scale


def partial_lrp_unsupported(model: VisionTransformer) -> str | None:
    """Why partial LRP cannot explain ``model`` (None when it can)."""
    block = model.blocks[-1]
    if model.cls_token is None or model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        return f"the head pools {model.global_pool!r} over tokens, not the CLS token"
    if type(block).forward is not Block.forward:
        return f"the last block is a {type(block).__name__}, not timm's Block"
    if type(block.attn).forward is not Attention.forward:
        return f"the last attention is a {type(block.attn).__name__}, not timm's Attention"
    if getattr(block.attn, "gate", None) is not None:
        return "the last attention has an output gate, for which Chefer's rules have no counterpart"
    if type(block.mlp).forward is not Mlp.forward or not isinstance(block.mlp.fc1, nn.Linear):
        return f"the last MLP is a {type(block.mlp).__name__}, not timm's two-layer Mlp"
    if not isinstance(model.head, (nn.Linear, nn.Identity)) or not isinstance(model.fc_norm, nn.Identity):
        head, norm = type(model.head).__name__, type(model.fc_norm).__name__
        return f"the head is a {head} (with fc_norm {norm}), not one linear layer"
    return None


def _embedding_weights(model: VisionTransformer, weights: TargetWeights) -> Tensor:
    """Each target as one weight vector on the head's embedding (n_targets, D); the head bias has no relevance."""
    head = model.head.weight if isinstance(model.head, nn.Linear) else None
    on_outputs = weights.output_weights @ head if head is not None else weights.output_weights
    return on_outputs + weights.embedding_weights


def partial_lrp_scores(model: VisionTransformer, x: Tensor, weights: TargetWeights) -> Tensor:
    """Partial-LRP scores (R, n_targets, N_patches) from the last block's input x (R, n, D); no autograd."""
    block, attn = model.blocks[-1], model.blocks[-1].attn
    rows, n_tokens, _ = x.shape
    # Forward of the CLS row, every intermediate kept for the rules.
    tokens = block.norm1(x)
    qkv = attn.qkv(tokens).reshape(rows, n_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (R, H, n, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]  # CLS row of A: (R, H, n)
    head_outputs = torch.einsum("rhj,rhjd->rhd", probs, v)  # O = A V, CLS row: (R, H, hd)
    mixed = attn.norm(head_outputs.reshape(rows, attn.attn_dim))
    attended = block.ls1(attn.proj(mixed))  # (R, D)
    x1 = x[:, 0] + attended
    hidden = block.mlp.norm(block.mlp.act(block.mlp.fc1(block.norm2(x1))))
    mlp_out = block.ls2(block.mlp.fc2(hidden))
    embedding = vit.head_outputs(model, model.norm(x1 + mlp_out)[:, None])[1]  # (R, D)

    # Relevance, (R, T, ...) for every image row and target, from 1 at the output down to A.
    target_weights = _embedding_weights(model, weights)  # (T, D)
    # alpha1_beta0 of a relevance of 1 through each target's weight row, for all targets at once: (R, T, D).
    positive = embedding.clamp(min=0)[:, None] * target_weights.clamp(min=0)
    contributions = positive + embedding.clamp(max=0)[:, None] * target_weights.clamp(max=0)
    unit = torch.ones_like(contributions[..., :1])
    relevance = contributions * safe_divide(unit, contributions.sum(-1, keepdim=True))
    # (the final norm and the CLS pooling pass the embedding's relevance unchanged to the CLS row)
    on_x1, on_mlp = lrp_split(x1[:, None], mlp_out[:, None], relevance)
    on_hidden = alpha1_beta0(hidden[:, None], block.mlp.fc2.weight, on_mlp)
    on_x1 = on_x1 + alpha1_beta0(block.norm2(x1)[:, None], block.mlp.fc1.weight, on_hidden)
    _, on_attended = lrp_split(x[:, None, 0], attended[:, None], on_x1)
    on_mixed = alpha1_beta0(mixed[:, None], attn.proj.weight, on_attended)
    on_heads = on_mixed.view(rows, -1, attn.num_heads, attn.head_dim)  # (R, T, H, hd)
    scale = safe_divide(on_heads, head_outputs[:, None])
    on_probs = probs[:, None] * torch.einsum("rthd,rhjd->rthj", scale, v) / 2  # (R, T, H, n)
    return on_probs.clamp_min(0).mean(2)[..., vit.num_prefix_tokens(model) :]


class PartialLrp(Attribution):
    """Partial LRP: alpha-beta LRP relevance of the last attention's CLS row, max(., 0), mean over heads."""

    name = "partial_lrp"

    @attribute_method
    def attribute(
        self, images: Tensor, targets: Sequence[Target], *, chunk_elements: int = FORWARD_CHUNK_ELEMENTS
    ) -> Explanation:
        """Partial-LRP maps of ``targets`` on ``images``: ``blocks[:-1]`` once, then the CLS-row rules, in chunks."""
        model = self.model
        reason = partial_lrp_unsupported(model)
        if reason is not None:
            raise ValueError(f"partial LRP cannot explain this model: {reason}")
        with torch.no_grad():
            x = vit.last_block_input(model, images)
            outputs, embedding = vit.outputs_from_last_block_input(model, x)
            weights = self.target_weights(targets, outputs, embedding)
            step = rows_per_chunk(chunk_elements, x.shape[1] * x.shape[2] * len(weights))
            scores = torch.cat([partial_lrp_scores(model, part, weights) for part in x.split(step)])
        return Explanation.from_tokens(model, images, scores, outputs, self.name)
