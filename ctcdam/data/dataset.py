"""Datasets of 2D view slices of nodule crops: a random view and near-central slice for training, all views for evaluation."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ctcdam.data.transforms import DIHEDRAL_VARIANTS, InputConfig, SliceAugmentation, slice_transform
from ctcdam.data.views import VIEWS, central_slices, centre_index, view_axis, view_slice


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: slice offset from the centre, 90-degree rotations, flips, intensity jitter."""

    slice_jitter: int = 2
    rotate: bool = True
    flip: bool = True
    intensity_jitter: float = 0.05

    def variants(self) -> tuple[int, ...]:
        """Indices into DIHEDRAL_VARIANTS that this configuration may draw."""
        return tuple(
            i for i, (k, flip) in enumerate(DIHEDRAL_VARIANTS) if (self.rotate or k == 0) and (self.flip or not flip)
        )


class NoduleTargets:
    """Per-row nodule id and targets: malignancy label (NaN = none), standardised and raw biomarkers."""

    def __init__(self, nodule_ids: Sequence[str], label: np.ndarray, biomarkers_z: np.ndarray, biomarkers: np.ndarray):
        self.nodule_ids = [str(n) for n in nodule_ids]
        self.label = torch.as_tensor(np.asarray(label, dtype=np.float32))
        self.biomarkers_z = torch.as_tensor(np.asarray(biomarkers_z, dtype=np.float32))
        self.biomarkers = torch.as_tensor(np.asarray(biomarkers, dtype=np.float32))
        if not len(self.nodule_ids) == len(self.label) == len(self.biomarkers_z) == len(self.biomarkers):
            raise ValueError("nodule ids, labels and biomarkers need one entry per row")

    def item(self, i: int) -> dict[str, torch.Tensor | str]:
        """The fields of row i as batch entries (the id travels with the batch, so outputs name their nodule)."""
        return {
            "nodule_id": self.nodule_ids[i],
            "label": self.label[i],
            "biomarkers_z": self.biomarkers_z[i],
            "biomarkers": self.biomarkers[i],
        }


class TrainSliceDataset(Dataset):
    """One random view and a slice within ``slice_jitter`` of the centre per item, augmented.

    Each item carries a ``cache_key`` identifying (crop, view, slice, dihedral variant) when it has no
    intensity jitter, else -1: items with equal keys are identical images, so a frozen backbone's
    embedding can be reused (head fine-tuning).
    """

    def __init__(
        self,
        crops: np.ndarray,
        targets: NoduleTargets,
        input_config: InputConfig,
        augment: AugmentConfig = AugmentConfig(),
        views: Sequence[str] = VIEWS,
    ):
        self.crops = crops
        self.targets = targets
        self.input_config = input_config
        self.augment = augment
        self.views = tuple(views)
        self.variants = augment.variants()
        shape = crops.shape[1:]
        for view in self.views:
            n, centre = shape[view_axis(view)], centre_index(shape, view)
            if centre - augment.slice_jitter < 0 or centre + augment.slice_jitter >= n:
                raise ValueError(f"slice_jitter {augment.slice_jitter} reaches outside the {n} {view} slices of the crops")

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def n_cache_keys(self) -> int:
        """Number of distinct (crop, view, slice, variant) images this dataset can produce."""
        return len(self) * len(self.views) * (2 * self.augment.slice_jitter + 1) * len(self.variants)

    def _draw(self) -> tuple[int, int, int, SliceAugmentation]:
        # torch's global generator: seeded by seed_everything, and per worker by Lightning's worker init
        view = int(torch.randint(len(self.views), ()))
        offset = int(torch.randint(2 * self.augment.slice_jitter + 1, ()))
        variant = int(torch.randint(len(self.variants), ()))
        jitter = self.augment.intensity_jitter
        scale, shift = 1.0, 0.0
        if jitter > 0:
            scale = 1.0 + jitter * float(2 * torch.rand(()) - 1)
            shift = jitter * float(2 * torch.rand(()) - 1)
        return view, offset, variant, SliceAugmentation(variant=self.variants[variant], scale=scale, shift=shift)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        view, offset, variant, aug = self._draw()
        name = self.views[view]
        index = centre_index(self.crops.shape[1:], name) - self.augment.slice_jitter + offset
        image = slice_transform(self.input_config, aug)(view_slice(self.crops[i], name, index))
        key = ((i * len(self.views) + view) * (2 * self.augment.slice_jitter + 1) + offset) * len(self.variants) + variant
        return {
            "image": image,
            "index": torch.tensor(i),
            "cache_key": torch.tensor(-1 if aug.has_jitter else key),
            **self.targets.item(i),
        }


class EvalViewsDataset(Dataset):
    """The central slice of every view of a crop, stacked: image (n_views, 3, H, W); test-time averages them."""

    def __init__(self, crops: np.ndarray, targets: NoduleTargets, input_config: InputConfig, views: Sequence[str] = VIEWS):
        self.crops = crops
        self.targets = targets
        self.views = tuple(views)
        self.transform = slice_transform(input_config)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        images = torch.stack([self.transform(s) for s in central_slices(self.crops[i], self.views)])
        return {
            "image": images,
            "index": torch.tensor(i),
            "cache_key": torch.arange(len(self.views)) + i * len(self.views),
            **self.targets.item(i),
        }
