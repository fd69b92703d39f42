"""RP: relevance propagation by gradient-weighted attention rollout (Chefer et al. 2021), batched, target-specific.

Definition (Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021; the "RP" baseline of the CDAM paper, whose reference code rebuilds
Chefer's ViT and backpropagates the one-hot logit): for each block b, A_b is the softmax attention
(heads, n, n) and G_b = d target / d A_b (a raw output, or a concept similarity, as for every method here);

    Abar_b = mean over heads of max(G_b * A_b, 0),      R = I,   R <- R + Abar_b R   for b = 1 .. L,

and the map is the CLS row of R over the patch tokens (CLS and register tokens dropped). So
R = (I + Abar_L) ... (I + Abar_1), and its CLS row is e_0 (I + Abar_L) ... (I + Abar_1): it is accumulated here
as a row vector from the last block down, O(n^2) per block instead of the O(n^3) of the full matrix product.

The forward runs block by block with each block's attention written out (the same operations as timm's unfused
``Attention.forward``), so every A_b is a node of one autograd graph and one backward gives every G_b for all
images and targets: each image row is repeated once per target, as the gradient baselines do.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor

from ctcdam.explain import vit
from ctcdam.explain.api import Attribution, Explanation, Target, TargetWeights, attribute_method
from ctcdam.explain.perturb import DEFAULT_CHUNK_ELEMENTS, average_over_samples, rows_per_chunk, unperturbed


def rp_unsupported(model: VisionTransformer) -> str | None:
    """Why RP cannot explain ``model`` (None when it can)."""
    if model.cls_token is None:
        return "the model has no CLS token, and RP reads the CLS row of the rolled-out relevance"
    for index, block in enumerate(model.blocks):
        if type(block).forward is not Block.forward:
            return f"block {index} is a {type(block).__name__}, not timm's Block"
        if type(block.attn).forward is not Attention.forward:
            return f"the attention of block {index} is a {type(block.attn).__name__}, not timm's Attention"
    return None


def block_with_attention(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """(block output, softmax attention (R, heads, n, n)) of a timm ``Block``: timm's unfused forward, written out."""
    attn = block.attn
    tokens = block.norm1(x)
    rows, n_tokens, _ = tokens.shape
    gate = attn.gate(tokens).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(tokens).reshape(rows, n_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    mixed = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(rows, n_tokens, attn.attn_dim)
    mixed = attn.norm(mixed)
    if gate is not None:
        mixed = mixed * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(mixed))))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, probs


def rp_scores(model: VisionTransformer, images: Tensor, weights: TargetWeights) -> Tensor:
    """RP scores (R, n_targets, N_patches) of R images, one backward for every image and target."""
    n_targets = len(weights)
    with torch.enable_grad():
        # The embedded tokens are made a leaf so the attention has a graph even when every parameter is frozen;
        # gradients are asked for the attention only, so no parameter .grad is ever written.
        x = model.norm_pre(vit.embed_tokens(model, images.repeat_interleave(n_targets, 0))).detach()
        x.requires_grad_(True)
        probabilities = []
        for block in model.blocks:
            x, probs = block_with_attention(block, x)
            probabilities.append(probs)
        outputs, embedding = vit.head_outputs(model, model.norm(x))
        values = weights.values(
            outputs.view(-1, n_targets, outputs.shape[-1]), embedding.view(-1, n_targets, embedding.shape[-1])
        )
        grads = torch.autograd.grad(values.sum(), probabilities)
    with torch.no_grad():
        row = torch.zeros_like(probabilities[0][:, 0, 0])  # (R * T, n): e_0, the CLS row of R = I
        row[:, 0] = 1.0
        for probs, grad in zip(reversed(probabilities), reversed(grads)):
            weighted = (grad * probs).clamp_min(0).mean(1)  # Abar_b: (R * T, n, n)
            row = row + torch.bmm(row[:, None], weighted)[:, 0]
    return row[:, vit.num_prefix_tokens(model) :].reshape(-1, n_targets, row.shape[-1] - vit.num_prefix_tokens(model))


class RelevancePropagation(Attribution):
    """RP (Chefer et al. 2021): CLS row of the rollout of head-mean max(dA * A, 0) over blocks, R <- R + Abar R."""

    name = "rp"

    @attribute_method
    def attribute(
        self, images: Tensor, targets: Sequence[Target], *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    ) -> Explanation:
        """RP maps of ``targets`` on ``images``; chunks in input rows (one per image and target).

        A row counts tokens x (width + depth x heads x tokens) elements: what it keeps for the backward is
        dominated by every block's attention matrices, not by its token features.
        """
        model = self.model
        reason = rp_unsupported(model)
        if reason is not None:
            raise ValueError(f"RP cannot explain this model: {reason}")
        outputs, weights = self.plain_outputs(images, targets)
        n_tokens = vit.tokens_per_image(model, tuple(images.shape[-2:]))
        heads = max(int(block.attn.num_heads) for block in model.blocks)
        per_row = n_tokens * (int(model.embed_dim) + len(model.blocks) * heads * n_tokens) * len(weights)
        scores = average_over_samples(
            lambda rows: rp_scores(model, rows, weights), unperturbed(images), n_samples=1,
            n_images=images.shape[0], chunk_rows=rows_per_chunk(chunk_elements, per_row),
        )
        return Explanation.from_tokens(model, images, scores, outputs, self.name)
