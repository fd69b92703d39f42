"""Reference CDAM written straight from the definition, in the style of the published code (the test oracle).

Like the authors' code (lenbrocki/CDAM and its packaged version): hooks on ``blocks[-1].norm1`` record the
tokens and, through a full backward hook, their gradient; vanilla CDAM backpropagates the whole network into
the input image; Smooth and Integrated CDAM hook the last block's input, then run the last block, final norm
and head once per perturbation with the perturbation as the autograd leaf; the score of each token is one
``torch.dot``. Everything runs one image, one target and one perturbation at a time. It is slow on purpose:
it is the oracle of the tests and the baseline of the benchmark, not a tool. Unlike the published code the
hooks are local and removed after each use, and parameter gradients are never accumulated.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctcdam.explain import vit
from ctcdam.explain.api import Explanation

#: A target of the oracle: an output index or a concept vector (D,).
Target = int | Tensor


def _target_value(model: nn.Module, features: Tensor, target: Target) -> Tensor:
    """Raw output ``target`` of the model, or the dot product of its head embedding with a concept vector."""
    if isinstance(target, Tensor):
        embedding = model.forward_head(features, pre_logits=True)[0]
        return torch.dot(embedding, target.to(embedding))
    return model.forward_head(features)[0, target]


class _TokenRecorder:
    """Forward and full backward hooks on a module that keep its last output and the gradient reaching it."""

    def __init__(self, module: nn.Module) -> None:
        self.tokens: Tensor | None = None
        self.grad: Tensor | None = None
        self._handles = [
            module.register_forward_hook(self._keep_output),
            module.register_full_backward_hook(self._keep_grad),
        ]

    def _keep_output(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.tokens = output.detach()

    def _keep_grad(self, module: nn.Module, grad_input: tuple[Tensor, ...], grad_output: tuple[Tensor, ...]) -> None:
        self.grad = grad_output[0].detach()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def scores(self, prefix: int) -> Tensor:
        """S_i = T_i . dT_i for the patch tokens of image 0, one dot product per token as in the published code."""
        assert self.tokens is not None and self.grad is not None, "the hooks did not fire"
        tokens, grads = self.tokens[0, prefix:], self.grad[0, prefix:]
        return torch.stack([torch.dot(tokens[i], grads[i]) for i in range(tokens.shape[0])])


def reference_cdam(model: nn.Module, image: Tensor, target: Target) -> Tensor:
    """Vanilla CDAM of one image (1, C, H, W) and one target: full forward, full backward into the image; (N,)."""
    recorder = _TokenRecorder(model.blocks[-1].norm1)
    try:
        image = image.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = _target_value(model, model.forward_features(image), target)
            torch.autograd.grad(value, image)
        return recorder.scores(vit.num_prefix_tokens(model))
    finally:
        recorder.remove()


def _last_block_input(model: nn.Module, image: Tensor) -> Tensor:
    """The last block's input, taken from a full forward by a forward hook (as the published code does)."""
    stored: list[Tensor] = []
    with vit.forward_hook(model.blocks[-1], lambda module, inputs, output: stored.append(inputs[0].detach())):
        with torch.no_grad():
            model(image)
    return stored[0]


def _truncated_scores(model: nn.Module, x: Tensor, perturbation: Tensor, target: Target) -> Tensor:
    """CDAM of the last block, final norm and head on x + perturbation (the perturbation is the autograd leaf)."""
    recorder = _TokenRecorder(model.blocks[-1].norm1)
    try:
        leaf = perturbation.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = _target_value(model, model.norm(model.blocks[-1](x + leaf)), target)
            torch.autograd.grad(value, leaf)
        return recorder.scores(vit.num_prefix_tokens(model))
    finally:
        recorder.remove()


def reference_smooth(
    model: nn.Module, image: Tensor, target: Target, samples: int, noise: float, generator: torch.Generator | None
) -> Tensor:
    """Smooth CDAM of one image and target: mean over ``samples`` draws of x + N(0, (noise * range x)^2); (N,)."""
    x = _last_block_input(model, image)
    sigma = noise * (x.max() - x.min())
    maps = []
    for _ in range(samples):
        draw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        maps.append(_truncated_scores(model, x, sigma * draw, target))
    return torch.stack(maps).mean(0)


def reference_integrated(model: nn.Module, image: Tensor, target: Target, steps: int) -> Tensor:
    """Integrated CDAM of one image and target: alpha = k/steps from a zero baseline, k = 0..steps-1, mean of k >= 1."""
    x = _last_block_input(model, image)
    baseline = torch.zeros_like(x)
    maps = []
    for k in range(steps):
        path_point = baseline + k / steps * (x - baseline)
        maps.append(_truncated_scores(model, path_point, torch.zeros_like(x), target))
    return torch.stack(maps[1:]).mean(0)


def reference_explain(
    model: nn.Module,
    images: Tensor,
    targets: Sequence[Target],
    method: str = "cdam",
    *,
    samples: int = 50,
    noise: float = 0.05,
    seed: int | None = 0,
    steps: int = 50,
) -> Explanation:
    """The oracle with ``explain``'s call shape: ``method`` is "cdam", "smooth" or "integrated".

    Smooth draws each image's noise, sample after sample, from a generator seeded with ``seed`` anew for each
    image and target, so every image and target sees the same sequence of draws (as one batched call does).
    """
    vit.check_vit(model)
    if method not in ("cdam", "smooth", "integrated"):
        raise ValueError(f"the reference implements 'cdam', 'smooth' and 'integrated', not {method!r}")
    reference = model.patch_embed.proj.weight
    images = images.to(device=reference.device, dtype=reference.dtype)
    grid = vit.grid_size(model, tuple(images.shape[-2:]))
    with vit.eval_mode(model):
        with torch.no_grad():
            outputs = model(images)
        scores = images.new_zeros((images.shape[0], len(targets), grid[0] * grid[1]))
        for t, target in enumerate(targets):
            for b in range(images.shape[0]):
                image = images[b : b + 1]
                generator = None if seed is None else torch.Generator(device=images.device).manual_seed(seed)
                if method == "cdam":
                    token_scores = reference_cdam(model, image, target)
                elif method == "smooth":
                    token_scores = reference_smooth(model, image, target, samples, noise, generator)
                else:
                    token_scores = reference_integrated(model, image, target, steps)
                scores[b, t] = token_scores
    return Explanation.from_tokens(model, images, scores, outputs, f"reference_{method}")
