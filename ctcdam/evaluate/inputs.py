"""Inputs of an evaluation: a checkpoint's test fold -> central view slices and the tokens inside each mask."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize

from ctcdam.data.geometry import dilate_mask
from ctcdam.data.transforms import InputConfig, to_model_input
from ctcdam.data.views import centre_index, view_slice
from ctcdam.explain import metrics
from ctcdam.manifest.schema import read_crop, read_manifest
from ctcdam.models.checkpoint import LoadedModel

log = logging.getLogger(__name__)

#: Air: the insertion baseline, in HU (the lower end of the lung window).
AIR_HU = -1000.0


#: Manifest columns naming a nodule's cause masks (the known-cause set): ``cause_<name>_path``.
CAUSE_PREFIX, CAUSE_SUFFIX = "cause_", "_path"


@dataclass(frozen=True)
class NoduleViews:
    """The central slice of each view of one test nodule, and which tokens of each lie inside its dilated mask."""

    scan_id: str
    nodule_id: str
    slices_hu: np.ndarray  #: (V, h, w)
    inside: torch.Tensor | None  #: (V, grid_h, grid_w) bool, None without a consensus mask
    #: Tokens inside each dilated cause mask (name -> (V, grid_h, grid_w)); empty outside the known-cause set.
    causes: dict[str, torch.Tensor] = field(default_factory=dict)
    label: float = float("nan")  #: malignancy label (NaN: ambiguous)
    diameter_mm: float = float("nan")
    pixel_mm: float = 1.0  #: crop voxel spacing in the view planes


def test_fold_rows(loaded: LoadedModel, max_nodules: int | None = None) -> pd.DataFrame:
    """Manifest rows of the checkpoint's test fold, in the checkpoint's order (at most ``max_nodules``)."""
    manifest = Path(loaded.data["manifest"])
    frame = read_manifest(manifest).set_index("nodule_id", drop=False)
    ids = [str(i) for i in loaded.data["test_ids"]]
    absent = [i for i in ids if i not in frame.index]
    if absent:
        raise ValueError(
            f"checkpoint {loaded.path} names test nodule {absent[0]!r} that manifest {manifest} lacks "
            f"({len(absent)} missing): the manifest changed after training"
        )
    rows = frame.loc[ids[: max_nodules or None]].reset_index(drop=True)
    rows["mask_file"] = [_mask_file(manifest.parent, row) for row in rows.to_dict("records")]
    for column in [c for c in rows.columns if c.startswith(CAUSE_PREFIX) and c.endswith(CAUSE_SUFFIX)]:
        rows[column] = [_mask_file(manifest.parent, {"mask_path": row[column]}) for row in rows.to_dict("records")]
    return rows


def _mask_file(root: Path, row: Mapping[str, Any]) -> str | None:
    """The row's mask path (relative paths are relative to the manifest's folder), None without one."""
    path = row.get("mask_path")
    if path is None or (isinstance(path, float) and np.isnan(path)) or not str(path).strip():
        return None
    return str(Path(path) if Path(path).is_absolute() else root / str(path))


def mask_tokens(
    mask_zyx: np.ndarray, spacing_zyx: Sequence[float], views: Sequence[str], input_config: InputConfig,
    grid: tuple[int, int], dilation_mm: float = 1.0,
) -> torch.Tensor:
    """Tokens inside the dilated mask (V, grid_h, grid_w) on each view's central slice, resized like the image."""
    dilated = dilate_mask(mask_zyx, spacing_zyx, dilation_mm).astype(np.float32)
    # The resize of ctcdam.data.transforms.slice_transform, so mask pixels land where the image's do. Bilinear on
    # purpose: a token's overlap is the share of its pixels inside, partial volume included (nearest would move
    # up to 0.18 of overlap per token for a 32 px crop on a 224 px input).
    size = (input_config.img_size, input_config.img_size)
    resize = Resize(spatial_size=size, mode="bilinear", align_corners=False, anti_aliasing=True)
    pixels = torch.stack([
        torch.as_tensor(resize(view_slice(dilated, v, centre_index(dilated.shape, v))[None]))[0] for v in views
    ])
    return metrics.tokens_inside(metrics.token_overlap(pixels.clamp(0, 1), grid))


def load_nodule(row: Mapping[str, Any], views: Sequence[str], input_config: InputConfig, grid: tuple[int, int],
                dilation_mm: float) -> NoduleViews:
    """Central view slices of one manifest row's crop and the tokens inside its dilated consensus mask."""
    crop, geometry = read_crop(row["image_file"])
    inside = None
    if row["mask_file"] is not None:
        mask, mask_geometry = read_crop(row["mask_file"])
        if mask_geometry.shape != geometry.shape or not np.allclose(mask_geometry.spacing_mm, geometry.spacing_mm):
            raise ValueError(
                f"mask {row['mask_file']} ({mask_geometry.shape} at {mask_geometry.spacing_mm} mm) does not match "
                f"its crop {row['image_file']} ({geometry.shape} at {geometry.spacing_mm} mm)"
            )
        inside = mask_tokens(mask, geometry.spacing_mm, views, input_config, grid, dilation_mm)
    causes = {}
    for column in [c for c in row if str(c).startswith(CAUSE_PREFIX) and str(c).endswith(CAUSE_SUFFIX)]:
        if row[column] is None:
            continue
        cause, _ = read_crop(row[column])
        name = column[len(CAUSE_PREFIX):-len(CAUSE_SUFFIX)]
        causes[name] = mask_tokens(cause, geometry.spacing_mm, views, input_config, grid, dilation_mm)
    slices = np.stack([view_slice(crop, v, centre_index(crop.shape, v)) for v in views]).astype(np.float32)
    return NoduleViews(str(row["scan_id"]), str(row["nodule_id"]), slices, inside, causes,
                       label=float(row.get("label", float("nan"))), diameter_mm=float(row.get("diameter_mm", float("nan"))),
                       pixel_mm=float(geometry.spacing_mm[-1]))


def load_nodules(rows: pd.DataFrame, views: Sequence[str], input_config: InputConfig, grid: tuple[int, int],
                 dilation_mm: float) -> tuple[list[NoduleViews], list[dict[str, str]]]:
    """Every loadable test nodule, and one failure row (logged) for each one that is not."""
    nodules, failures = [], []
    for row in rows.to_dict("records"):
        try:
            nodules.append(load_nodule(row, views, input_config, grid, dilation_mm))
        except (OSError, ValueError) as err:
            log.warning("skipping nodule %s: %s", row["nodule_id"], err)
            failures.append({"scan_id": row["scan_id"], "nodule_id": row["nodule_id"], "stage": "load", "reason": str(err)})
    return nodules, failures


def stack_inside(batch: Sequence[NoduleViews], grid: tuple[int, int]) -> torch.Tensor | None:
    """Inside-mask tokens of a batch (B, gh, gw); nodules without a mask get none (their localisation is NaN)."""
    if all(n.inside is None for n in batch):
        return None
    views = len(batch[0].slices_hu)
    return torch.cat([n.inside if n.inside is not None else torch.zeros(views, *grid, dtype=torch.bool) for n in batch])


def air_image(input_config: InputConfig, slice_shape: tuple[int, int]) -> torch.Tensor:
    """The model input (3, H, W) of a slice of air: the insertion baseline."""
    return to_model_input(np.full(slice_shape, AIR_HU, dtype=np.float32), input_config)[0]
