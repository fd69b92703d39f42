"""Training outputs besides the checkpoint: metrics.json, predictions.csv, ROC curve and training-curve PNGs (atomic writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: library code never switches the caller's backend
from sklearn.metrics import auc, roc_curve

from ctcdam import io


def _save_figure(fig: Figure, path: Path) -> Path:
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_roc(predictions: pd.DataFrame, path: str | Path, title: str = "test fold") -> Path:
    """ROC curves of the model's malignancy probability and of the diameter-only score on the labelled rows."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    labelled = predictions.dropna(subset=["label"])
    y = labelled["label"].to_numpy(dtype=int)
    if len(np.unique(y)) == 2:
        for column, name in (("probability", "model"), ("true_diameter", "diameter only")):
            fpr, tpr, _ = roc_curve(y, labelled[column].to_numpy(dtype=float))
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Malignancy ROC, {title} (n={len(y)})")
    ax.legend(loc="lower right")
    return _save_figure(fig, Path(path))


def plot_training_curves(metrics_csv: str | Path, path: str | Path) -> Path:
    """Per-epoch train/val loss and validation AUROC from Lightning's CSVLogger file."""
    log = pd.read_csv(metrics_csv)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
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
