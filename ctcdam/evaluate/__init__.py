"""ctcdam.evaluate: score the explanation methods on a checkpoint's test fold (tables, summary, plots).

``evaluate(EvaluationConfig(checkpoint=...))`` is what ``pipelines/evaluate.py`` calls. ``inputs`` reads the test
fold (central view slices, tokens inside the dilated consensus mask), ``run`` explains and scores every batch
with every method, ``summary`` and ``plots`` write the report; ``ground_truth`` and ``scan_space`` score maps against
painted cause masks (the known-cause benchmark), on the view slices and on the exported 3D maps in world space. The metric definitions live in the engine,
``ctcdam.explain.metrics``.
"""
from ctcdam.evaluate.run import (
    CLASS_COLUMNS,
    DEFAULT_METHODS,
    METRIC_COLUMNS,
    SANITY_COLUMNS,
    EvaluationConfig,
    default_run_name,
    evaluate,
)

__all__ = [
    "CLASS_COLUMNS",
    "DEFAULT_METHODS",
    "METRIC_COLUMNS",
    "SANITY_COLUMNS",
    "EvaluationConfig",
    "default_run_name",
    "evaluate",
]
