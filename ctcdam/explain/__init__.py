"""ctcdam.explain: CDAM (vanilla, smooth, integrated, concept) and baselines for timm ViTs, one call shape.

``explain(model, images, targets, method="cdam", **options) -> Explanation``; ``list_methods()`` names the
registered methods. Importing the package registers the baselines.
"""
from ctcdam.explain import baselines as baselines  # noqa: F401  (registers the baseline methods)
from ctcdam.explain.cdam import (
    Explanation,
    Target,
    TargetWeights,
    concept_vector,
    explain,
    get_method,
    list_methods,
    register_method,
    target_weights,
)
from ctcdam.explain.vit import forward_without_tokens

__all__ = [
    "Explanation",
    "Target",
    "TargetWeights",
    "concept_vector",
    "explain",
    "forward_without_tokens",
    "get_method",
    "list_methods",
    "register_method",
    "target_weights",
]
