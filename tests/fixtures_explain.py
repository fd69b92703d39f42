"""Shared pytest fixtures and builders (fixtures_explain): tiny seeded timm ViTs for the explanation tests.

``one_thread`` is not autouse: a test module that wants it says ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread, above all on a shared machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(
    img_size: int | tuple[int, int] = 32, patch_size: int = 8, seed: int = 0, **kwargs: object
) -> VisionTransformer:
    """A 2-block, width-32 ViT with 3 outputs in float64; every parameter gets noise so biases are non-zero."""
    torch.manual_seed(seed)
    options = dict(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    model = VisionTransformer(**(options | kwargs)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def images_for(model: VisionTransformer, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random images of the model's input size."""
    height, width = model.patch_embed.img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
