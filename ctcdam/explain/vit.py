"""Generic helpers over a timm VisionTransformer: token grid, partial forwards, token removal, mode and hooks.

Every explanation method and metric goes through these few functions, so the assumptions about timm's
VisionTransformer (``forward = forward_head(forward_features(x))``, prefix tokens first, ``blocks`` a
sequence) live in one place.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
# vision_transformer names the Attention its blocks use; timm 1.0.9's timm.layers does not export it.
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from ctcdam.explain.perturb import rows_per_chunk


def check_vit(model: nn.Module) -> VisionTransformer:
    """Return ``model`` if it is a timm VisionTransformer whose forward can be split into its parts, else raise."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"explanations need a timm VisionTransformer, got {type(model).__name__}")
    for name in ("forward", "forward_features", "forward_head"):
        if getattr(type(model), name) is not getattr(VisionTransformer, name):
            raise TypeError(
                f"{type(model).__name__} overrides VisionTransformer.{name}; explanations split the forward into "
                "patch embedding, blocks, final norm, pooling and head, so put extra logic in the head module instead"
            )
    if len(model.blocks) < 1:
        raise ValueError("the VisionTransformer has no blocks to explain")
    return model


def num_prefix_tokens(model: VisionTransformer) -> int:
    """Number of tokens before the patch tokens (CLS plus registers)."""
    return int(model.num_prefix_tokens)


def patch_size(model: VisionTransformer) -> tuple[int, int]:
    """Patch height and width in pixels."""
    size = model.patch_embed.patch_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def grid_size(model: VisionTransformer, image_size: tuple[int, int]) -> tuple[int, int]:
    """Token grid (rows, columns) that the model makes of an image of ``image_size`` (height, width) pixels."""
    embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False) or getattr(embed, "img_size", None) is None:
        if hasattr(embed, "dynamic_feat_size"):
            rows, cols = embed.dynamic_feat_size(tuple(image_size))
            return int(rows), int(cols)
        ph, pw = patch_size(model)
        return image_size[0] // ph, image_size[1] // pw
    return int(embed.grid_size[0]), int(embed.grid_size[1])


def tokens_per_image(model: VisionTransformer, image_size: tuple[int, int]) -> int:
    """Tokens of the sequence the blocks see for one image (prefix tokens plus the patch grid)."""
    rows, cols = grid_size(model, image_size)
    return num_prefix_tokens(model) + rows * cols


def embed_tokens(model: VisionTransformer, images: Tensor) -> Tensor:
    """Tokens after patch embedding and position embedding, prefix tokens first: (B, prefix + N, D).

    timm has no public call for this sequence (``forward_intermediates`` starts from it but returns block
    outputs only), and token removal must cut it before the first block, so it goes through ``_pos_embed``.
    """
    tokens = model._pos_embed(model.patch_embed(images))
    return model.patch_drop(tokens)


def run_blocks(model: VisionTransformer, tokens: Tensor, stop: int | None = None) -> Tensor:
    """Apply ``norm_pre`` and ``blocks[:stop]`` to embedded tokens."""
    x = model.norm_pre(tokens)
    for block in model.blocks[:stop]:
        x = block(x)
    return x


def last_block_input(model: VisionTransformer, images: Tensor) -> Tensor:
    """Input x of the last block (the output of ``blocks[:-1]``), (B, prefix + N, D); grad mode is the caller's."""
    depth = len(model.blocks)
    if depth == 1:  # no block before the last: its input is the embedded sequence
        return model.norm_pre(embed_tokens(model, images))
    # timm 1.0.9 fails on return_prefix_tokens=True for a model without prefix tokens: ask only when there are some.
    has_prefix = num_prefix_tokens(model) > 0
    (taken,) = model.forward_intermediates(
        images, indices=[depth - 2], return_prefix_tokens=has_prefix, stop_early=True, output_fmt="NLC",
        intermediates_only=True,
    )
    if not has_prefix:
        return taken
    patches, prefix = taken
    return torch.cat([prefix, patches], dim=1)


def head_outputs(model: VisionTransformer, features: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs, embedding) from final-normed token features: the pooled pre-logits embedding and the head on it.

    For a CLS-token model the embedding is the final-norm CLS embedding (``fc_norm`` is the identity there).
    """
    embedding = model.forward_head(features, pre_logits=True)
    return model.head(embedding), embedding


def outputs_from_last_block_input(model: VisionTransformer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs, embedding) of the model given the last block's input x."""
    return head_outputs(model, model.norm(model.blocks[-1](x)))


def cls_embedding(model: VisionTransformer, images: Tensor) -> Tensor:
    """The embedding the head reads (final-norm CLS embedding for CLS-token models), (B, D)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def forward_without_tokens(
    model: VisionTransformer,
    images: Tensor,
    keep: Tensor,
    *,
    chunk_elements: int | None = None,
    with_embedding: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Model outputs with the patch tokens where ``keep`` (B, N_patches) is False removed from the sequence.

    Tokens are dropped after the position embedding (the sequence gets shorter; nothing is replaced by a
    baseline), as the reference token ablation does. CLS and register tokens are always kept. Rows that keep
    the same number of tokens run as one batch, at most ``chunk_elements`` rows x tokens x width at a time
    (None: all of them). Returns outputs (B, n_outputs), or (outputs, embedding) with ``with_embedding``.
    Grad mode and train/eval mode are the caller's (use it under ``torch.no_grad()`` and ``model.eval()``).
    """
    check_vit(model)
    tokens = embed_tokens(model, images)
    prefix = num_prefix_tokens(model)
    n_patches = tokens.shape[1] - prefix
    keep = keep.to(device=tokens.device, dtype=torch.bool)
    if keep.shape != (tokens.shape[0], n_patches):
        raise ValueError(
            f"keep has shape {tuple(keep.shape)} but the images give {tokens.shape[0]} rows of {n_patches} patch tokens"
        )
    counts = keep.sum(dim=1)
    outputs: Tensor | None = None
    embeddings: Tensor | None = None
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().squeeze(1)
        width = (prefix + count) * tokens.shape[-1]
        step = len(rows) if chunk_elements is None else rows_per_chunk(chunk_elements, width)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            # nonzero() lists kept positions in ascending order, so the kept tokens keep their order.
            kept = keep[chunk].nonzero()[:, 1].view(len(chunk), count)
            patches = torch.gather(
                tokens[chunk, prefix:], 1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            )
            sequence = torch.cat([tokens[chunk, :prefix], patches], dim=1)
            out, emb = head_outputs(model, model.norm(run_blocks(model, sequence)))
            if outputs is None:
                outputs = out.new_empty((tokens.shape[0], *out.shape[1:]))
                embeddings = emb.new_empty((tokens.shape[0], *emb.shape[1:]))
            outputs[chunk] = out
            embeddings[chunk] = emb
    assert outputs is not None and embeddings is not None
    return (outputs, embeddings) if with_embedding else outputs


def patch_sums(pixel_maps: Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """Sum a pixel map (..., H, W) over each patch of the token grid: (..., grid_h, grid_w).

    Pixels beyond the last full patch (timm ignores them) are dropped; a grid that reaches past the image
    (dynamic padding) sees zeros there, as the padded input does.
    """
    height, width = grid[0] * patch[0], grid[1] * patch[1]
    cropped = pixel_maps[..., :height, :width]
    padded = torch.nn.functional.pad(cropped, (0, width - cropped.shape[-1], 0, height - cropped.shape[-2]))
    blocks = padded.reshape(*padded.shape[:-2], grid[0], patch[0], grid[1], patch[1])
    return blocks.sum(dim=(-3, -1))


def attention_probabilities(attn: nn.Module, tokens: Tensor, queries: int | None = None) -> Tensor:
    """Softmax attention (B, heads, queries, tokens) of a timm ``Attention`` given its input (the norm1 output).

    Recomputed from the qkv projection, so it works with fused attention left on; ``queries`` limits the rows
    to the first few tokens (1: the CLS row only).
    """
    if type(attn).forward is not Attention.forward:
        raise TypeError(f"attention maps need timm's standard Attention, got {type(attn).__name__}")
    batch, n_tokens, _ = tokens.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(tokens).view(batch, n_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0][:, :, :queries]), attn.k_norm(qkv[1])
    return torch.softmax(attn.scale * q @ k.transpose(-2, -1), dim=-1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the duration, then restore each one's own train/eval flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def forward_hook(module: nn.Module, hook: Callable[..., object]) -> Iterator[None]:
    """Register a forward hook for the duration of the block and always remove it."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
