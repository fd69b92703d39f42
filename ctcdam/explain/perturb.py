"""Perturbation schedules and the one chunked average over samples, shared by CDAM and the gradient baselines.

A method that averages over perturbed copies of its inputs x (B, ...) (Smooth / Integrated CDAM on the last
block's input, SmoothGrad / IG on the image) builds rows sample-major: every image of sample 0, then every
image of sample 1, and so on. ``average_over_samples`` scores them in blocks of whole samples x all images
(or, for a batch larger than a chunk, one sample x a slice of images), so each sample's noise is drawn once
for all images and few large operators do the work.

The chunk unit of every method is ``chunk_elements``: rows x tokens x width of one pass.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: Rows x tokens x channels per pass with autograd (24 MB in float32): few, large operators, yet below glibc's
#: 32 MB mmap threshold, so blocks reuse heap memory instead of page-faulting fresh mappings every time.
DEFAULT_CHUNK_ELEMENTS = 6 * 2**20
#: Rows x tokens x channels per pass without autograd (no activations are kept for a backward).
FORWARD_CHUNK_ELEMENTS = 32 * 2**20

#: Builds the rows of a block: (samples, images) -> (len(samples) * len(images), ...), sample-major.
MakeRows = Callable[[range, slice], Tensor]


def rows_per_chunk(chunk_elements: int, elements_per_row: int) -> int:
    """Rows of ``elements_per_row`` (tokens x width, times copies) that fit ``chunk_elements``; at least one."""
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be at least 1, got {chunk_elements}")
    return max(1, chunk_elements // max(1, elements_per_row))


def average_over_samples(
    score_rows: Callable[[Tensor], Tensor], make_rows: MakeRows, *, n_samples: int, n_images: int, chunk_rows: int
) -> Tensor:
    """Mean over ``n_samples`` of ``score_rows(rows)`` per image: (n_images, ...).

    ``make_rows(samples, images)`` builds a block's rows (without autograd); ``score_rows`` maps R rows to R
    results and may use autograd. At most ``chunk_rows`` rows are built and scored at a time.
    """
    images_per_block = min(n_images, chunk_rows)
    samples_per_block = max(1, chunk_rows // n_images)
    totals: Tensor | None = None
    for first_sample in range(0, n_samples, samples_per_block):
        samples = range(first_sample, min(first_sample + samples_per_block, n_samples))
        for first_image in range(0, n_images, images_per_block):
            block = slice(first_image, min(first_image + images_per_block, n_images))
            with torch.no_grad():
                rows = make_rows(samples, block)
            scores = score_rows(rows)
            if totals is None:
                totals = scores.new_zeros((n_images, *scores.shape[1:]))
            totals[block] += scores.view(len(samples), -1, *scores.shape[1:]).sum(0)
    assert totals is not None, "n_samples and n_images must be positive"
    return totals / n_samples


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


def unperturbed(x: Tensor) -> MakeRows:
    """The rows of x itself (one sample)."""
    return lambda samples, block: x[block]


def gaussian_noise(x: Tensor, noise: float, seed: int | None) -> MakeRows:
    """Rows x_b + sigma_b * draw_k with sigma_b = noise * (max x_b - min x_b): Smooth CDAM's and SmoothGrad's."""
    dims = tuple(range(1, x.ndim))
    sigma = noise * (x.amax(dim=dims) - x.amin(dim=dims))
    per_image = (-1,) + (1,) * (x.ndim - 1)
    draws = NoisePerSample(x, seed)

    def make_rows(samples: range, block: slice) -> Tensor:
        # x + sigma * draw for every (sample, image) pair of the block, in one fused operator.
        return torch.addcmul(x[block], sigma[block].view(per_image), draws(samples)[:, None]).flatten(0, 1)

    return make_rows


def scaled_path(x: Tensor, steps: int) -> MakeRows:
    """Rows alpha_k * x_b with alpha_k = (k + 1) / steps: the path from a zero baseline (Integrated CDAM, IG)."""

    def make_rows(samples: range, block: slice) -> Tensor:
        alphas = torch.arange(samples.start + 1, samples.stop + 1, device=x.device, dtype=x.dtype) / steps
        return (alphas.view((-1,) + (1,) * x.ndim) * x[block]).flatten(0, 1)

    return make_rows
