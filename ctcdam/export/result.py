"""What one explained scan hands to the bundle writers: the CT, and per nodule predictions and CDAM maps.

Images are SimpleITK images, so their geometry travels with the values: the CT on the scanner's grid,
crops and maps on each nodule's axis-aligned crop grid, view maps as one-slice volumes on that grid.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk


@dataclass(frozen=True)
class NoduleResult:
    """One nodule of a scan: identity, predictions beside the radiologists' values, and its maps.

    ``predictions`` are in the radiologists' units (malignancy as a probability, biomarkers on their
    scales, diameter in mm); ``model_outputs`` are the raw outputs (malignancy logit, standardised
    biomarkers). ``maps`` holds 3D maps on the crop grid by map name (a target or a concept);
    ``view_maps[name][view]`` the centre-slice map of each view. ``causes`` (known-cause set only) holds the binary
    masks of the signs painted on the nodule by cause name (``spicules``, ``calcification``), on any grid: the
    bundle shows each as a segment on the CT's lattice (nearest neighbour; a mask already on it is copied).
    """

    index: int
    nodule_id: str
    centroid_lps: tuple[float, float, float]
    in_training_population: bool  # enough readers for training (the malignancy label may still be empty)
    predictions: Mapping[str, float]
    radiologists: Mapping[str, float | None]
    model_outputs: Mapping[str, float]
    crop: sitk.Image
    consensus_mask: sitk.Image
    maps: Mapping[str, sitk.Image] = field(default_factory=dict)
    view_maps: Mapping[str, Mapping[str, sitk.Image]] = field(default_factory=dict)
    note: str = ""
    causes: Mapping[str, sitk.Image] = field(default_factory=dict)

    def map_names(self) -> list[str]:
        """Names of every map of this nodule (3D or view), in first-seen order."""
        return list(dict.fromkeys([*self.maps, *self.view_maps]))


@dataclass(frozen=True)
class ScanResult:
    """An explained scan. ``note`` says why there are no nodules when there are none; ``details`` carries
    the run's settings and costs (targets, views, concept query and its example count, timings)."""

    scan_id: str
    checkpoint: str
    method: str
    ct: sitk.Image
    nodules: tuple[NoduleResult, ...] = ()
    note: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
