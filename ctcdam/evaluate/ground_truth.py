"""Ground-truth scores on a benchmark whose causes are painted in (``ctcdam.synthetic.known_cause``).

Each target with a known cause names its evidence (raises the output when present) and counter-evidence
(lowers it): malignancy is raised by spicules and vetoed by calcification; spiculation is raised by the
spicules; the calcification rating (6 = absent, 1 = popcorn) is lowered by the calcified foci. The vessel is a
distractor: no target's cause. The scores themselves are defined in :mod:`ctcdam.explain.cause_metrics`
(``ground_truth_scores``); this module maps targets to causes, gives the controls their nodule size, and
stratifies the per-nodule scores by class and by diameter tertile.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ctcdam.evaluate.inputs import NoduleViews
from ctcdam.evaluate.summary import confidence_interval
from ctcdam.explain import cause_metrics, method_info
from ctcdam.targets import MALIGNANCY

#: target -> (evidence cause, counter-evidence cause); None where the target has none.
TARGET_CAUSES: dict[str, tuple[str | None, str | None]] = {
    MALIGNANCY: ("spicules", "calcification"),
    "spiculation": ("spicules", None),
    "calcification": (None, "calcification"),
}
GROUND_TRUTH_COLUMNS: tuple[str, ...] = cause_metrics.GROUND_TRUTH_COLUMNS


def has_causes(nodules: Sequence[NoduleViews]) -> bool:
    """Whether the nodules come with cause masks (the known-cause set)."""
    return any(n.causes for n in nodules)


def _stacked(nodules: Sequence[NoduleViews], cause: str | None, like: torch.Tensor) -> torch.Tensor | None:
    if cause is None or not all(cause in n.causes for n in nodules):
        return None
    return torch.cat([n.causes[cause] for n in nodules]).to(like.device)


def ground_truth_rows(
    maps: torch.Tensor, nodules: Sequence[NoduleViews], method: str, targets: Sequence[str]
) -> list[dict[str, float]]:
    """GROUND_TRUTH_COLUMNS per image and target (rows in the order nodule x view x target); NaN without a cause."""
    signed = method_info(method).signed
    n_images, n_targets = maps.shape[:2]
    values = {column: torch.full((n_images, n_targets), float("nan"), dtype=torch.float64) for column in GROUND_TRUTH_COLUMNS}
    for t, target in enumerate(targets):
        evidence_cause, counter_cause = TARGET_CAUSES.get(target, (None, None))
        evidence = _stacked(nodules, evidence_cause, maps)
        counter = _stacked(nodules, counter_cause, maps)
        if evidence is None and counter is None:
            continue
        causes = evidence if counter is None else counter if evidence is None else evidence | counter
        column_maps = maps[:, t : t + 1]
        if evidence is not None:
            values["evidence_share"][:, t] = cause_metrics.evidence_share(column_maps, evidence)[:, 0].double().cpu()
            values["evidence_lift"][:, t] = cause_metrics.evidence_lift(column_maps, evidence)[:, 0].double().cpu()
        if counter is not None:
            share = cause_metrics.counter_evidence_share(column_maps, counter, signed=signed)
            values["counter_evidence_share"][:, t] = share[:, 0].double().cpu()
        # Signed maps detect both causes by |S|; an unsigned map is non-negative already.
        values["cause_auroc"][:, t] = cause_metrics.cause_auroc(column_maps.abs(), causes)[:, 0].double().cpu()
    return [
        {column: float(values[column][b, t]) for column in GROUND_TRUTH_COLUMNS}
        for b in range(n_images) for t in range(n_targets)
    ]


def control_options(method: str, nodules: Sequence[NoduleViews], image_size: int) -> dict[str, torch.Tensor]:
    """The centred Gaussian's sigma per image: the nodule's radius in model-input pixels (other methods: none)."""
    if method != "centred_gaussian":
        return {}
    sigma = [
        (n.diameter_mm / 2) / n.pixel_mm * image_size / n.slices_hu.shape[-1] if np.isfinite(n.diameter_mm) else np.nan
        for n in nodules for _ in range(len(n.slices_hu))
    ]
    sigma = np.where(np.isfinite(sigma), sigma, image_size / 8)
    return {"sigma_px": torch.as_tensor(sigma, dtype=torch.float32)}


def diameter_tertiles(diameters: pd.Series) -> pd.Series:
    """'small' / 'medium' / 'large' by the tertiles of the evaluated nodules' diameters."""
    return pd.qcut(diameters.rank(method="first"), 3, labels=["small", "medium", "large"]).astype(str)


def stratified_table(metrics_frame: pd.DataFrame, nodule_info: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % interval over nodules of each ground-truth column, per method x target x stratum.

    Strata: all nodules, each malignancy class, each diameter tertile. ``nodule_info`` holds ``nodule_id``,
    ``label`` and ``diameter_mm``.
    """
    columns = [c for c in GROUND_TRUTH_COLUMNS if c in metrics_frame.columns]
    per_nodule = metrics_frame.groupby(["method", "target", "nodule_id"], sort=False)[columns].mean().reset_index()
    info = nodule_info.assign(tertile=diameter_tertiles(nodule_info["diameter_mm"]),
                              cls=nodule_info["label"].map({1.0: "malignant", 0.0: "benign"}).fillna("ambiguous"))
    per_nodule = per_nodule.merge(info[["nodule_id", "tertile", "cls"]], on="nodule_id", how="left")
    records = []
    strata: list[tuple[str, str, pd.Series | None]] = [("all", "all", None)]
    strata += [("class", value, per_nodule["cls"] == value) for value in ("malignant", "benign")]
    strata += [("diameter", value, per_nodule["tertile"] == value) for value in ("small", "medium", "large")]
    for kind, value, selection in strata:
        subset = per_nodule if selection is None else per_nodule[selection]
        for (method, target), group in subset.groupby(["method", "target"], sort=False):
            for column in columns:
                mean, low, high, n = confidence_interval(group[column])
                if n:
                    records.append({"method": method, "target": target, "stratum": kind, "value": value,
                                    "column": column, "mean": mean, "low": low, "high": high, "n": n})
    return pd.DataFrame(records, columns=["method", "target", "stratum", "value", "column", "mean", "low", "high", "n"])


def malignancy_summary(table: pd.DataFrame, methods: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """The benchmark's JSON per method: malignancy's ground-truth means over all test nodules (None: not expressible)."""
    overall = table[(table["stratum"] == "all") & (table["target"] == MALIGNANCY)]
    out: dict[str, dict[str, float | None]] = {}
    for method in methods:
        rows = overall[overall["method"] == method].set_index("column")["mean"]
        out[method] = {column: (float(rows[column]) if column in rows and np.isfinite(rows[column]) else None)
                       for column in GROUND_TRUTH_COLUMNS}
    return out


def nodule_frame(nodules: Sequence[NoduleViews]) -> pd.DataFrame:
    """nodule_id, label and diameter of the evaluated nodules (for the strata)."""
    return pd.DataFrame([{"nodule_id": n.nodule_id, "label": n.label, "diameter_mm": n.diameter_mm} for n in nodules])


def mapping_text(targets: Mapping[str, tuple[str | None, str | None]] = TARGET_CAUSES) -> str:
    """One line per target: its evidence and counter-evidence (for the summary)."""
    return "\n".join(f"- {t}: evidence {e or 'none'}, counter-evidence {c or 'none'}" for t, (e, c) in targets.items())
