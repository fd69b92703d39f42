"""The report of a bundle: ``report.png`` (overview of the scan) and ``nodule-<k>/report.png`` (one page per nodule).

Every page is drawn at 100 dpi and sized so that it reads at 100 % without scrolling sideways: the overview
holds one line per nodule (predictions beside the radiologists' values) and an axial thumbnail of each nodule
with its malignancy map; a nodule page shows the CT in three views with the nodule's outline, the maps of
malignancy and of the biomarkers the model finds most unusual for this nodule, and the full table of
predictions beside the radiologists' values. Maps are drawn with the Slicer scene's rule (``ctcdam.export.colors``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no global backend state

from ctcdam import io
from ctcdam.data.views import VIEWS, centre_index, view_axis, view_slice
from ctcdam.export.colors import FOREGROUND_OPACITY, TRANSPARENT_BAND, diverging_table, heat_rgba, nodule_color
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.targets import BIOMARKERS, MALIGNANCY, TARGETS

LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
DPI = 100
PANEL_INCHES = 2.6
TABLE_INCHES = 3.4
THUMBNAIL_COLUMNS = 4


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


def _mask_on_crop(nodule: NoduleResult) -> np.ndarray:
    """The consensus mask resampled onto the crop grid, (z, y, x) boolean (nearest neighbour keeps it binary)."""
    mask = sitk.Resample(nodule.consensus_mask, nodule.crop, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)
    return sitk.GetArrayFromImage(mask) > 0


def _panel(axis, rgb: np.ndarray, view: str) -> None:
    # axial (y, x): anterior up, patient right on the left; coronal/sagittal (z, .): superior up (as Slicer).
    axis.imshow(rgb, origin="upper" if view == "axial" else "lower", interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def _ct_rgb(crop: np.ndarray, view: str) -> np.ndarray:
    """The crop's centre slice of a view in the lung window, as RGB floats."""
    section = view_slice(crop, view, centre_index(crop.shape, view))
    grey = np.clip((section - LUNG_WINDOW_HU[0]) / (LUNG_WINDOW_HU[1] - LUNG_WINDOW_HU[0]), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def _with_map(rgb: np.ndarray, values: np.ndarray | None, limit: float) -> np.ndarray:
    """The CT with a map blended over it by the bundle's rule (one image per panel: cheap to draw)."""
    if values is None:
        return rgb
    heat = heat_rgba(values, limit, FOREGROUND_OPACITY)
    return rgb * (1.0 - heat[..., 3:]) + heat[..., :3] * heat[..., 3:]


def _outline(axis, mask: np.ndarray, view: str, color) -> None:
    section = view_slice(mask, view, centre_index(mask.shape, view)).astype(float)
    if section.any():
        axis.contour(section, levels=[0.5], colors=[color], linewidths=1.2,
                     origin="upper" if view == "axial" else "lower")


def _format(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{float(value):.2f}"


def _target_label(target: str) -> str:
    return "p(malignancy)" if target == MALIGNANCY else target


def prediction_table(nodule: NoduleResult) -> str:
    """The predictions beside the radiologists' values, as monospaced text."""
    lines = [f"{'target':<14}{'model':>7}{'readers':>9}"]
    for target in [t for t in TARGETS if t in nodule.predictions]:
        lines.append(f"{_target_label(target):<14}{_format(nodule.predictions[target]):>7}"
                     f"{_format(nodule.radiologists.get(target)):>9}")
    return "\n".join(lines)


def _colorbar(figure, axis, limit: float) -> None:
    table = diverging_table() / 255.0
    table[:, 3] = np.where(table[:, 3] > 0, 1.0, 0.0)
    table[table[:, 3] == 0, :3] = 1.0  # the transparent band shows as white on the bar
    mappable = ScalarMappable(norm=Normalize(vmin=-limit, vmax=limit), cmap=ListedColormap(table))
    figure.colorbar(mappable, cax=axis).ax.tick_params(labelsize=7)


def _save(figure: Figure, path: Path) -> Path:
    with io.atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png")
    return Path(path)


def nodule_page(scan: ScanResult, nodule: NoduleResult, path: Path, n_biomarkers: int = 2) -> Path:
    """One nodule's page: CT in three views with the outline, its most relevant maps, predictions vs readers."""
    shown = relevant_maps(nodule, n_biomarkers)
    crop = sitk.GetArrayFromImage(nodule.crop).astype(np.float32)
    outline, color = _mask_on_crop(nodule), nodule_color(nodule.index)
    rows, bar = 1 + len(shown), 0.12
    width = PANEL_INCHES * len(VIEWS) + bar + TABLE_INCHES + 0.9
    height = PANEL_INCHES * rows + 0.25 * rows + 0.7
    # A fixed grid (no layout engine: it costs more than the drawing): views, a colour-bar column, the table.
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(rows, len(VIEWS) + 2, width_ratios=[PANEL_INCHES] * len(VIEWS) + [bar, TABLE_INCHES],
                               left=0.35 / width, right=1 - 0.1 / width, top=1 - 0.6 / height, bottom=0.1 / height,
                               wspace=0.06, hspace=0.12)
    status = "" if nodule.in_training_population else " (unlabelled: not used in training)"
    figure.suptitle(f"{scan.scan_id} - nodule {nodule.index}: {nodule.nodule_id}{status}", fontsize=13,
                    weight="bold", y=1 - 0.15 / height, va="top")
    for column, view in enumerate(VIEWS):
        axis = figure.add_subplot(grid[0, column])
        _panel(axis, _ct_rgb(crop, view), view)
        _outline(axis, outline, view, color)
        axis.set_title(f"CT {view}", fontsize=10)
    for row, name in enumerate(shown, start=1):
        maps = {view: _view_map(nodule, name, view) for view in VIEWS}
        limit = max((float(np.abs(m).max()) for m in maps.values() if m is not None), default=0.0) or 1e-12
        for column, view in enumerate(VIEWS):
            axis = figure.add_subplot(grid[row, column])
            _panel(axis, _with_map(_ct_rgb(crop, view), maps[view], limit), view)
            if column == 0:
                axis.set_ylabel(f"CDAM {_target_label(name)}", fontsize=10)
        _colorbar(figure, figure.add_subplot(grid[row, len(VIEWS)]), limit)
    text_axis = figure.add_subplot(grid[:, len(VIEWS) + 1])
    text_axis.axis("off")
    legend = (f"red = evidence for the target,\nblue = counter-evidence;\n|map| < {TRANSPARENT_BAND:.0%} of its max"
              f" not drawn.\nOutline: consensus of the readers.\nMethod: {scan.method}")
    note = f"\n\n{nodule.note}" if nodule.note else ""
    text_axis.text(0.2, 1.0, prediction_table(nodule), family="monospace", fontsize=10, va="top")
    text_axis.text(0.2, 0.55, legend + note, fontsize=9, va="top", wrap=True)
    return _save(figure, path)


def overview_page(scan: ScanResult, path: Path, pages: Mapping[int, str] | None = None) -> Path:
    """The scan's overview: one line per nodule (model beside readers) and an axial thumbnail of each nodule."""
    nodules = scan.nodules
    # Many nodules: more, smaller thumbnails, so the page stays about one screen high.
    columns = min(THUMBNAIL_COLUMNS if len(nodules) <= 12 else 2 * THUMBNAIL_COLUMNS, len(nodules))
    panel = PANEL_INCHES if len(nodules) <= 12 else PANEL_INCHES * 0.6
    thumbnail_rows = math.ceil(len(nodules) / columns)
    table_inches = 0.3 + 0.165 * (len(nodules) + 2)
    width = max(panel * columns + 0.2, 9.0)
    height = 0.5 + table_inches + (panel + 0.3) * thumbnail_rows
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(1 + thumbnail_rows, columns, height_ratios=[table_inches] + [panel] * thumbnail_rows,
                               left=0.1 / width, right=1 - 0.1 / width, top=1 - 0.45 / height, bottom=0.05 / height,
                               wspace=0.05, hspace=0.3 / panel)
    figure.suptitle(f"{scan.scan_id}: {len(nodules)} nodule(s), CDAM ({scan.method}); red = evidence, "
                    f"blue = counter-evidence", fontsize=12, weight="bold", y=1 - 0.1 / height, va="top")
    header = f"{'nodule':<8}{'id':<22}{'p(malig.)':>10}{'readers':>9}{'diam. mm':>10}{'readers':>9}  page"
    lines = [header]
    for nodule in nodules:
        page = (pages or {}).get(nodule.index, "")
        lines.append(f"{nodule.index:<8}{nodule.nodule_id + ('' if nodule.in_training_population else ' *'):<22}"
                     f"{_format(nodule.predictions.get(MALIGNANCY)):>10}"
                     f"{_format(nodule.radiologists.get(MALIGNANCY)):>9}"
                     f"{_format(nodule.predictions.get('diameter')):>10}"
                     f"{_format(nodule.radiologists.get('diameter')):>9}  {page}")
    if any(not n.in_training_population for n in nodules):
        lines.append("* unlabelled: fewer readers than training requires")
    table_axis = figure.add_subplot(grid[0, :])
    table_axis.axis("off")
    table_axis.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=9, va="top")
    for k, nodule in enumerate(nodules):
        axis = figure.add_subplot(grid[1 + k // columns, k % columns])
        crop = sitk.GetArrayFromImage(nodule.crop).astype(np.float32)
        values = _view_map(nodule, MALIGNANCY, "axial")
        limit = float(np.abs(values).max()) or 1e-12 if values is not None else 1.0
        _panel(axis, _with_map(_ct_rgb(crop, "axial"), values, limit), "axial")
        _outline(axis, _mask_on_crop(nodule), "axial", nodule_color(nodule.index))
        axis.set_title(f"nodule {nodule.index}: p(malig.) {_format(nodule.predictions.get(MALIGNANCY))}"
                       f" (readers {_format(nodule.radiologists.get(MALIGNANCY))})",
                       fontsize=9 if panel == PANEL_INCHES else 7)
        for spine in axis.spines.values():  # the frame in the nodule's outline colour, as in Slicer
            spine.set_edgecolor(nodule_color(nodule.index))
            spine.set_linewidth(2.5)
    return _save(figure, path)


def write_report(scan: ScanResult, path: Path, nodule_pages: Mapping[int, Path] | None = None,
                 n_biomarkers: int = 2) -> list[Path]:
    """Write the overview to ``path`` and each nodule's page to ``nodule_pages[index]`` (when given)."""
    if not scan.nodules:
        raise ValueError(f"scan {scan.scan_id} has no explained nodules to report")
    pages = dict(nodule_pages or {})
    written = []
    for nodule in scan.nodules:
        if nodule.index in pages:
            written.append(nodule_page(scan, nodule, pages[nodule.index], n_biomarkers))
    relative = {index: _relative(page, Path(path).parent) for index, page in pages.items()}
    return [overview_page(scan, path, relative), *written]


def _relative(page: Path, root: Path) -> str:
    try:
        return str(Path(page).relative_to(root))
    except ValueError:
        return str(page)
