"""ctcdam.explain: CDAM (vanilla, smooth, integrated, concept) and baselines for timm ViTs, one call shape.

The engine knows no dataset: it takes a timm VisionTransformer, images, and targets given as output indices
or concept vectors (names only with a caller-supplied ``output_names``). ``explain(model, images, targets,
method="cdam", **options) -> Explanation`` is the thin wrapper over ``Method(model).attribute(images,
targets, **options)``; ``list_methods()`` and ``method_info(name)`` describe the registered methods.

The built-in methods are registered below, explicitly. Their metadata needs no torch; the torch-backed names
(``explain``, ``Explanation``, the method classes, ...) are imported on first access, so a command line can
list the methods and check its arguments before torch and timm load (several seconds).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ctcdam.explain.registry import MethodInfo, get_method, list_methods, method_info, method_infos, register_method

if TYPE_CHECKING:
    from ctcdam.explain.api import (
        Attribution,
        Explanation,
        Target,
        TargetWeights,
        concept_vector,
        explain,
        target_weights,
    )
    from ctcdam.explain.baselines import (
        AttentionMap,
        AttentionRollout,
        InputXGradient,
        IntegratedGradients,
        RandomMap,
        SmoothGrad,
        TokenAblation,
    )
    from ctcdam.explain.cdam import Cdam, IntegratedCdam, SmoothCdam
    from ctcdam.explain.vit import forward_without_tokens
    from ctcdam.explain.controls import CentredGaussian, UniformMap
    from ctcdam.explain.lrp import PartialLrp
    from ctcdam.explain.relevance import RelevancePropagation

_CDAM = "ctcdam.explain.cdam"
_BASELINES = "ctcdam.explain.baselines"
_CDAM_TRAITS = dict(family="cdam", space="token", gradients=True, concept_targets=True, target_specific=True,
                    signed=True, chunk_unit="last_block_rows")
_INPUT_GRADIENT_TRAITS = dict(family="baseline", space="pixel", gradients=True, concept_targets=True,
                              target_specific=True, signed=True, chunk_unit="input_rows")
_TARGET_BLIND_TRAITS = dict(space="token", gradients=False, concept_targets=True, target_specific=False,
                            chunk_unit=None)

#: The built-in methods, in the order evaluations list them: the CDAM family, the baselines, the control.
BUILTIN_METHODS: tuple[MethodInfo, ...] = (
    MethodInfo("cdam", f"{_CDAM}:Cdam", **_CDAM_TRAITS, options=("engine", "chunk_elements")),
    MethodInfo("smooth", f"{_CDAM}:SmoothCdam", **_CDAM_TRAITS,
               options=("samples", "noise", "seed", "engine", "chunk_elements")),
    MethodInfo("integrated", f"{_CDAM}:IntegratedCdam", **_CDAM_TRAITS,
               options=("steps", "engine", "chunk_elements")),
    MethodInfo("attention", f"{_BASELINES}:AttentionMap", family="baseline", signed=False, **_TARGET_BLIND_TRAITS),
    MethodInfo("rollout", f"{_BASELINES}:AttentionRollout", family="baseline", signed=False, **_TARGET_BLIND_TRAITS),
    MethodInfo("token_ablation", f"{_BASELINES}:TokenAblation", family="baseline", space="token", gradients=False,
               concept_targets=True, target_specific=True, signed=True, chunk_unit="forward_rows",
               options=("chunk_elements",)),
    MethodInfo("ig", f"{_BASELINES}:IntegratedGradients", **_INPUT_GRADIENT_TRAITS,
               options=("steps", "chunk_elements")),
    MethodInfo("smoothgrad", f"{_BASELINES}:SmoothGrad", **_INPUT_GRADIENT_TRAITS,
               options=("samples", "noise", "seed", "chunk_elements")),
    MethodInfo("inputxgrad", f"{_BASELINES}:InputXGradient", **_INPUT_GRADIENT_TRAITS, options=("chunk_elements",)),
    MethodInfo("rp", "ctcdam.explain.relevance:RelevancePropagation", family="baseline", space="token", gradients=True,
               concept_targets=True, target_specific=True, signed=False, chunk_unit="input_rows",
               options=("chunk_elements",)),
    MethodInfo("partial_lrp", "ctcdam.explain.lrp:PartialLrp", family="baseline", space="token", gradients=False,
               concept_targets=True, target_specific=True, signed=False, chunk_unit="forward_rows",
               options=("chunk_elements",)),
    MethodInfo("uniform", "ctcdam.explain.controls:UniformMap", family="control", signed=False, **_TARGET_BLIND_TRAITS),
    MethodInfo("centred_gaussian", "ctcdam.explain.controls:CentredGaussian", family="control", signed=False,
               **_TARGET_BLIND_TRAITS, options=("sigma_px",)),
    MethodInfo("random", f"{_BASELINES}:RandomMap", family="control", signed=True, **_TARGET_BLIND_TRAITS,
               options=("seed",)),
)
for _info in BUILTIN_METHODS:
    register_method(_info)  # idempotent: a reload of this package registers the same entries again
del _info

#: Torch-backed names, imported on first access: name -> module.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("Attribution", "Explanation", "Target", "TargetWeights", "concept_vector", "explain", "target_weights"),
        "ctcdam.explain.api",
    ),
    **dict.fromkeys(("Cdam", "SmoothCdam", "IntegratedCdam"), _CDAM),
    **dict.fromkeys(
        ("AttentionMap", "AttentionRollout", "TokenAblation", "IntegratedGradients", "SmoothGrad", "InputXGradient",
         "RandomMap"),
        _BASELINES,
    ),
    "forward_without_tokens": "ctcdam.explain.vit",
    "RelevancePropagation": "ctcdam.explain.relevance",
    "PartialLrp": "ctcdam.explain.lrp",
    **dict.fromkeys(("UniformMap", "CentredGaussian"), "ctcdam.explain.controls"),
}


def __getattr__(name: str) -> Any:
    """Import a torch-backed name of the package on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The package's names, the lazily imported ones included."""
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BUILTIN_METHODS",
    "MethodInfo",
    "get_method",
    "list_methods",
    "method_info",
    "method_infos",
    "register_method",
    # imported on first access (see _LAZY)
    "AttentionMap",
    "AttentionRollout",
    "Attribution",
    "Cdam",
    "Explanation",
    "InputXGradient",
    "IntegratedCdam",
    "IntegratedGradients",
    "RandomMap",
    "RelevancePropagation",
    "PartialLrp",
    "UniformMap",
    "CentredGaussian",
    "SmoothCdam",
    "SmoothGrad",
    "Target",
    "TargetWeights",
    "TokenAblation",
    "concept_vector",
    "explain",
    "forward_without_tokens",
    "target_weights",
]
