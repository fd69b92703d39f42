"""The model-input transform: HU window -> [0, 1] -> 3 channels -> resize -> normalise; augmentation variants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctcdam.data.transforms import (
    DIHEDRAL_VARIANTS,
    InputConfig,
    SliceAugmentation,
    slice_transform,
    to_model_input,
)

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
CFG = InputConfig(img_size=32, window=(-1000.0, 400.0), mean=MEAN, std=STD)


def expected_value(hu: float, channel: int) -> float:
    unit = min(max((hu + 1000.0) / 1400.0, 0.0), 1.0)
    return (unit - MEAN[channel]) / STD[channel]


@pytest.mark.parametrize("hu", [-2000.0, -1000.0, -300.0, 400.0, 3000.0])
def test_window_replicate_and_normalise(hu):
    x = to_model_input(np.full((2, 16, 16), hu), CFG)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(x[:, c], torch.full((2, 32, 32), expected_value(hu, c)), atol=1e-5)


def test_resize_keeps_orientation():
    # bright top-left quadrant of a 16x16 slice must stay top-left (no transposition) at 32x32
    hu = np.full((16, 16), -1000.0)
    hu[:8, :4] = 400.0
    x = to_model_input(hu, CFG)[0, 0]
    bright = x > (expected_value(-1000, 0) + expected_value(400, 0)) / 2
    rows, cols = torch.nonzero(bright, as_tuple=True)
    assert rows.max() < 16 and cols.max() < 8 and rows.min() == 0 and cols.min() == 0


def test_mapping_config_and_single_slice_accepted():
    cfg = {"img_size": 24, "window": [-1000, 400], "mean": list(MEAN), "std": list(STD), "backbone": "ignored"}
    assert to_model_input(np.zeros((10, 12)), cfg).shape == (1, 3, 24, 24)


def test_nan_and_bad_shapes_are_rejected():
    bad = np.zeros((1, 8, 8))
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        to_model_input(bad, CFG)
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        to_model_input(np.zeros((1, 1, 8, 8)), CFG)
    with pytest.raises(KeyError, match="img_size"):
        to_model_input(np.zeros((1, 8, 8)), {"window": [-1000, 400], "mean": MEAN, "std": STD})
    with pytest.raises(ValueError, match="low < high"):
        InputConfig(img_size=32, window=(400.0, -1000.0))


@pytest.mark.parametrize("variant", range(len(DIHEDRAL_VARIANTS)))
def test_dihedral_variants_match_numpy_rotations_and_flips(variant):
    hu = np.random.default_rng(variant).normal(scale=500.0, size=(16, 16))
    k, flip = DIHEDRAL_VARIANTS[variant]
    reference = np.rot90(hu, k)
    reference = reference[:, ::-1] if flip else reference
    got = slice_transform(CFG, SliceAugmentation(variant=variant))(hu)
    assert torch.allclose(got, slice_transform(CFG)(np.ascontiguousarray(reference)), atol=1e-6)
    assert len(set(DIHEDRAL_VARIANTS)) == 8


def test_intensity_jitter_scales_and_shifts_the_unit_image():
    hu = np.full((16, 16), -300.0)  # 0.5 after the window
    got = slice_transform(CFG, SliceAugmentation(scale=1.1, shift=0.02))(hu)
    assert torch.allclose(got[0], torch.full((32, 32), (0.5 * 1.1 + 0.02 - MEAN[0]) / STD[0]), atol=1e-5)


@pytest.mark.parametrize("img_size", [32, 24, 224])
@pytest.mark.parametrize("shape", [(32, 32, 32), (5, 48, 40), (7, 20, 24), (3, 32, 17), (1, 64, 64), (2, 9, 300)])
def test_stack_equals_slice_by_slice(img_size, shape):
    # to_model_input runs one transform on the whole stack; it must give what slice_transform gives each slice, to
    # float32 rounding (the resize unchanged, antialiased when shrinking and upsampled when growing, on both axes or one)
    cfg = InputConfig(img_size=img_size, window=(-1000.0, 400.0), mean=MEAN, std=STD)
    hu = np.random.default_rng(sum(shape) + img_size).normal(-300.0, 700.0, size=shape).astype(np.float32)
    transform = slice_transform(cfg)
    expected = torch.stack([transform(s) for s in hu])
    got = to_model_input(hu, cfg)
    assert got.shape == expected.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_empty_stack_and_non_contiguous_views():
    assert to_model_input(np.zeros((0, 16, 16)), CFG).shape == (0, 3, 32, 32)
    volume = np.random.default_rng(3).normal(-300.0, 700.0, size=(16, 20, 24)).astype(np.float32)
    sagittal = np.moveaxis(volume, 2, 0)  # the view stacks explain makes are strided views of the crop
    transform = slice_transform(CFG)
    torch.testing.assert_close(to_model_input(sagittal, CFG), torch.stack([transform(s) for s in sagittal]),
                               rtol=1e-6, atol=1e-6)
