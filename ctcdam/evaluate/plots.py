"""The plots of an evaluation, drawn on ``matplotlib.figure.Figure`` (no pyplot, no backend switch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ctcdam.evaluate.summary import is_cdam, is_control_method
from ctcdam.io import atomic_file


def plot_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Mean MIF, LIF and insertion curves per method (one panel each)."""
    figure = Figure(figsize=(13, 4), layout="constrained")
    titles = {
        "mif": "deletion, most important first", "lif": "deletion, least important first", "insertion": "insertion into air"
    }
    for axis, (kind, title) in zip(figure.subplots(1, 3), titles.items()):
        for method, group in curves[curves["curve"] == kind].groupby("method", sort=False):
            style = "--" if is_control_method(method) else ("-" if is_cdam(method) else ":")
            axis.plot(group["share"], group["mean"], style, label=method)
        axis.set(title=title, xlabel="share of tokens " + ("pasted" if kind == "insertion" else "removed"),
                 ylabel="output change / target scale")
        axis.axhline(0, color="grey", linewidth=0.5)
    figure.axes[0].legend(fontsize=7)
    return _save_figure(figure, path)


def plot_metric_bars(table: pd.DataFrame, path: Path) -> Path:
    """Bars with 95 % confidence intervals per method, one panel per summary column."""
    columns = [c for c in dict.fromkeys(table["column"]) if c != "seconds"]
    if not columns:
        figure = Figure(figsize=(4, 2))
        figure.text(0.5, 0.5, "no results (see failures.csv)", ha="center")
        return _save_figure(figure, path)
    n_cols = 4
    figure = Figure(figsize=(4 * n_cols, 3.2 * ((len(columns) + n_cols - 1) // n_cols)), layout="constrained")
    axes = figure.subplots((len(columns) + n_cols - 1) // n_cols, n_cols, squeeze=False).ravel()
    for axis, column in zip(axes, columns):
        part = table[table["column"] == column]
        errors = np.stack([part["mean"] - part["low"], part["high"] - part["mean"]]).clip(min=0)
        colours = [
            "tab:orange" if is_cdam(m) else "tab:grey" if is_control_method(m) else "tab:blue" for m in part["method"]
        ]
        axis.bar(part["method"], part["mean"], yerr=np.nan_to_num(errors), color=colours, capsize=2)
        axis.set_title(column)
        axis.tick_params(axis="x", rotation=60, labelsize=7)
    for axis in axes[len(columns):]:
        axis.set_visible(False)
    return _save_figure(figure, path)


def _save_figure(figure: Figure, path: Path) -> Path:
    """Write the figure as PNG, atomically."""
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    return path
