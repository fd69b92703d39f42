"""The summary of an evaluation: per-nodule means, then mean and 95 % Student-t interval per method over nodules."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ctcdam.explain import list_methods, method_info
from ctcdam.explain.cause_metrics import GROUND_TRUTH_COLUMNS
from ctcdam.explain.metrics import SCORE_COLUMNS
from ctcdam.targets import MALIGNANCY

#: Whether a larger value of a summary column is better (the summary bolds the best method per column).
HIGHER_IS_BETTER: dict[str, bool] = {
    "correctness": True, "auc_mif": False, "auc_lif": True, "insertion_auc": True, "near_zero_share": True,
    "gini": True, "localisation": True, "pointing_hit": True, "seconds": False,
    "r_malignancy_biomarker": False, "r_biomarker_biomarker": False, "sanity_rho": False,
    "evidence_share": True, "evidence_lift": True, "counter_evidence_share": True, "cause_auroc": True,
}
#: Range of the bounded summary columns (their confidence intervals are clipped to it).
COLUMN_BOUNDS: dict[str, tuple[float, float]] = {
    "near_zero_share": (0.0, 1.0), "gini": (0.0, 1.0), "localisation": (0.0, 1.0), "pointing_hit": (0.0, 1.0),
    "r_malignancy_biomarker": (0.0, 1.0), "r_biomarker_biomarker": (0.0, 1.0), "sanity_rho": (0.0, 1.0),
    "spearman": (-1.0, 1.0), "seconds": (0.0, np.inf),
    "evidence_share": (0.0, 1.0), "counter_evidence_share": (0.0, 1.0), "cause_auroc": (0.0, 1.0),
    "evidence_lift": (0.0, np.inf),
}


def is_cdam(method: str) -> bool:
    """Whether ``method`` is a registered CDAM variant (paired differences compare each with every other method)."""
    return method in list_methods() and method_info(method).family == "cdam"


def is_control_method(method: str) -> bool:
    """Whether ``method`` is the registered control (it is never marked best)."""
    return method in list_methods() and method_info(method).family == "control"


def confidence_interval(
    values: Iterable[float], level: float = 0.95, bounds: tuple[float, float] = (-np.inf, np.inf)
) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of finite values: Student-t interval of the mean, clipped to the metric's ``bounds``.

    The bounds are NaN for n < 2.
    """
    data = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    n = len(data)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(data.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    sem = float(stats.sem(data))
    # scipy answers NaN for a zero scale; identical values have the zero-width interval.
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
    return mean, max(float(low), bounds[0]), min(float(high), bounds[1]), n


def wilson_interval(hits: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(rate, low, high) of ``hits`` out of ``n``: the Wilson score interval (NaN for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan"), float("nan")
    if not 0 <= hits <= n:
        raise ValueError(f"hits must lie in [0, n], got {hits} of {n}")
    z = float(stats.norm.ppf(0.5 + level / 2))
    rate = hits / n
    centre = (rate + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(rate * (1 - rate) / n + z**2 / (4 * n**2))
    return rate, max(0.0, float(centre - half)), min(1.0, float(centre + half))


def per_nodule(frame: pd.DataFrame, value_columns: Sequence[str]) -> pd.DataFrame:
    """Mean of each column per method and nodule (over views and targets): the unit the intervals are over."""
    return frame.groupby(["method", "nodule_id"], sort=False)[list(value_columns)].mean().reset_index()


def method_table(metrics_frame: pd.DataFrame, class_frame: pd.DataFrame, sanity_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method and summary column: mean, low, high, n over nodules (long format)."""
    truth = [c for c in GROUND_TRUTH_COLUMNS if c in metrics_frame.columns and metrics_frame[c].notna().any()]
    columns = [*SCORE_COLUMNS, *truth, "seconds"]
    parts = [per_nodule(metrics_frame, columns)]
    if not class_frame.empty:
        is_malignancy = class_frame["target_a"].eq(MALIGNANCY) | class_frame["target_b"].eq(MALIGNANCY)
        # |r|: a map that is another's negative points at the same tokens; it is not more target-specific.
        magnitude = class_frame["pearson"].abs()
        pairs = class_frame.assign(
            r_malignancy_biomarker=magnitude.where(is_malignancy), r_biomarker_biomarker=magnitude.where(~is_malignancy)
        )
        parts.append(per_nodule(pairs, ["r_malignancy_biomarker", "r_biomarker_biomarker"]))
    if not sanity_frame.empty:
        last = sanity_frame[sanity_frame["stage"] == sanity_frame["stage"].iloc[-1]]
        parts.append(per_nodule(last.assign(sanity_rho=last["spearman"].abs()), ["sanity_rho"]))
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part, on=["method", "nodule_id"], how="left")
    records = []
    for method, group in merged.groupby("method", sort=False):
        for column in [c for c in merged.columns if c not in ("method", "nodule_id")]:
            mean, low, high, n = confidence_interval(group[column], bounds=COLUMN_BOUNDS.get(column, (-np.inf, np.inf)))
            records.append({"method": method, "column": column, "mean": mean, "low": low, "high": high, "n": n})
    return pd.DataFrame(records, columns=["method", "column", "mean", "low", "high", "n"])


def paired_differences(
    metrics_frame: pd.DataFrame, columns: Sequence[str] = ("correctness", "insertion_auc", "localisation", "pointing_hit")
) -> pd.DataFrame:
    """Per-nodule paired difference (CDAM variant - other method) of each column: mean, low, high, n."""
    table = per_nodule(metrics_frame, list(columns))
    methods = list(dict.fromkeys(table["method"]))
    records = []
    for variant in [m for m in methods if is_cdam(m)]:
        for other in [m for m in methods if m != variant]:
            pair = table[table["method"] == variant].merge(
                table[table["method"] == other], on="nodule_id", suffixes=("", "_other")
            )
            for column in columns:
                mean, low, high, n = confidence_interval(pair[column] - pair[f"{column}_other"])
                records.append(
                    {"variant": variant, "other": other, "column": column, "mean": mean, "low": low, "high": high, "n": n}
                )
    return pd.DataFrame(records, columns=["variant", "other", "column", "mean", "low", "high", "n"])


def _cell(mean: float, low: float, high: float, bold: bool = False) -> str:
    """A table cell: the mean (bold when best) and its interval, or n/a."""
    if not np.isfinite(mean):
        return "n/a"
    value = f"**{mean:.3g}**" if bold else f"{mean:.3g}"
    return value if not np.isfinite(low) else f"{value} [{low:.3g}, {high:.3g}]"


def best_methods(table: pd.DataFrame, column: str) -> set[str]:
    """The methods with the best mean of ``column`` (higher or lower as the column wants), the control excluded."""
    is_control = table["method"].map(is_control_method).astype(bool)
    candidates = table[(table["column"] == column) & ~is_control & np.isfinite(table["mean"])]
    if candidates.empty or column not in HIGHER_IS_BETTER:
        return set()
    best = candidates["mean"].max() if HIGHER_IS_BETTER[column] else candidates["mean"].min()
    return set(candidates.loc[np.isclose(candidates["mean"], best, rtol=1e-9, atol=0), "method"])


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_markdown(metrics_frame: pd.DataFrame, class_frame: pd.DataFrame, sanity_frame: pd.DataFrame,
                     header: Mapping[str, Any]) -> str:
    """The summary report: settings, the per-method table, correctness per target, paired differences, sanity."""
    lines = ["# Evaluation summary", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        "Mean [95 % CI] over nodules (each nodule = mean over its views and targets; Student t). Best method per "
        "column in bold (`random` is the control and never bold). Definitions: docs/evaluation.md. Correctness, "
        "AUCs and insertion are in units of each target's scale; `r_*` = |Pearson r| between maps of different "
        "targets (lower = more target-specific); `sanity_rho` = |Spearman| between the map and the map after "
        "re-initialising the head and the last blocks (lower = the map depends on the model); `seconds` = cost per map.",
        "",
    ]
    table = method_table(metrics_frame, class_frame, sanity_frame)
    methods = list(dict.fromkeys(table["method"]))
    columns = list(dict.fromkeys(table["column"]))
    best = {column: best_methods(table, column) for column in columns}
    indexed = table.set_index(["method", "column"])
    lines += _markdown_table(
        ["method", *columns],
        ([method] + [_cell(*indexed.loc[(method, c), ["mean", "low", "high"]], bold=method in best[c]) for c in columns]
         for method in methods),
    )
    targets = list(dict.fromkeys(metrics_frame["target"]))
    lines += ["", "## Correctness per target", ""]
    by_target = []
    for method in methods:
        cells = [method]
        for target in targets:
            rows = metrics_frame[(metrics_frame["method"] == method) & (metrics_frame["target"] == target)]
            values = per_nodule(rows, ["correctness"])
            cells.append(_cell(*confidence_interval(values["correctness"])[:3]))
        by_target.append(cells)
    lines += _markdown_table(["method", *targets], by_target)
    differences = paired_differences(metrics_frame)
    if not differences.empty:
        lines += ["", "## Paired differences: CDAM variant minus other method (per nodule)", "",
                  "Bold: the 95 % CI excludes 0 in the variant's favour; *italic*: it excludes 0 against it.", ""]
        diff_columns = list(dict.fromkeys(differences["column"]))
        rows = []
        for (variant, other), group in differences.groupby(["variant", "other"], sort=False):
            cells = [f"{variant} - {other}"]
            for column in diff_columns:
                mean, low, high = group.set_index("column").loc[column, ["mean", "low", "high"]]
                favour = HIGHER_IS_BETTER.get(column, True)
                text = _cell(mean, low, high)
                if np.isfinite(low) and (low > 0 if favour else high < 0):
                    text = f"**{text}**"
                elif np.isfinite(low) and (high < 0 if favour else low > 0):
                    text = f"*{text}*"
                cells.append(text)
            rows.append(cells)
        lines += _markdown_table(["comparison", *diff_columns], rows)
    if not sanity_frame.empty:
        lines += ["", "## Sanity: Spearman rho between the map and the map of the re-initialised model", ""]
        stages = list(dict.fromkeys(sanity_frame["stage"]))
        rows = []
        for method in dict.fromkeys(sanity_frame["method"]):
            cells = [method]
            for stage in stages:
                part = sanity_frame[(sanity_frame["method"] == method) & (sanity_frame["stage"] == stage)]
                rho = per_nodule(part, ["spearman"])["spearman"]
                cells.append(_cell(*confidence_interval(rho, bounds=COLUMN_BOUNDS["spearman"])[:3]))
            rows.append(cells)
        lines += _markdown_table(["method", *stages], rows)
    return "\n".join(lines) + "\n"
