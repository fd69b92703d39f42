"""CDAM engine (ctcdam.explain.cdam) against the reference implementation written from the definition.

Models are tiny timm ViTs in float64 with random weights and random (non-zero) biases, so the equality with
the oracle is checked to 1e-5 relative (of the map's largest magnitude) without float32 rounding noise.
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from timm.models.vision_transformer import Attention
from timm.models.vision_transformer import VisionTransformer

from ctcdam.explain import Cdam, concept_vector, explain, get_method, list_methods, method_info, method_infos
from ctcdam.explain.cdam import cls_path_unsupported
from ctcdam.explain.reference import reference_explain
from ctcdam.explain.registry import MethodInfo, register_method
from ctcdam.targets import TARGETS, target_index
from tests.fixtures_explain import images_for, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5


def assert_close_maps(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Maps agree to ``rtol`` relative to the largest magnitude of the expected map."""
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0, "the expected map is all zeros; the comparison would be empty"
    error = (actual - expected).abs().max() / scale
    assert error <= rtol, f"relative error {error:.2e}"


MODELS = {
    "patch8-square": dict(img_size=32, patch_size=8),
    "patch16-nonsquare": dict(img_size=(32, 64), patch_size=16),
    "patch8-nonsquare-registers": dict(img_size=(24, 40), patch_size=8, reg_tokens=2),
    "layerscale-no-qkv-bias": dict(img_size=32, patch_size=8, init_values=0.3, qkv_bias=False),
}
METHODS = {
    "cdam": {},
    "integrated": dict(steps=5),
    "smooth": dict(samples=3, noise=0.1, seed=7),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("config", list(MODELS))
def test_fast_path_equals_reference(config: str, method: str) -> None:
    """Output and concept targets, on the CLS-row engine, equal the hook-based oracle (same noise draws for smooth)."""
    model = tiny_vit(**MODELS[config])
    assert cls_path_unsupported(model) is None
    images = images_for(model)
    targets = [0, 2, torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))]
    fast = explain(model, images, targets, method, **METHODS[method])
    oracle = reference_explain(model, images, targets, method, **METHODS[method])
    grid = model.patch_embed.grid_size
    assert fast.maps.shape == (2, 3, *grid)
    assert_close_maps(fast.maps, oracle.maps)
    torch.testing.assert_close(fast.outputs, oracle.outputs)


@pytest.mark.parametrize(
    "config",
    [
        dict(global_pool="avg"),
        dict(global_pool="avg", class_token=False),
        dict(reg_tokens=2, img_size=(24, 40)),
        dict(qk_norm=True),
    ],
    ids=["avg-pool", "avg-pool-no-cls", "registers-forced-general", "qk-norm"],
)
def test_general_path_equals_reference(config: dict) -> None:
    """Models the CLS-row engine does not take (or is told not to) give the oracle's maps through the full block."""
    model = tiny_vit(**config)
    images = images_for(model)
    forced = "reg_tokens" in config
    assert (cls_path_unsupported(model) is None) == forced
    for method, options in [("cdam", {}), ("smooth", dict(samples=2, noise=0.1, seed=1))]:
        fast = explain(model, images, [1, 2], method, engine="general" if forced else "auto", **options)
        oracle = reference_explain(model, images, [1, 2], method, **options)
        assert_close_maps(fast.maps, oracle.maps)


def test_scale_norm_and_output_gate_on_the_cls_row_equal_reference() -> None:
    """timm's optional attention-output norm and sigmoid gate act on the CLS row only; the fast path keeps them."""
    model = tiny_vit()
    try:
        attention = Attention(32, 2, qkv_bias=True, scale_norm=True, norm_layer=torch.nn.LayerNorm, gated=True)
    except TypeError:
        pytest.skip("this timm's Attention has no output gate")
    model.blocks[-1].attn = attention.double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    assert cls_path_unsupported(model) is None
    images = images_for(model)
    for method, options in METHODS.items():
        fast = explain(model, images, [0, 2], method, **options)
        assert_close_maps(fast.maps, reference_explain(model, images, [0, 2], method, **options).maps)


def test_dynamic_image_size_with_padding_equals_reference() -> None:
    """A model built for 32 px explains 36 x 20 px images (grid 5 x 3, last patches padded) like the oracle."""
    model = tiny_vit(dynamic_img_size=True, dynamic_img_pad=True)
    images = torch.randn(2, 3, 36, 20, dtype=torch.float64)
    fast = explain(model, images, [0, 1], "cdam")
    assert fast.maps.shape == (2, 2, 5, 3) and fast.upsample().shape == (2, 2, 36, 20)
    assert_close_maps(fast.maps, reference_explain(model, images, [0, 1], "cdam").maps)


def test_cls_engine_refuses_average_pooling() -> None:
    model = tiny_vit(global_pool="avg")
    with pytest.raises(ValueError, match="CLS-row engine"):
        explain(model, images_for(model), [0], "cdam", engine="cls")


def test_smooth_without_noise_is_vanilla() -> None:
    model = tiny_vit()
    images = images_for(model)
    vanilla = explain(model, images, [0, 1], "cdam")
    smooth = explain(model, images, [0, 1], "smooth", samples=3, noise=0.0)
    assert_close_maps(smooth.maps, vanilla.maps, rtol=1e-12)


def test_k_targets_in_one_call_equal_k_calls() -> None:
    model = tiny_vit(reg_tokens=1)
    images = images_for(model, batch=3)
    concept = torch.randn(32, dtype=torch.float64)
    targets = [2, concept, 0, "calcification"]
    names = TARGETS[:3]  # the tiny model's three outputs, named as the first three LIDC targets
    for method, options in METHODS.items():
        together = explain(model, images, targets, method, output_names=names, **options)
        for t, target in enumerate(targets):
            alone = explain(model, images, [target], method, output_names=names, **options)
            assert_close_maps(together.maps[:, t : t + 1], alone.maps, rtol=1e-12)


def test_smooth_map_of_an_image_does_not_depend_on_its_batch() -> None:
    """Each image draws the same seeded noise sequence, so its map is the same alone or in a batch."""
    model = tiny_vit()
    images = images_for(model, batch=3)
    together = explain(model, images, [0], "smooth", samples=4, seed=2).maps
    alone = explain(model, images[2:], [0], "smooth", samples=4, seed=2).maps
    assert_close_maps(alone, together[2:], rtol=1e-12)


def test_chunking_does_not_change_maps() -> None:
    """Perturbation rows split into many chunks give the same maps (and the same noise draws) as one chunk."""
    model = tiny_vit()
    images = images_for(model, batch=3)
    for method, options in METHODS.items():
        whole = explain(model, images, [0, 1], method, **options)
        pieces = explain(model, images, [0, 1], method, chunk_elements=1, **options)
        assert_close_maps(pieces.maps, whole.maps, rtol=1e-12)


def test_target_names_resolve_to_output_indices() -> None:
    model = tiny_vit()
    images = images_for(model)
    by_name = explain(model, images, ["malignancy", "calcification"], "cdam", output_names=TARGETS[:3])
    by_index = explain(model, images, [target_index("malignancy"), target_index("calcification")], "cdam")
    assert_close_maps(by_name.maps, by_index.maps, rtol=0)


def test_a_target_name_needs_output_names() -> None:
    """The engine knows no dataset: a name without the caller's output names is an error, never output 0."""
    model = tiny_vit()
    images = images_for(model)
    with pytest.raises(ValueError, match="engine takes output indices"):
        explain(model, images, ["malignancy"], "cdam")
    with pytest.raises(ValueError, match="output_names names 9 outputs, but the model has 3"):
        explain(model, images, ["malignancy"], "cdam", output_names=TARGETS)


def test_captum_style_class_equals_explain() -> None:
    """``Method(model).attribute(images, targets, ...)`` is what ``explain`` calls."""
    model = tiny_vit()
    images = images_for(model)
    direct = Cdam(model).attribute(images, [0, 2], engine="general")
    assert direct.method == "cdam"
    assert_close_maps(direct.maps, explain(model, images, [0, 2], "cdam", engine="general").maps, rtol=0)
    with pytest.raises(TypeError, match="samples"):
        explain(model, images, [0], "cdam", samples=3)  # an option of another method


def test_registry_metadata_matches_the_methods() -> None:
    """Each entry's options are its class's keyword options; the CDAM family is the token-space trio."""
    for info in method_infos():
        cls = get_method(info.name)
        keywords = [
            name for name, p in inspect.signature(cls.attribute).parameters.items() if p.kind is p.KEYWORD_ONLY
        ]
        assert tuple(keywords) == info.options, info.name
        assert ("chunk_elements" in keywords) == (info.chunk_unit is not None), info.name
    assert list_methods(family="cdam") == ["cdam", "integrated", "smooth"]
    assert {method_info(m).space for m in list_methods(family="cdam")} == {"token"}
    assert [m for m in list_methods() if method_info(m).space == "pixel"] == ["ig", "inputxgrad", "smoothgrad"]
    assert list_methods(family="control") == ["centred_gaussian", "random", "uniform"]


def test_registration_is_idempotent_and_survives_a_reload() -> None:
    before = [(info.name, info.entry) for info in method_infos()]
    register_method(method_info("cdam"))  # the same entry again: a no-op
    for name in ("ctcdam.explain.cdam", "ctcdam.explain.baselines", "ctcdam.explain"):
        importlib.reload(importlib.import_module(name))
    assert [(info.name, info.entry) for info in method_infos()] == before
    model = tiny_vit()
    assert explain(model, images_for(model), [0], "smooth", samples=2).maps.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodInfo("cdam", "elsewhere:Other", family="cdam", space="token", gradients=True,
                                   concept_targets=True, target_specific=True, signed=True, chunk_unit=None))


def test_concept_vector_is_mean_final_norm_cls_embedding() -> None:
    model = tiny_vit()
    images = images_for(model, batch=4)
    with torch.no_grad():
        expected = model.forward_features(images)[:, 0].mean(0)
    # 3 images of 17 tokens x width 32 per pass: the 4 images in two chunks
    torch.testing.assert_close(concept_vector(model, images, chunk_elements=3 * 17 * 32), expected)


def test_reinitialised_head_changes_maps() -> None:
    """Maps depend on the head: a freshly initialised head gives different maps for the same backbone."""
    model = tiny_vit()
    images = images_for(model)
    trained = explain(model, images, [0, 1, 2], "cdam").maps
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.5)
        torch.nn.init.normal_(model.head.bias, std=0.5)
    reinitialised = explain(model, images, [0, 1, 2], "cdam").maps
    for t in range(3):
        correlation = torch.corrcoef(torch.stack([trained[:, t].flatten(), reinitialised[:, t].flatten()]))[0, 1]
        assert correlation.abs() < 0.99


def one_token_reader(marked: int, grid: int = 4) -> VisionTransformer:
    """A 1-block ViT whose CLS query attends (almost) only to patch token ``marked``.

    Channel 0 of the tokens is a marker: the patch embedding never writes it, the position embedding writes
    100 there for patch ``marked`` only. The last attention's keys read channel 0 only (W_k = e_0 e_0^T) and its
    query is a constant (W_q = 0, b_q = 30 e_0), so the CLS attention logit is ~30/sqrt(16) * 5.6 ~ 42 for the
    marked token (LayerNorm turns 100 into ~sqrt(32) = 5.6) and ~0 for every other token: its softmax weight is
    ~1, the others ~e^-40. The head reads the CLS token, which then sees patch ``marked`` (through its value)
    and nothing else: the output is a function of that patch's pixels only. CDAM must put its largest
    magnitude there.
    """
    model = tiny_vit(img_size=grid * 8, depth=1)
    dim, head_dim = 32, 16
    with torch.no_grad():
        model.patch_embed.proj.weight[0] = 0.0
        model.patch_embed.proj.bias[0] = 0.0
        model.cls_token[..., 0] = 0.0
        model.pos_embed[..., 0] = 0.0
        model.pos_embed[0, 1 + marked, 0] = 100.0
        qkv = model.blocks[-1].attn.qkv
        qkv.weight[: 2 * dim] = 0.0
        qkv.bias[: 2 * dim] = 0.0
        for head in range(2):
            qkv.bias[head * head_dim] = 30.0  # query of each head: 30 e_0 (of the head's channels)
            qkv.weight[dim + head * head_dim, 0] = 1.0  # key of each head: channel 0 of the token
    return model


@pytest.mark.parametrize("marked", [5, 10])
def test_top_token_of_a_one_token_reader_is_that_token(marked: int) -> None:
    model = one_token_reader(marked)
    images = images_for(model, batch=3)
    # The construction holds: changing every other patch leaves the outputs unchanged.
    others = images.clone()
    row, col = divmod(marked, 4)
    patch = (slice(None), slice(None), slice(8 * row, 8 * row + 8), slice(8 * col, 8 * col + 8))
    others += torch.randn_like(others)
    others[patch] = images[patch]
    with torch.no_grad():
        torch.testing.assert_close(model(others), model(images), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(model(images[[1, 2, 0]]), model(images))
    for method in ("cdam", "integrated"):
        maps = explain(model, images, [0, 1, 2], method).maps.flatten(2)
        assert (maps.abs().argmax(-1) == marked).all(), method


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_calls_leave_no_trace_on_the_model() -> None:
    """Every method (and the oracle) leaves no hook, no parameter gradient, and each module's train flag as it was."""
    model = tiny_vit(reg_tokens=1)
    model.train()
    model.blocks[0].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    images = images_for(model, batch=1).float()  # explain() casts to the model's dtype
    options = {"smooth": {"samples": 2}, "integrated": {"steps": 3}, "ig": {"steps": 3}, "smoothgrad": {"samples": 2}}
    for method in list_methods():
        explain(model, images, [0, torch.randn(32, dtype=torch.float64)], method, **options.get(method, {}))
    explain(model, images, [0], "cdam", engine="general")
    reference_explain(model, images, [0], "smooth", samples=2)
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags


def test_eval_mode_is_used_inside_a_call() -> None:
    """Dropout would make maps random; a model left in train mode still gives the eval-mode maps."""
    model = tiny_vit(drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    images = images_for(model)
    expected = explain(model, images, [0], "cdam").maps
    model.train()
    assert_close_maps(explain(model, images, [0], "cdam").maps, expected, rtol=1e-12)


def test_upsampling_is_nearest_per_patch() -> None:
    model = tiny_vit(img_size=(24, 40))
    explanation = explain(model, images_for(model), [0, 1], "cdam")
    pixels = explanation.upsample()
    assert pixels.shape == (2, 2, 24, 40)
    torch.testing.assert_close(pixels[..., ::8, ::8], explanation.maps, rtol=0, atol=0)
    torch.testing.assert_close(pixels[..., 7::8, 7::8], explanation.maps, rtol=0, atol=0)
    assert explanation.upsample("bilinear").shape == (2, 2, 24, 40)


def test_bad_input_gives_clear_errors() -> None:
    model = tiny_vit()
    images = images_for(model)
    with pytest.raises(ValueError, match="unknown explanation method 'gradcam'"):
        explain(model, images, [0], "gradcam")
    with pytest.raises(ValueError, match=r"not an output index in \[0, 3\)"):
        explain(model, images, [3], "cdam")
    with pytest.raises(ValueError, match=r"concept vector must have shape \(32,\)"):
        explain(model, images, [torch.ones(5)], "cdam")
    with pytest.raises(ValueError, match="unknown target 'size'"):
        explain(model, images, ["size"], "cdam", output_names=TARGETS[:3])
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        explain(torch.nn.Linear(3, 3), images, [0], "cdam")
    with pytest.raises(ValueError, match="steps >= 2"):
        explain(model, images, [0], "integrated", steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_equal_the_reference_on_cuda() -> None:
    model = tiny_vit(reg_tokens=1).cuda()
    images = images_for(model).cuda()
    targets = [0, torch.randn(32, dtype=torch.float64, device="cuda")]
    for method, options in METHODS.items():
        fast = explain(model, images, targets, method, **options)
        assert fast.maps.device.type == "cuda"
        assert_close_maps(fast.maps, reference_explain(model, images, targets, method, **options).maps)
