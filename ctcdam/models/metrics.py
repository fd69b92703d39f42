"""Test metrics from a predictions table: malignancy (AUROC, accuracy, sensitivity, specificity, diameter-only AUROC)
and per-biomarker RMSE/MAE in original units and Pearson r, each beside a predict-the-training-mean baseline."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_specificity,
    binary_recall,
)

from ctcdam.targets import BIOMARKERS


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _tensor(values: Any) -> torch.Tensor:
    return torch.tensor(np.array(values, dtype=np.float64))


def binary_metrics(score: Any, label: Any, threshold: float = 0.5) -> dict[str, Any]:
    """AUROC of `score` and accuracy/sensitivity/specificity of ``score >= threshold`` on rows with a 0/1 label."""
    score, label = np.asarray(score, dtype=float), np.asarray(label, dtype=float)
    keep = ~np.isnan(label)
    score, label = score[keep], label[keep].astype(int)
    n_pos, n_neg = int(label.sum()), int((1 - label).sum())
    out: dict[str, Any] = {"n": int(len(label)), "n_malignant": n_pos, "n_benign": n_neg}
    if n_pos == 0 or n_neg == 0:
        # AUROC is undefined with one class; say so instead of returning a misleading 0 or 0.5
        out.update(auroc=None, accuracy=None, sensitivity=None, specificity=None)
        if len(label):
            pred = (score >= threshold).astype(int)
            out["accuracy"] = float((pred == label).mean())
        return out
    s, y = _tensor(score), torch.as_tensor(label)
    out["auroc"] = _finite(binary_auroc(s, y))
    out["accuracy"] = _finite(binary_accuracy(s, y, threshold=threshold))
    out["sensitivity"] = _finite(binary_recall(s, y, threshold=threshold))
    out["specificity"] = _finite(binary_specificity(s, y, threshold=threshold))
    return out


def regression_metrics(pred: Any, true: Any, baseline: Any) -> dict[str, float | None]:
    """RMSE, MAE and Pearson r of predictions, with RMSE/MAE of predicting `baseline` (the training mean; scalar or per row)."""
    pred, true = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    err = pred - true
    base = baseline - true
    r = None
    if len(pred) > 1 and np.std(pred) > 0 and np.std(true) > 0:
        r = _finite(pearson_corrcoef(_tensor(pred), _tensor(true)))
    return {
        "rmse": _finite(np.sqrt(np.mean(err**2))) if len(err) else None,
        "mae": _finite(np.mean(np.abs(err))) if len(err) else None,
        "pearson_r": r,
        "baseline_rmse": _finite(np.sqrt(np.mean(base**2))) if len(base) else None,
        "baseline_mae": _finite(np.mean(np.abs(base))) if len(base) else None,
    }


def evaluation_metrics(predictions: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """The ``test`` block of metrics.json from a predictions table (see :func:`predictions_table`); also pools folds."""
    label = predictions["label"].to_numpy(dtype=float)
    malignancy = binary_metrics(predictions["probability"], label, threshold)
    diameter = binary_metrics(predictions["true_diameter"], label)
    out: dict[str, Any] = dict(malignancy)
    out["diameter_auroc"] = diameter["auroc"]
    out["n_nodules"] = int(len(predictions))
    out["biomarkers"] = {
        name: regression_metrics(predictions[f"pred_{name}"], predictions[f"true_{name}"], predictions[f"base_{name}"])
        for name in BIOMARKERS
    }
    return out


def predictions_table(
    nodule_ids: Sequence[str],
    label: Any,
    raw_outputs: Any,
    biomarkers_true: Any,
    biomarkers_pred: Any,
    train_mean: Sequence[float],
) -> pd.DataFrame:
    """One row per nodule: id, label, malignancy logit/probability, predicted, true and baseline (training-mean)
    biomarkers in original units."""
    raw = np.asarray(raw_outputs, dtype=float)
    table = {
        "nodule_id": list(nodule_ids),
        "label": np.asarray(label, dtype=float),
        "logit": raw[:, 0],
        "probability": 1.0 / (1.0 + np.exp(-raw[:, 0])),
    }
    pred, true = np.asarray(biomarkers_pred, dtype=float), np.asarray(biomarkers_true, dtype=float)
    for i, name in enumerate(BIOMARKERS):
        table[f"pred_{name}"] = pred[:, i]
        table[f"true_{name}"] = true[:, i]
        table[f"base_{name}"] = np.full(len(raw), float(train_mean[i]))
    return pd.DataFrame(table)
