"""Backbone weights (local file, hub offline, none), fine-tuning modes, the embedding cache and the multi-task loss."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from ctcdam.models.backbone import WeightsUnavailableError, create_backbone, head_embedding, set_trainable
from ctcdam.models.feature_cache import EmbeddingCache
from ctcdam.models.losses import multitask_loss

NAME = "vit_tiny_patch16_224"
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A timm-format weight file (safetensors of a tiny headless ViT's state_dict) and its tensors."""
    source = timm.create_model(NAME, img_size=32, num_classes=0, **TINY)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors"
    safetensors.torch.save_file(state, str(path))
    return path, state


def test_local_weight_file_is_loaded_and_pos_embed_adapted(weight_file):
    path, state = weight_file
    same_size = create_backbone(NAME, str(path), 32, TINY)
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "norm.weight"):
        assert torch.equal(same_size.state_dict()[key], state[key]), key
    assert same_size.head.out_features == 9
    bigger = create_backbone(NAME, str(path), 48, TINY)  # 6x6 patches instead of 4x4: timm resamples pos_embed
    assert bigger.pos_embed.shape == (1, 37, 32)
    assert torch.equal(bigger.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])
    assert bigger(torch.zeros(1, 3, 48, 48)).shape == (1, 9)


def test_weight_file_that_does_not_fit_or_is_missing_is_named(weight_file, tmp_path):
    path, _ = weight_file
    with pytest.raises(WeightsUnavailableError, match="does not fit timm model"):
        create_backbone(NAME, str(path), 32, {**TINY, "embed_dim": 64})
    with pytest.raises(WeightsUnavailableError, match=r"missing\.safetensors' does not exist"):
        create_backbone(NAME, str(tmp_path / "missing.safetensors"), 32, TINY)


def test_hub_offline_without_cache_says_how_to_get_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("vit_small_patch8_224.dino", "hub", 32)
    message = str(info.value)
    assert "hf download timm/vit_small_patch8_224.dino" in message and "offline" in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing was downloaded or faked


def test_none_warns_that_the_backbone_is_untrained(caplog):
    with caplog.at_level(logging.WARNING, logger="ctcdam.models.backbone"):
        model = create_backbone(NAME, "none", 32, TINY)
    assert any("untrained" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 9)


def _trainable(model) -> set[str]:
    return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "") for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_modes_freeze_the_right_parameters():
    model = create_backbone(NAME, "none", 32, TINY)
    set_trainable(model, "head")
    assert _trainable(model) == {"head"}
    set_trainable(model, "last_n", last_n=1)
    assert _trainable(model) == {"head", "norm", "blocks.1"}
    set_trainable(model, "full")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="last_n must be in 1..2"):
        set_trainable(model, "last_n", last_n=3)
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'partial'"):
        set_trainable(model, "partial")  # type: ignore[arg-type]


def test_head_on_cached_embeddings_equals_the_full_forward():
    model = create_backbone(NAME, "none", 32, TINY).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.head(head_embedding(model, images)), model(images), atol=1e-6)


def test_embedding_cache_computes_each_key_once():
    calls: list[int] = []

    def compute(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.sum(dim=(1, 2, 3))[:, None].repeat(1, 2)

    cache = EmbeddingCache()
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    first = cache.embed(torch.tensor([0, 1, 2, -1]), images, compute)
    assert calls == [4] and torch.equal(first, compute(images))
    calls.clear()
    # keys 0 and 2 are cached (even with other pixels: the key is the identity); -1 is never cached
    second = cache.embed(torch.tensor([2, 0, 5, -1]), images * 0 + 1, compute)
    assert calls == [2]
    assert torch.equal(second[0], first[2]) and torch.equal(second[1], first[0])
    assert torch.equal(second[2:], torch.full((2, 2), 12.0))
    assert (cache.hits, cache.misses, len(cache)) == (2, 6, 4)


def test_multitask_loss_masks_missing_labels_and_switches_tasks_off():
    outputs = torch.tensor([[2.0] + [0.5] * 8, [-1.0] + [0.0] * 8, [3.0] + [1.0] * 8])
    label = torch.tensor([1.0, float("nan"), 0.0])
    z = torch.zeros(3, 8)
    total, parts = multitask_loss(outputs, label, z)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    huber = torch.nn.functional.huber_loss(outputs[:, 1:], z)
    assert torch.isfinite(total) and torch.allclose(parts["bce"], bce) and torch.allclose(total, bce + huber)
    only_bio, _ = multitask_loss(outputs, label, z, malignancy_weight=0.0)
    assert torch.allclose(only_bio, huber)
    only_malignancy, _ = multitask_loss(outputs, label, z, biomarker_weight=0.0)
    assert torch.allclose(only_malignancy, bce)
    none_labelled, parts = multitask_loss(outputs, torch.full((3,), float("nan")), z)
    assert parts["bce"] == 0 and torch.allclose(none_labelled, huber)
