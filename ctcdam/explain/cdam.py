"""CDAM (vanilla, smooth, integrated, concept) for timm ViTs: batched, multi-target, one call shape.

Definition (Brocki et al., arXiv 2312.02364; the reference code's semantics: docs/design.md): the tokens T are the
output of ``blocks[-1].norm1``; for a target f (a raw model output, or the dot product of the embedding the
head reads with a concept vector) the score of patch token i is S_i = sum_j T_ij df/dT_ij, signed and
unnormalised. Smooth CDAM averages S over Gaussian noise added to the last block's input x; Integrated CDAM
over x scaled by alpha = k/steps (k = 1..steps-1, the reference's averaging).

Two engines compute S for a batch of (possibly perturbed) last-block inputs and several targets at once:

* the CLS path (timm ``Block`` + ``Attention``, CLS-token pooling; register tokens allowed): the head reads
  the CLS token only, so a patch token T_i reaches f only through its key and value in the CLS row of the last
  attention. With q0 the CLS query, a_hi the CLS attention of head h and g_h = df/d(output of head h):

      S_i = sum_h a_hi [ T_i.W_v,h^T g_h + scale (T_i.W_k,h^T q0_h) (v_hi.g_h - o_h.g_h) ]

  (value term plus softmax backward; the biases drop out because S_i = (k_i - b_k).df/dk_i +
  (v_i - b_v).df/dv_i). Every factor is a D-vector per head, so no token's key or value is ever formed:
  the work after ``blocks[:-1]`` is O(N D heads) per sample and target instead of O(N D^2). Autograd only
  runs the per-token tail (proj, MLP, norms, head) of the CLS row to get g_h; the attention-row backward is
  written by hand because autograd would need every token's keys and values, which this path avoids.
* the general path (anything else: average pooling, other block or attention types): the full last block
  with autograd w.r.t. the norm1 output, via a temporary forward hook.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ctcdam.explain import vit
from ctcdam.explain.api import Attribution, Explanation, Target, TargetWeights, attribute_method
from ctcdam.explain.perturb import (
    DEFAULT_CHUNK_ELEMENTS,
    MakeRows,
    average_over_samples,
    gaussian_noise,
    rows_per_chunk,
    scaled_path,
    unperturbed,
)

_log = logging.getLogger(__name__)

#: The engines ``engine=`` chooses from; "auto" takes the CLS path when the model allows it.
ENGINES: tuple[str, ...] = ("auto", "cls", "general")


# --------------------------------------------------------------------------------------------------------------
# Engines: scores S (rows, n_targets, N_patches) for a batch of last-block inputs x (rows, prefix + N, D)


def cls_path_unsupported(model: VisionTransformer) -> str | None:
    """Why the CLS-row engine cannot explain ``model`` (None when it can)."""
    block = model.blocks[-1]
    attn = getattr(block, "attn", None)
    if model.cls_token is None or model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        return f"the head pools {model.global_pool!r} over tokens, not the CLS token"
    if type(block).forward is not Block.forward:
        return f"the last block is a {type(block).__name__}, not timm's Block"
    if attn is None or type(attn).forward is not Attention.forward:
        return f"the last attention is a {type(attn).__name__}, not timm's Attention"
    if not isinstance(attn.k_norm, nn.Identity):
        return "key normalisation (k_norm) makes keys nonlinear in the tokens"
    return None


def _qkv_weights(attn: nn.Module) -> tuple[Tensor, ...]:
    """Per-head query, key and value weights (heads, head_dim, D) and biases (heads, head_dim)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    weight = attn.qkv.weight.view(3, heads, head_dim, -1)
    bias = attn.qkv.bias if attn.qkv.bias is not None else weight.new_zeros(3 * heads * head_dim)
    bias = bias.view(3, heads, head_dim)
    return weight[0], weight[1], weight[2], bias[0], bias[1], bias[2]


class _ClsRow(NamedTuple):
    """The CLS row of the last attention for R rows (n tokens, H heads)."""

    tokens: Tensor  #: norm1 output T, (R, n, D)
    key_logits: Tensor  #: q0_h . (k_hi - b_k,h) = T_i . W_k,h^T q0_h, (R, n, H)
    probs: Tensor  #: CLS attention a_hi, (R, n, H)
    head_outputs: Tensor  #: o_h = sum_i a_hi v_hi, (R, H, head_dim)
    gate: Tensor | None  #: the optional output gate of the CLS row, (R, H * head_dim)


def _cls_attention(model: VisionTransformer, x: Tensor) -> _ClsRow:
    """The last attention's CLS row, computed without forming any token's key or value (no autograd)."""
    block, attn = model.blocks[-1], model.blocks[-1].attn
    w_q, w_k, w_v, b_q, b_k, b_v = _qkv_weights(attn)
    tokens = block.norm1(x)  # (R, n, D)
    query = attn.q_norm(torch.einsum("rd,hed->rhe", tokens[:, 0], w_q) + b_q)  # (R, H, hd)
    key_directions = torch.einsum("rhe,hed->rhd", query, w_k)  # q0 W_k: (R, H, D)
    key_logits = torch.bmm(tokens, key_directions.transpose(1, 2))  # q0.(k_i - b_k): (R, n, H)
    key_bias = (query * b_k).sum(-1)  # q0.b_k: (R, H)
    probs = torch.softmax(attn.scale * (key_logits + key_bias[:, None]), dim=1)  # (R, n, H)
    mixed_tokens = torch.bmm(probs.transpose(1, 2), tokens)  # sum_i a_hi T_i: (R, H, D)
    head_outputs = torch.einsum("rhd,hed->rhe", mixed_tokens, w_v) + b_v  # o_h (sum_i a_hi = 1): (R, H, hd)
    gate = attn.gate(tokens[:, 0]).sigmoid() if getattr(attn, "gate", None) is not None else None
    return _ClsRow(tokens, key_logits, probs, head_outputs, gate)


def _cls_tail(
    model: VisionTransformer, x_cls: Tensor, head_outputs: Tensor, gate: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(outputs, embedding) from the CLS row of the last block: attention projection, MLP, final norm, head."""
    block, attn = model.blocks[-1], model.blocks[-1].attn
    mixed = getattr(attn, "norm", nn.Identity())(head_outputs)
    if gate is not None:
        mixed = mixed * gate
    cls = x_cls + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(mixed))))
    cls = cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))
    return vit.head_outputs(model, model.norm(cls[:, None]))


def _cls_path_outputs(model: VisionTransformer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs, embedding) of the model from the last block's input, CLS row only."""
    row = _cls_attention(model, x)
    return _cls_tail(model, x[:, 0], row.head_outputs.flatten(1), row.gate)


def _cls_path_scores(model: VisionTransformer, x: Tensor, weights: TargetWeights) -> Tensor:
    """CDAM scores (R, n_targets, N) of the CLS-row engine (see the module docstring for the formula)."""
    attn = model.blocks[-1].attn
    _, _, w_v, _, _, b_v = _qkv_weights(attn)
    rows, n_targets, heads = x.shape[0], len(weights), attn.num_heads
    with torch.no_grad():
        row = _cls_attention(model, x)
    head_outputs = row.head_outputs
    # One copy of the CLS head output per target, so one backward gives every target's gradient.
    leaf = head_outputs.flatten(1).repeat_interleave(n_targets, 0).requires_grad_(True)
    gate = row.gate.repeat_interleave(n_targets, 0) if row.gate is not None else None
    with torch.enable_grad():
        outputs, embedding = _cls_tail(model, x[:, 0].repeat_interleave(n_targets, 0), leaf, gate)
        values = weights.values(outputs.view(rows, n_targets, -1), embedding.view(rows, n_targets, -1))
        (grad,) = torch.autograd.grad(values.sum(), leaf)
    with torch.no_grad():
        grad = grad.view(rows, n_targets, heads, -1)  # g_h: (R, T, H, hd)
        value_directions = torch.einsum("rthe,hed->rthd", grad, w_v)  # W_v,h^T g_h: (R, T, H, D)
        value_terms = torch.bmm(row.tokens, value_directions.flatten(1, 2).transpose(1, 2))
        value_terms = value_terms.view(rows, -1, n_targets, heads)  # T_i.W_v,h^T g_h: (R, n, T, H)
        centred = (grad * b_v).sum(-1) - (grad * head_outputs[:, None]).sum(-1)  # b_v.g_h - o_h.g_h: (R, T, H)
        key_terms = attn.scale * row.key_logits[:, :, None] * (value_terms + centred[:, None])
        scores = (row.probs[:, :, None] * (value_terms + key_terms)).sum(-1)  # (R, n, T)
    return scores[:, vit.num_prefix_tokens(model) :].transpose(1, 2)


def _general_scores(model: VisionTransformer, x: Tensor, weights: TargetWeights) -> Tensor:
    """CDAM scores (R, n_targets, N) with autograd through the whole last block (any block or pooling)."""
    rows, n_targets = x.shape[0], len(weights)
    captured: list[Tensor] = []

    def tokens_as_leaf(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    with vit.forward_hook(model.blocks[-1].norm1, tokens_as_leaf), torch.enable_grad():
        outputs, embedding = vit.outputs_from_last_block_input(model, x.repeat_interleave(n_targets, 0))
        values = weights.values(outputs.view(rows, n_targets, -1), embedding.view(rows, n_targets, -1))
    if len(captured) != 1:
        raise RuntimeError(f"blocks[-1].norm1 ran {len(captured)} times in one forward; CDAM needs exactly one call")
    (tokens,) = captured
    (grad,) = torch.autograd.grad(values.sum(), tokens)
    scores = (tokens * grad).sum(-1).detach()[:, vit.num_prefix_tokens(model) :]
    return scores.reshape(rows, n_targets, -1)


# --------------------------------------------------------------------------------------------------------------
# CDAM family: one driver, three perturbation schedules of the last block's input


def cdam_maps(
    method: Attribution,
    images: Tensor,
    targets: Sequence[Target],
    n_samples: int,
    perturbation: Callable[[Tensor], MakeRows],
    engine: str,
    chunk_elements: int,
) -> Explanation:
    """Run ``blocks[:-1]`` once, then average the scores of ``n_samples`` perturbed copies of each image's x.

    ``perturbation(x)`` builds the rows of a block of samples x images from the unperturbed last-block input x
    (``ctcdam.explain.perturb``); ``chunk_elements`` bounds the rows x tokens x width scored per pass.
    """
    model = method.model
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'auto', 'cls' or 'general', got {engine!r}")
    reason = cls_path_unsupported(model)
    if engine == "cls" and reason is not None:
        raise ValueError(f"the CLS-row engine cannot explain this model: {reason}")
    use_cls_path = engine == "cls" or (engine == "auto" and reason is None)
    if not use_cls_path:
        _log.debug("%s: full last block (general engine): %s", method.name, reason or "asked for")
    with torch.no_grad():
        x = vit.last_block_input(model, images)
        if use_cls_path:
            outputs, embedding = _cls_path_outputs(model, x)
        else:
            outputs, embedding = vit.outputs_from_last_block_input(model, x)
    weights = method.target_weights(targets, outputs, embedding)
    score_fn = _cls_path_scores if use_cls_path else _general_scores
    batch, n_tokens, dim = x.shape
    copies = 1 if use_cls_path else len(weights)  # the general path repeats each row once per target
    scores = average_over_samples(
        lambda rows: score_fn(model, rows, weights),
        perturbation(x),
        n_samples=n_samples,
        n_images=batch,
        chunk_rows=rows_per_chunk(chunk_elements, n_tokens * dim * copies),
    )
    return Explanation.from_tokens(model, images, scores, outputs.detach(), method.name)


class Cdam(Attribution):
    """Vanilla CDAM: S_i = T_i . df/dT_i at the last block's norm1 output."""

    name = "cdam"

    @attribute_method
    def attribute(
        self,
        images: Tensor,
        targets: Sequence[Target],
        *,
        engine: str = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> Explanation:
        """Maps of ``targets`` on ``images``; ``engine`` "auto" | "cls" | "general"; chunks in last-block rows."""
        return cdam_maps(self, images, targets, 1, unperturbed, engine, chunk_elements)


class SmoothCdam(Attribution):
    """Smooth CDAM: mean CDAM over x + N(0, sigma^2), sigma = noise * (max x - min x) per image, ``samples`` draws."""

    name = "smooth"

    @attribute_method
    def attribute(
        self,
        images: Tensor,
        targets: Sequence[Target],
        *,
        samples: int = 50,
        noise: float = 0.05,
        seed: int | None = 0,
        engine: str = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> Explanation:
        """Maps averaged over ``samples`` seeded noise draws (``seed`` None: the global RNG)."""
        if samples < 1:
            raise ValueError(f"smooth CDAM needs samples >= 1, got {samples}")
        return cdam_maps(
            self, images, targets, samples, lambda x: gaussian_noise(x, noise, seed), engine, chunk_elements
        )


class IntegratedCdam(Attribution):
    """Integrated CDAM: mean CDAM over x scaled by alpha = k/steps, k = 1..steps-1 (zero baseline, as the reference)."""

    name = "integrated"

    @attribute_method
    def attribute(
        self,
        images: Tensor,
        targets: Sequence[Target],
        *,
        steps: int = 50,
        engine: str = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> Explanation:
        """Maps averaged over the ``steps - 1`` inner points of the path from a zero last-block input."""
        if steps < 2:
            raise ValueError(f"integrated CDAM needs steps >= 2 (it averages k = 1..steps-1), got {steps}")
        return cdam_maps(self, images, targets, steps - 1, lambda x: scaled_path(x, steps), engine, chunk_elements)
