"""Training outputs besides the checkpoint: metrics.json, predictions.csv, ROC curve and training-curve PNGs (atomic writes)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON (NaN/inf as null) to a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_csv_atomic(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a CSV to a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _save_figure(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_roc(predictions: pd.DataFrame, path: str | Path, title: str = "test fold") -> Path:
    """ROC curves of the model's malignancy probability and of the diameter-only score on the labelled rows."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    labelled = predictions.dropna(subset=["label"])
    y = labelled["label"].to_numpy(dtype=int)
    if len(np.unique(y)) == 2:
        for column, name in (("probability", "model"), ("true_diameter", "diameter only")):
            fpr, tpr, _ = roc_curve(y, labelled[column].to_numpy(dtype=float))
            auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Malignancy ROC, {title} (n={len(y)})")
    ax.legend(loc="lower right")
    return _save_figure(fig, Path(path))


def plot_training_curves(metrics_csv: str | Path, path: str | Path) -> Path:
    """Per-epoch train/val loss and validation AUROC from Lightning's CSVLogger file."""
    log = pd.read_csv(metrics_csv)
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in ("train/loss", "val/loss"):
        if column in log and "epoch" in log:
            series = log[["epoch", column]].dropna().groupby("epoch")[column].last()
            ax.plot(series.index, series.to_numpy(), marker=".", label=column)
    ax.set(xlabel="epoch", ylabel="loss")
    if "val/auroc" in log and "epoch" in log:
        series = log[["epoch", "val/auroc"]].dropna().groupby("epoch")["val/auroc"].last()
        twin = ax.twinx()
        twin.plot(series.index, series.to_numpy(), color="tab:green", marker=".", label="val/auroc")
        twin.set(ylabel="validation AUROC", ylim=(0, 1))
        twin.legend(loc="lower left")
    ax.legend(loc="upper right")
    ax.set_title("training curves")
    return _save_figure(fig, Path(path))
