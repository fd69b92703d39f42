"""``report.png``: per nodule the three centre slices, the CDAM maps of malignancy and of the biomarkers the model
finds most unusual for this nodule, and the predictions beside the radiologists' values."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no global backend state

from ctcdam.data.views import centre_index, view_axis, view_slice
from ctcdam.export.colors import DIVERGING_COLORMAP, nodule_color
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.targets import BIOMARKERS, MALIGNANCY, TARGETS, VIEWS

LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
PANEL_INCHES = 2.1


def relevant_maps(nodule: NoduleResult, n_biomarkers: int = 2) -> list[str]:
    """Maps to show: malignancy, the biomarkers with the largest |standardised output| (most unusual for this
    nodule), then concept maps."""
    names = nodule.map_names()
    biomarkers = [b for b in BIOMARKERS if b in names and b in nodule.model_outputs]
    biomarkers.sort(key=lambda b: -abs(float(nodule.model_outputs[b])))
    concepts = [n for n in names if n not in TARGETS]
    shown = ([MALIGNANCY] if MALIGNANCY in names else []) + biomarkers[:n_biomarkers] + concepts
    return shown or names[:1]


def _view_map(nodule: NoduleResult, name: str, view: str) -> np.ndarray | None:
    """The 2D centre-slice map of a view: the view map itself, else the centre slice of the 3D map."""
    if view in nodule.view_maps.get(name, {}):
        values = sitk.GetArrayFromImage(nodule.view_maps[name][view])
        return np.squeeze(values, axis=view_axis(view))
    if name in nodule.maps:
        values = sitk.GetArrayFromImage(nodule.maps[name])
        return view_slice(values, view, centre_index(values.shape, view))
    return None


def _heat_rgba(values: np.ndarray, limit: float) -> np.ndarray:
    """Diverging colours with opacity rising with |value| (as the Slicer table: near zero shows the CT)."""
    rgba = matplotlib.colormaps[DIVERGING_COLORMAP](Normalize(vmin=-limit, vmax=limit)(values))
    rgba[..., 3] = np.clip(2.0 * np.abs(values) / limit, 0.0, 0.85)
    return rgba


def _show(axis, image: np.ndarray, view: str, **kwargs) -> None:
    # axial (y, x): anterior up, patient right on the left; coronal/sagittal (z, .): superior up.
    axis.imshow(image, origin="upper" if view == "axial" else "lower", interpolation="nearest", **kwargs)
    axis.set_xticks([])
    axis.set_yticks([])


def _format(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.2f}"


def _prediction_table(nodule: NoduleResult) -> str:
    lines = [f"{'target':<13}{'model':>7}{'readers':>9}"]
    for target in TARGETS:
        if target in nodule.predictions:
            label = "p(malig.)" if target == MALIGNANCY else target
            lines.append(f"{label:<13}{_format(nodule.predictions[target]):>7}"
                         f"{_format(nodule.radiologists.get(target)):>9}")
    return "\n".join(lines)


def _nodule_rows(figure, grid, row: int, nodule: NoduleResult, shown: Sequence[str]) -> None:
    crop = sitk.GetArrayFromImage(nodule.crop).astype(np.float32)
    title = f"nodule {nodule.index}: {nodule.nodule_id}" + ("" if nodule.labelled else " (unlabelled)")
    for column, view in enumerate(VIEWS):
        axis = figure.add_subplot(grid[row, column])
        _show(axis, view_slice(crop, view, centre_index(crop.shape, view)), view, cmap="gray",
              vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1])
        axis.set_title(view, fontsize=8)
        if column == 0:
            axis.set_ylabel("CT", fontsize=7)
    text_axis = figure.add_subplot(grid[row:row + 1 + len(shown), len(VIEWS)])
    text_axis.axis("off")
    text_axis.text(0.0, 1.0, title, fontsize=8, va="top", weight="bold", color=nodule_color(nodule.index))
    note = f"\n\n{nodule.note}" if nodule.note else ""
    text_axis.text(0.0, 0.93, _prediction_table(nodule) + note, family="monospace", fontsize=7, va="top", wrap=True)
    for offset, name in enumerate(shown, start=1):
        maps = {view: _view_map(nodule, name, view) for view in VIEWS}
        limit = max((float(np.abs(m).max()) for m in maps.values() if m is not None), default=0.0) or 1e-12
        for column, view in enumerate(VIEWS):
            axis = figure.add_subplot(grid[row + offset, column])
            _show(axis, view_slice(crop, view, centre_index(crop.shape, view)), view, cmap="gray",
                  vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1])
            if maps[view] is not None:
                _show(axis, _heat_rgba(maps[view], limit), view)
            if column == 0:
                axis.set_ylabel(f"CDAM {name}", fontsize=7)
            if column == len(VIEWS) - 1:
                mappable = ScalarMappable(norm=Normalize(vmin=-limit, vmax=limit), cmap=DIVERGING_COLORMAP)
                figure.colorbar(mappable, ax=axis, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)


def write_report(scan: ScanResult, path: Path, n_biomarkers: int = 2) -> Path:
    """Draw the per-nodule report of an explained scan as a PNG (blue = counter-evidence, red = evidence)."""
    if not scan.nodules:
        raise ValueError(f"scan {scan.scan_id} has no explained nodules to report")
    shown = [relevant_maps(nodule, n_biomarkers) for nodule in scan.nodules]
    rows = sum(1 + len(s) for s in shown)
    figure = Figure(figsize=(PANEL_INCHES * (len(VIEWS) + 1.3), PANEL_INCHES * rows + 0.6), layout="constrained")
    grid = figure.add_gridspec(rows, len(VIEWS) + 1, width_ratios=[1.0] * len(VIEWS) + [1.3])
    row = 0
    for nodule, names in zip(scan.nodules, shown):
        _nodule_rows(figure, grid, row, nodule, names)
        row += 1 + len(names)
    figure.suptitle(f"{scan.scan_id}: CDAM ({scan.method}), red = evidence for, blue = against", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80, bbox_inches="tight")
    return path
