"""Targets from manifest rows: malignancy label (with mask) and the biomarker standardisation (fitted on training rows)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ctcdam.targets import BIOMARKERS


@dataclass(frozen=True)
class BiomarkerScaler:
    """Per-biomarker mean and standard deviation; z = (value - mean) / std, in ctcdam.targets.BIOMARKERS order."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    names: tuple[str, ...] = BIOMARKERS

    def __post_init__(self) -> None:
        if not len(self.mean) == len(self.std) == len(self.names):
            raise ValueError(f"scaler needs one mean and std per biomarker {self.names}, got {len(self.mean)}/{len(self.std)}")
        if any(not np.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"scaler standard deviations must be positive and finite, got {self.std}")

    @classmethod
    def fit(cls, values: ArrayLike, names: Sequence[str] = BIOMARKERS) -> BiomarkerScaler:
        """Fit on the (n, 8) biomarker values of the training rows only (a constant column gets std 1)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(names) or len(values) == 0:
            raise ValueError(f"need a non-empty (n, {len(names)}) array of training biomarkers, got shape {values.shape}")
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        # a biomarker that is constant on the training rows carries no scale; keep its values unscaled
        std = np.where(std > 1e-8, std, 1.0)
        return cls(mean=tuple(map(float, mean)), std=tuple(map(float, std)), names=tuple(names))

    def transform(self, values: ArrayLike) -> np.ndarray:
        """Original units -> standardised (z) values."""
        return (np.asarray(values, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.std)

    def inverse(self, z: ArrayLike) -> np.ndarray:
        """Standardised (z) values -> original units."""
        return np.asarray(z, dtype=np.float64) * np.asarray(self.std) + np.asarray(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form that travels inside a checkpoint."""
        return {"names": list(self.names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BiomarkerScaler:
        """Inverse of :meth:`to_dict` (KeyError naming the missing key)."""
        for key in ("names", "mean", "std"):
            if key not in data:
                raise KeyError(f"biomarker scaler lacks key {key!r}")
        return cls(mean=tuple(map(float, data["mean"])), std=tuple(map(float, data["std"])), names=tuple(data["names"]))
