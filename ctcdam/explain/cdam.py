"""CDAM (vanilla, smooth, integrated, concept) for timm ViTs: batched, multi-target, one call shape.

Definition (Brocki et al., arXiv 2312.02364; reference code semantics in DESIGN.md §6): the tokens T are the
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
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ctcdam.explain import vit
from ctcdam.targets import target_index

_log = logging.getLogger(__name__)

#: A target: an output index, a target name from ``ctcdam.targets.TARGETS``, or a concept vector (1-D, size D).
Target = int | str | Tensor

#: Rows x tokens x channels per pass (24 MB in float32): few, large operators, yet below glibc's 32 MB mmap
#: threshold, so blocks reuse heap memory instead of page-faulting fresh mappings every time.
DEFAULT_CHUNK_ELEMENTS = 6 * 2**20


@dataclass(frozen=True)
class Explanation:
    """Token-grid maps for each image and target, with the model outputs they explain."""

    maps: Tensor  #: (B, n_targets, grid_h, grid_w), signed, unnormalised
    outputs: Tensor  #: (B, n_outputs), raw model outputs of the unperturbed images
    method: str
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    pixel_maps: Tensor | None = None  #: (B, n_targets, H, W) for pixel-space methods, else None

    def upsample(self, mode: str = "nearest") -> Tensor:
        """Maps at pixel resolution (B, n_targets, H, W): each token covers its patch (nearest, as the reference)."""
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"upsample mode must be 'nearest' or 'bilinear', got {mode!r}")
        grid_h, grid_w = self.maps.shape[-2:]
        size = (grid_h * self.patch_size[0], grid_w * self.patch_size[1])
        options = {"align_corners": False} if mode == "bilinear" else {}
        pixels = F.interpolate(self.maps, size=size, mode=mode, **options)
        # Pixels beyond the last full patch belong to no token (timm drops them): they get 0.
        height, width = self.image_size
        pixels = pixels[..., :height, :width]
        return F.pad(pixels, (0, width - pixels.shape[-1], 0, height - pixels.shape[-2]))


@dataclass(frozen=True)
class TargetWeights:
    """Targets as linear functionals: value = outputs . output_weights[t] + embedding . embedding_weights[t]."""

    output_weights: Tensor  #: (n_targets, n_outputs)
    embedding_weights: Tensor  #: (n_targets, D)

    def __len__(self) -> int:
        return self.output_weights.shape[0]

    def values(self, outputs: Tensor, embedding: Tensor) -> Tensor:
        """Values (..., n_targets), target t read from copy t: outputs (..., T, n_outputs), embeddings (..., T, D)."""
        return (outputs * self.output_weights).sum(-1) + (embedding * self.embedding_weights).sum(-1)

    def all_values(self, outputs: Tensor, embedding: Tensor) -> Tensor:
        """Every target's value for every row: (B, n_targets) from outputs (B, n_outputs) and embeddings (B, D)."""
        return outputs @ self.output_weights.T + embedding @ self.embedding_weights.T


def _as_index(target: object) -> int | None:
    """An integer (Python, NumPy) as an index; None for anything else, booleans included."""
    if isinstance(target, bool):
        return None
    try:
        return operator.index(target)
    except TypeError:
        return None


def target_weights(targets: Sequence[Target], outputs: Tensor, embedding: Tensor) -> TargetWeights:
    """Resolve targets against a model's outputs (B, n_outputs) and head embedding (B, D) into linear functionals."""
    if len(targets) == 0:
        raise ValueError("targets is empty: give at least one output index, target name or concept vector")
    n_outputs, dim = outputs.shape[-1], embedding.shape[-1]
    output_weights = outputs.new_zeros((len(targets), n_outputs))
    embedding_weights = embedding.new_zeros((len(targets), dim))
    for t, target in enumerate(targets):
        if isinstance(target, Tensor):
            if target.shape != (dim,):
                raise ValueError(
                    f"target {t} is a tensor of shape {tuple(target.shape)}; a concept vector must have shape ({dim},)"
                )
            embedding_weights[t] = target.to(embedding_weights)
            continue
        index = target_index(target) if isinstance(target, str) else _as_index(target)
        if index is None or not 0 <= index < n_outputs:
            raise ValueError(f"target {t} ({target!r}) is not an output index in [0, {n_outputs})")
        output_weights[t, index] = 1.0
    return TargetWeights(output_weights, embedding_weights)


# --------------------------------------------------------------------------------------------------------------
# Method registry (timm style): name -> function(model, images, targets, **options) -> Explanation

ExplainFn = Callable[..., Explanation]
_METHODS: dict[str, ExplainFn] = {}


def register_method(name: str) -> Callable[[ExplainFn], ExplainFn]:
    """Decorator adding an explanation method to the registry under ``name``."""

    def add(fn: ExplainFn) -> ExplainFn:
        if name in _METHODS:
            raise ValueError(f"explanation method {name!r} is registered twice")
        _METHODS[name] = fn
        return fn

    return add


def list_methods() -> list[str]:
    """Names of the registered explanation methods."""
    return sorted(_METHODS)


def get_method(name: str) -> ExplainFn:
    """The function registered under ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown explanation method {name!r}; known: {', '.join(list_methods())}") from None


def explain(
    model: nn.Module, images: Tensor, targets: Sequence[Target], method: str = "cdam", **options: object
) -> Explanation:
    """Explain ``targets`` of a timm ViT on ``images`` (B, C, H, W) with ``method``; see ``list_methods()``.

    ``targets`` lists output indices, target names (``ctcdam.targets.TARGETS``) or concept vectors (D,).
    Methods and options: ``cdam``; ``smooth`` (samples=50, noise=0.05, seed=0); ``integrated`` (steps=50);
    the CDAM methods also take engine="auto"|"cls"|"general" and chunk_elements. Baselines: ``attention``,
    ``rollout``, ``token_ablation`` (batch_size), ``ig`` (steps=50), ``smoothgrad`` (samples=50, noise=0.15,
    seed), ``inputxgrad``, ``random`` (seed). The model runs in eval mode during the call; its train/eval
    flags, hooks and parameter gradients are as before afterwards.
    """
    fn = get_method(method)
    vit.check_vit(model)
    if isinstance(targets, (int, str)) or (isinstance(targets, Tensor) and targets.ndim < 2):
        raise TypeError("targets must be a list (of output indices, target names or concept vectors)")
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    reference = model.patch_embed.proj.weight
    images = images.to(device=reference.device, dtype=reference.dtype)
    with vit.eval_mode(model):
        return fn(model, images, list(targets), **options)


def concept_vector(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Mean head embedding (final-norm CLS embedding) of example images: a concept target, shape (D,)."""
    vit.check_vit(model)
    reference = model.patch_embed.proj.weight
    images = images.to(device=reference.device, dtype=reference.dtype)
    with vit.eval_mode(model), torch.no_grad():
        embeddings = [vit.cls_embedding(model, chunk) for chunk in images.split(batch_size)]
    return torch.cat(embeddings).mean(0)


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


#: Perturbed last-block inputs of a block of samples x images: (samples, images) -> (samples * images, n, D),
#: sample-major (every image of the first sample, then the next sample).
PerturbFn = Callable[[range, slice], Tensor]
#: Builds the PerturbFn of a batch from its unperturbed last-block input x (B, prefix + N, D).
Schedule = Callable[[Tensor], PerturbFn]


def _cdam_maps(
    model: VisionTransformer,
    images: Tensor,
    targets: Sequence[Target],
    method: str,
    n_samples: int,
    schedule: Schedule | None,
    engine: str,
    chunk_elements: int,
) -> Explanation:
    """Run ``blocks[:-1]`` once, then average the scores of ``n_samples`` perturbed copies of each image's x.

    Perturbed rows are built and scored in blocks of whole samples x all images (or, for a batch larger than a
    chunk, one sample x a slice of images): few large operators, each sample's noise drawn once for all images.
    ``schedule(x)`` gives the function that builds a block; None means the unperturbed x (one sample).
    """
    if schedule is None and n_samples != 1:
        raise ValueError("unperturbed CDAM has exactly one sample per image")
    if engine not in ("auto", "cls", "general"):
        raise ValueError(f"engine must be 'auto', 'cls' or 'general', got {engine!r}")
    reason = cls_path_unsupported(model)
    if engine == "cls" and reason is not None:
        raise ValueError(f"the CLS-row engine cannot explain this model: {reason}")
    use_cls_path = engine == "cls" or (engine == "auto" and reason is None)
    if not use_cls_path:
        _log.debug("%s: full last block (general engine): %s", method, reason or "asked for")
    with torch.no_grad():
        x = vit.last_block_input(model, images)
        if use_cls_path:
            outputs, embedding = _cls_path_outputs(model, x)
        else:
            outputs, embedding = vit.outputs_from_last_block_input(model, x)
    weights = target_weights(targets, outputs, embedding)
    score_fn = _cls_path_scores if use_cls_path else _general_scores
    batch, n_tokens, dim = x.shape
    copies = 1 if use_cls_path else len(weights)  # the general path repeats each row once per target
    chunk_rows = max(1, chunk_elements // (n_tokens * dim * copies))
    images_per_block = min(batch, chunk_rows)
    samples_per_block = max(1, chunk_rows // batch)
    perturb = schedule(x) if schedule is not None else None
    totals = x.new_zeros((batch, len(weights), n_tokens - vit.num_prefix_tokens(model)))
    for first_sample in range(0, n_samples, samples_per_block):
        samples = range(first_sample, min(first_sample + samples_per_block, n_samples))
        for first_image in range(0, batch, images_per_block):
            block = slice(first_image, min(first_image + images_per_block, batch))
            with torch.no_grad():
                rows = x[block] if perturb is None else perturb(samples, block)
            scores = score_fn(model, rows, weights)
            totals[block] += scores.view(len(samples), -1, *scores.shape[1:]).sum(0)
    grid = vit.grid_size(model, tuple(images.shape[-2:]))
    return Explanation(
        maps=(totals / n_samples).view(batch, len(weights), *grid),
        outputs=outputs.detach(),
        method=method,
        patch_size=vit.patch_size(model),
        image_size=tuple(images.shape[-2:]),
    )


class NoisePerSample:
    """Standard normal draws of one image's shape, one per sample index, shared by every image of a batch.

    Draw k is the k-th draw of a generator seeded with ``seed`` (None: the global RNG), so an image's noise,
    and hence its map, does not depend on the other images in the batch or on how rows are chunked; the
    reference draws the same sequence for each image. Samples must be asked for in order (the last block of
    draws may be asked for again).
    """

    def __init__(self, like: Tensor, seed: int | None) -> None:
        self._like = like
        self._generator = None if seed is None else torch.Generator(device=like.device).manual_seed(seed)
        self._last: tuple[range, Tensor] | None = None

    def __call__(self, samples: range) -> Tensor:
        """The draws of ``samples`` (consecutive indices), (len(samples), *like.shape[1:])."""
        if self._last is not None and self._last[0] == samples:
            return self._last[1]
        expected = self._last[0].stop if self._last is not None else 0
        if samples.start != expected or samples.step != 1:
            raise RuntimeError(f"noise draws {samples} asked for, but the next draw is {expected}; draws go in order")
        draws = self._like.new_empty((len(samples), *self._like.shape[1:]))
        for draw in draws:  # one generator call per draw, as the reference draws them
            draw.normal_(generator=self._generator)
        self._last = (samples, draws)
        return draws


@register_method("cdam")
def cdam(
    model: VisionTransformer,
    images: Tensor,
    targets: Sequence[Target],
    *,
    engine: str = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Explanation:
    """Vanilla CDAM: S_i = T_i . df/dT_i at the last block's norm1 output."""
    return _cdam_maps(model, images, targets, "cdam", 1, None, engine, chunk_elements)


@register_method("smooth")
def smooth_cdam(
    model: VisionTransformer,
    images: Tensor,
    targets: Sequence[Target],
    *,
    samples: int = 50,
    noise: float = 0.05,
    seed: int | None = 0,
    engine: str = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Explanation:
    """Smooth CDAM: mean CDAM over x + N(0, sigma^2), sigma = noise * (max x - min x) per image, ``samples`` draws."""
    if samples < 1:
        raise ValueError(f"smooth CDAM needs samples >= 1, got {samples}")

    def schedule(x: Tensor) -> PerturbFn:
        sigma = noise * (x.amax(dim=(1, 2)) - x.amin(dim=(1, 2)))
        draws = NoisePerSample(x, seed)

        def add_noise(samples: range, block: slice) -> Tensor:
            # x + sigma * draw for every (sample, image) pair of the block, in one fused operator.
            noisy = torch.addcmul(x[block], sigma[block, None, None], draws(samples)[:, None])
            return noisy.flatten(0, 1)

        return add_noise

    return _cdam_maps(model, images, targets, "smooth", samples, schedule, engine, chunk_elements)


@register_method("integrated")
def integrated_cdam(
    model: VisionTransformer,
    images: Tensor,
    targets: Sequence[Target],
    *,
    steps: int = 50,
    engine: str = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Explanation:
    """Integrated CDAM: mean CDAM over x scaled by alpha = k/steps, k = 1..steps-1 (zero baseline, as the reference)."""
    if steps < 2:
        raise ValueError(f"integrated CDAM needs steps >= 2 (it averages k = 1..steps-1), got {steps}")

    def schedule(x: Tensor) -> PerturbFn:
        def scale(samples: range, block: slice) -> Tensor:
            alphas = torch.arange(samples.start + 1, samples.stop + 1, device=x.device, dtype=x.dtype) / steps
            return (alphas[:, None, None, None] * x[block]).flatten(0, 1)

        return scale

    return _cdam_maps(model, images, targets, "integrated", steps - 1, schedule, engine, chunk_elements)
