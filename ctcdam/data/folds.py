"""Cross-validation folds grouped by patient and stratified by malignancy, with a validation part from the training folds.

The reference code selects checkpoints on its test fold; here the validation part is carved out of the
training folds (again patient-grouped), so checkpoint selection never sees the test fold.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

log = logging.getLogger(__name__)

#: Stratum of nodules without a malignancy label (median 3): spread over folds like the two classes.
UNLABELLED_STRATUM = 2


@dataclass(frozen=True)
class FoldSplit:
    """Row indices (into the manifest frame) of one fold: train, validation and test parts."""

    fold: int
    n_folds: int
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def strata(labels: np.ndarray) -> np.ndarray:
    """Stratification classes: 0 benign, 1 malignant, 2 unlabelled (NaN)."""
    labels = np.asarray(labels, dtype=float)
    return np.where(np.isnan(labels), UNLABELLED_STRATUM, labels).astype(int)


def _group_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    if np.bincount(y).max() < n_splits:
        # no stratum can be spread over the folds (toy data): keep the grouping, drop the stratification
        log.warning("every malignancy stratum has fewer than %d rows: folds are grouped but not stratified", n_splits)
        splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]
    with warnings.catch_warnings():
        # small data sets have classes rarer than n_splits; the folds are still patient-grouped, which is what matters
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]


def patient_folds(labels: np.ndarray, patients: np.ndarray, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each of `n_folds` patient-grouped folds, stratified by malignancy (unlabelled as a stratum)."""
    patients = np.asarray(patients).astype(str)
    n_patients = len(np.unique(patients))
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if n_patients < n_folds:
        raise ValueError(f"{n_patients} patient(s) cannot fill {n_folds} folds: some folds would be empty; lower n_folds")
    folds = _group_kfold(strata(labels), patients, n_folds, seed)
    for k, test in enumerate(folds):
        if len(test) == 0:
            raise ValueError(f"fold {k} of {n_folds} is empty ({n_patients} patients); lower n_folds")
    return folds


def split_fold(
    frame: pd.DataFrame,
    fold: int,
    n_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    group_by: str = "patient_id",
) -> FoldSplit:
    """Train/val/test row indices of `fold`: test = that fold, val = a patient-grouped part of the other folds.

    `group_by` names the manifest column that keeps rows together (patient_id; anything else leaks between
    nodules of one patient and is only meant for toy data with too few patients).
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1} (or 'all'), got {fold}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    labels = frame["label"].to_numpy(dtype=float)
    if group_by not in frame.columns:
        raise ValueError(f"cannot group folds by {group_by!r}: the manifest has no such column")
    patients = frame[group_by].astype(str).to_numpy()
    test = np.sort(patient_folds(labels, patients, n_folds, seed)[fold])
    rest = np.setdiff1d(np.arange(len(frame)), test)
    n_inner = max(2, round(1.0 / val_fraction))
    if len(np.unique(patients[rest])) < n_inner:
        raise ValueError(
            f"fold {fold}: the {len(np.unique(patients[rest]))} training patient(s) cannot give a patient-grouped "
            f"validation part (need {n_inner}); add data or raise val_fraction"
        )
    val = np.sort(rest[_group_kfold(strata(labels[rest]), patients[rest], n_inner, seed)[0]])
    train = np.setdiff1d(rest, val)
    for name, part in (("training", train), ("validation", val), ("test", test)):
        if len(part) == 0:
            raise ValueError(f"fold {fold} of {n_folds} has an empty {name} part")
    return FoldSplit(fold=fold, n_folds=n_folds, seed=seed, train=train, val=val, test=test)
