"""The report of a bundle: ``report.png`` (overview of the scan) and ``nodule-<k>/report.png`` (one page per nodule).

Every page is sized so that it reads at 100 % without scrolling sideways: the overview holds one line per nodule
(predictions beside the radiologists' values) and an axial thumbnail of each nodule with its malignancy map; a
nodule page shows the CT in three views with the nodule's outline, the maps of malignancy and of the biomarkers
the model finds most unusual for this nodule, and the full table of predictions beside the radiologists' values.
Maps are drawn with the Slicer scene's rule (``ctcdam.export.colors``).

A page is composed as one raster (numpy panels, Pillow text in matplotlib's DejaVu fonts) and saved once: a
matplotlib figure with an axes per panel cost about 0.35 s per page, more than every NIfTI file of the bundle.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ctcdam import io
from ctcdam.data.views import VIEWS, centre_index, view_axis, view_slice
from ctcdam.export.colors import FOREGROUND_OPACITY, TRANSPARENT_BAND, heat_rgba, nodule_color
from ctcdam.export.result import NoduleResult, ScanResult
from ctcdam.targets import BIOMARKERS, MALIGNANCY, TARGETS

LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500
#: Edge of a nodule page's panels and of the overview's thumbnails (pixels; many nodules: smaller thumbnails).
PANEL_PX = 256
SMALL_PANEL_PX = 160
THUMBNAIL_COLUMNS = 4
#: zlib level of the PNG pages: flat panels and text compress well at 3, at a fraction of the default's time.
PNG_COMPRESS_LEVEL = 3
_GAP = 8
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_FONTS = {"regular": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "mono": "DejaVuSansMono.ttf"}


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


def _font(kind: str, size: int):
    """A DejaVu font of matplotlib's own data folder (no font search, the same glyphs on every machine)."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _FONTS[kind]), size)


def _display_rows(section: np.ndarray, view: str) -> np.ndarray:
    # axial (y, x): anterior up, patient right on the left; coronal/sagittal (z, .): superior up (as Slicer).
    return section if view == "axial" else section[::-1]


def _upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour enlargement of a (h, w[, c]) section to about ``size`` pixels along its longer side."""
    factor = max(1, size // max(image.shape[:2]))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _ct_rgb(crop: np.ndarray, view: str) -> np.ndarray:
    """The crop's centre slice of a view in the lung window, as RGB floats."""
    section = view_slice(crop, view, centre_index(crop.shape, view))
    grey = np.clip((section - LUNG_WINDOW_HU[0]) / (LUNG_WINDOW_HU[1] - LUNG_WINDOW_HU[0]), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def _with_map(rgb: np.ndarray, values: np.ndarray | None, limit: float) -> np.ndarray:
    """The CT with a map blended over it by the bundle's rule."""
    if values is None:
        return rgb
    heat = heat_rgba(values, limit, FOREGROUND_OPACITY)
    return rgb * (1.0 - heat[..., 3:]) + heat[..., :3] * heat[..., 3:]


def _panel(rgb: np.ndarray, view: str, size: int, outline: np.ndarray | None = None, color=None) -> np.ndarray:
    """One panel as uint8 RGB: the section in display orientation, enlarged, with the outline drawn 2 px wide
    just inside the mask's boundary (so the nodule's inside shows the map)."""
    image = _upscale(_display_rows(rgb, view), size)
    if outline is not None and outline.any():
        mask = _upscale(_display_rows(outline, view), size)
        ring = mask & ~ndimage.binary_erosion(mask, iterations=2)
        image = image.copy()
        image[ring] = color
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _outline_section(mask: np.ndarray, view: str) -> np.ndarray:
    return view_slice(mask, view, centre_index(mask.shape, view)).astype(bool)


def _colorbar(height: int, limit: float, width: int = 14) -> np.ndarray:
    """A vertical bar from +limit (top) to -limit (bottom) in the bundle's colours; the transparent band is white."""
    values = np.linspace(limit, -limit, height)
    heat = heat_rgba(values, limit, 1.0)
    rgb = np.where(heat[:, 3:] > 0, heat[:, :3], 1.0)
    return np.round(np.repeat(rgb[:, None, :], width, axis=1) * 255).astype(np.uint8)


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


def _wrapped(text: str, width: int) -> str:
    """Text broken into lines of at most ``width`` characters (existing line breaks kept)."""
    import textwrap

    return "\n".join(line for paragraph in text.split("\n") for line in (textwrap.wrap(paragraph, width) or [""]))


class _Page:
    """A white page to paste panels on and write text into, saved once as PNG."""

    def __init__(self, width: int, height: int):
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", (int(width), int(height)), _BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self._fonts: dict[tuple[str, int], object] = {}  # loaded once per page, not per line of text

    def paste(self, pixels: np.ndarray, x: int, y: int) -> None:
        from PIL import Image

        self.image.paste(Image.fromarray(pixels), (int(x), int(y)))

    def frame(self, x: int, y: int, width: int, height: int, color, thickness: int = 3) -> None:
        rgb = tuple(int(round(255 * c)) for c in color)
        self.draw.rectangle([x - thickness, y - thickness, x + width + thickness - 1, y + height + thickness - 1],
                            outline=rgb, width=thickness)

    def text(self, x: int, y: int, text: str, size: int = 13, kind: str = "regular", anchor: str = "la") -> None:
        font = self._fonts.get((kind, size))
        if font is None:
            font = self._fonts[(kind, size)] = _font(kind, size)
        self.draw.multiline_text((int(x), int(y)), text, fill=_TEXT, font=font, anchor=anchor, spacing=3)

    def save(self, path: Path) -> Path:
        # libpng through imagecodecs with one fixed row filter, "up": Pillow tries all five filters on every row and
        # cannot be told otherwise, which took 90 % of a page's encoding (42 ms of a 1190 x 1196 page, against
        # 9 ms here); the panels are upscaled pixel blocks whose rows repeat, so "up" compresses them as well.
        import imagecodecs

        encoded = imagecodecs.png_encode(np.asarray(self.image), level=PNG_COMPRESS_LEVEL,
                                         filter=imagecodecs.PNG.FILTER.UP)
        return io.write_bytes(path, encoded)


def _text_height(text: str, size: int) -> int:
    return (text.count("\n") + 1) * (size + 4)


def nodule_page(scan: ScanResult, nodule: NoduleResult, path: Path, n_biomarkers: int = 2) -> Path:
    """One nodule's page: CT in three views with the outline, its most relevant maps, predictions vs readers."""
    shown = relevant_maps(nodule, n_biomarkers)
    crop = sitk.GetArrayFromImage(nodule.crop).astype(np.float32)
    outline, color = _mask_on_crop(nodule), nodule_color(nodule.index)
    panels = {view: _panel(_ct_rgb(crop, view), view, PANEL_PX, _outline_section(outline, view), color) for view in VIEWS}
    size = max(max(p.shape[:2]) for p in panels.values())
    label_h, bar_w, table_w, title_h = 22, 60, 330, 44
    row_h = label_h + size + _GAP
    width = _GAP + len(VIEWS) * (size + _GAP) + bar_w + table_w
    height = title_h + row_h * (1 + len(shown)) + _GAP
    page = _Page(width, height)
    status = "" if nodule.in_training_population else " (unlabelled: not used in training)"
    page.text(_GAP, 10, f"{scan.scan_id} - nodule {nodule.index}: {nodule.nodule_id}{status}", 17, "bold")
    top = title_h
    for column, view in enumerate(VIEWS):
        x = _GAP + column * (size + _GAP)
        page.text(x + size // 2, top + 2, f"CT {view}", 13, anchor="ma")
        page.paste(panels[view], x, top + label_h)
    for row, name in enumerate(shown, start=1):
        y = top + row * row_h
        maps = {view: _view_map(nodule, name, view) for view in VIEWS}
        limit = max((float(np.abs(m).max()) for m in maps.values() if m is not None), default=0.0) or 1e-12
        page.text(_GAP, y + 2, f"CDAM {_target_label(name)}", 13, "bold")
        for column, view in enumerate(VIEWS):
            x = _GAP + column * (size + _GAP)
            page.paste(_panel(_with_map(_ct_rgb(crop, view), maps[view], limit), view, PANEL_PX), x, y + label_h)
        bar_x = _GAP + len(VIEWS) * (size + _GAP)
        page.paste(_colorbar(size, limit), bar_x, y + label_h)
        for fraction, value in ((0.0, limit), (0.5, 0.0), (1.0, -limit)):
            page.text(bar_x + 18, y + label_h + int(fraction * (size - 12)), f"{value:.2g}", 11)
    table_x = width - table_w + 10
    page.text(table_x, top + label_h, prediction_table(nodule), 13, "mono")
    legend = (f"red = evidence for the target,\nblue = counter-evidence;\n|map| < {TRANSPARENT_BAND:.0%} of its max"
              f" not drawn.\nOutline: consensus of the readers.\nMethod: {scan.method}")
    note = f"\n\n{_wrapped(nodule.note, 38)}" if nodule.note else ""
    table_height = _text_height(prediction_table(nodule), 13)
    page.text(table_x, top + label_h + table_height + 24, legend + note, 12)
    return page.save(path)


def overview_page(scan: ScanResult, path: Path, pages: Mapping[int, str] | None = None) -> Path:
    """The scan's overview: one line per nodule (model beside readers) and an axial thumbnail of each nodule."""
    nodules = scan.nodules
    # Many nodules: more, smaller thumbnails, so the page stays about one screen high.
    columns = min(THUMBNAIL_COLUMNS if len(nodules) <= 12 else 2 * THUMBNAIL_COLUMNS, len(nodules))
    panel_px = PANEL_PX if len(nodules) <= 12 else SMALL_PANEL_PX
    header = f"{'nodule':<8}{'id':<22}{'p(malig.)':>10}{'readers':>9}{'diam. mm':>10}{'readers':>9}  page"
    lines = [header]
    for nodule in nodules:
        page_file = (pages or {}).get(nodule.index, "")
        lines.append(f"{nodule.index:<8}{nodule.nodule_id + ('' if nodule.in_training_population else ' *'):<22}"
                     f"{_format(nodule.predictions.get(MALIGNANCY)):>10}"
                     f"{_format(nodule.radiologists.get(MALIGNANCY)):>9}"
                     f"{_format(nodule.predictions.get('diameter')):>10}"
                     f"{_format(nodule.radiologists.get('diameter')):>9}  {page_file}")
    if any(not n.in_training_population for n in nodules):
        lines.append("* unlabelled: fewer readers than training requires")
    table = "\n".join(lines)
    thumbnails = []
    for nodule in nodules:
        crop = sitk.GetArrayFromImage(nodule.crop).astype(np.float32)
        values = _view_map(nodule, MALIGNANCY, "axial")
        limit = float(np.abs(values).max()) or 1e-12 if values is not None else 1.0
        thumbnails.append(_panel(_with_map(_ct_rgb(crop, "axial"), values, limit), "axial", panel_px,
                                 _outline_section(_mask_on_crop(nodule), "axial"), nodule_color(nodule.index)))
    size = max((t.shape[0] for t in thumbnails), default=panel_px)
    font = 13 if panel_px == PANEL_PX else 11
    title_h, table_h, label_h, frame = 40, _text_height(table, 13) + 16, font + 10, 3
    cell = size + 2 * frame + _GAP
    rows = math.ceil(len(nodules) / columns)
    width = max(_GAP + columns * cell, 900)
    height = title_h + table_h + rows * (label_h + cell) + _GAP
    page = _Page(width, height)
    page.text(_GAP, 10, f"{scan.scan_id}: {len(nodules)} nodule(s), CDAM ({scan.method}); red = evidence, "
                        "blue = counter-evidence", 16, "bold")
    page.text(_GAP, title_h, table, 13, "mono")
    for k, (nodule, thumbnail) in enumerate(zip(nodules, thumbnails)):
        x = _GAP + frame + (k % columns) * cell
        y = title_h + table_h + (k // columns) * (label_h + cell)
        page.text(x, y, f"nodule {nodule.index}: p(malig.) {_format(nodule.predictions.get(MALIGNANCY))}"
                        f" (readers {_format(nodule.radiologists.get(MALIGNANCY))})", font)
        page.paste(thumbnail, x, y + label_h + frame)
        page.frame(x, y + label_h + frame, thumbnail.shape[1], thumbnail.shape[0], nodule_color(nodule.index))
    return page.save(path)


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
