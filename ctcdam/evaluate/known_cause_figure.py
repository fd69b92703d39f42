"""The known-cause benchmark's picture: one test nodule carrying both signs, its cause masks and the malignancy maps."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch.nn.functional as F
from matplotlib.figure import Figure

from ctcdam import io
from ctcdam.data.transforms import to_model_input
from ctcdam.data.views import VIEWS, centre_index, view_slice
from ctcdam.explain import explain
from ctcdam.manifest.schema import read_crop, read_manifest
from ctcdam.models.checkpoint import load_for_inference
from ctcdam.targets import target_index

#: The maps shown beside the causes.
FIGURE_METHODS: tuple[str, ...] = ("cdam", "integrated", "ig", "rp", "centred_gaussian")
_CAUSE_COLOURS = {"spicules": "tab:red", "calcification": "tab:blue", "vessel": "tab:green"}


def _pick_nodule(frame: pd.DataFrame, test_ids: Sequence[str]) -> pd.Series:
    test = frame[frame["nodule_id"].isin(list(test_ids))]
    for wanted in (test["sign_spicules"] & test["sign_calcified"], test["sign_spicules"], test["sign_calcified"]):
        if wanted.astype(bool).any():
            return test[wanted.astype(bool)].iloc[0]
    return test.iloc[0]


def write_known_cause_figure(checkpoint: Path, manifest: Path, path: Path, methods: Sequence[str] = FIGURE_METHODS) -> Path:
    """One row per view: CT with the cause outlines, then each method's malignancy map over the CT."""
    loaded = load_for_inference(checkpoint)
    frame = read_manifest(manifest)
    row = _pick_nodule(frame, [str(i) for i in loaded.data["test_ids"]])
    crop, _ = read_crop(row["image_file"])
    causes = {name: read_crop(manifest.parent / row[f"cause_{name}_path"])[0] for name in _CAUSE_COLOURS}
    slices = np.stack([view_slice(crop, v, centre_index(crop.shape, v)) for v in VIEWS]).astype(np.float32)
    images = to_model_input(slices, loaded.input_config)
    size = images.shape[-2:]
    sigma = float(row["diameter_mm"]) / 2 * size[-1] / slices.shape[-1]
    maps = {}
    for method in methods:
        options = {"sigma_px": sigma} if method == "centred_gaussian" else {}
        token_maps = explain(loaded.model, images, [target_index("malignancy")], method=method, **options).maps[:, 0]
        maps[method] = F.interpolate(token_maps[:, None].double(), size=slices.shape[-2:], mode="nearest")[:, 0].numpy()
    figure = Figure(figsize=(2.2 * (len(methods) + 1), 2.4 * len(VIEWS)), dpi=100)
    axes = figure.subplots(len(VIEWS), len(methods) + 1, squeeze=False)
    for v, view in enumerate(VIEWS):
        ax = axes[v, 0]
        ax.imshow(slices[v], cmap="gray", vmin=-1000, vmax=400)
        for name, mask in causes.items():
            plane = view_slice(mask, view, centre_index(mask.shape, view))
            if plane.any():
                ax.contour(plane, levels=[0.5], colors=_CAUSE_COLOURS[name], linewidths=1.0)
        ax.set_ylabel(view, fontsize=8)
        for m, method in enumerate(methods, start=1):
            ax = axes[v, m]
            limit = float(np.abs(maps[method]).max()) or 1.0
            ax.imshow(slices[v], cmap="gray", vmin=-1000, vmax=400)
            ax.imshow(maps[method][v], cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.55)
            if v == 0:
                ax.set_title(method, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("causes: spicules (red), calcification (blue), vessel (green)", fontsize=6)
    figure.suptitle(f"{row['nodule_id']}: malignant={int(row['malignancy_label'])}, diameter {row['diameter_mm']:.1f} mm; "
                    "malignancy maps (red: evidence, blue: counter-evidence)", fontsize=8)
    with io.atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight")
    return Path(path)

