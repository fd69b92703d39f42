"""Colours of a bundle: the diverging CDAM colour table and the nodule palette.

How a map is drawn (the same rule in Slicer's slice views and in ``report.png``):

- the window is symmetric around zero, ``W = 2 max|v|``, ``L = 0`` (one window per map), so table entry
  ``i`` of 256 shows the value ``v = (i - 127.5) / 127.5 * max|v|``;
- every entry with ``|v| <= TRANSPARENT_BAND * max|v|`` is fully transparent (alpha 0), every other entry fully
  opaque (alpha 255); the slice composite's foreground opacity (``FOREGROUND_OPACITY``) then lets the CT show
  through the coloured part;
- beyond the band the colour starts at a clearly visible red (evidence, ``v > 0``) or blue (counter-evidence,
  ``v < 0``) and deepens towards the ends; no entry is near-white.

Why the band and not the display node's threshold: Slicer's scalar display (``vtkMRMLScalarVolumeDisplayNode``)
ANDs the table's alpha with its threshold mask into a binary alpha, so a partial alpha in the table is drawn
opaque (the old ramp showed as a whitish veil over the whole map box), and its threshold keeps one interval
``[lower, upper]``, which cannot cut out a band around zero of a signed map. A band of alpha-0 entries can.
"""
from __future__ import annotations

import colorsys
import functools
from pathlib import Path
from typing import Any

import numpy as np

from ctcdam import io

#: Blue = counter-evidence (negative CDAM), red = evidence (positive).
DIVERGING_COLORMAP = "RdBu_r"
#: Values with |v| at most this fraction of the map's max |v| are transparent.
TRANSPARENT_BAND = 0.25
#: Opacity of the map layer over the CT (the slice composite's foregroundOpacity, and the report's alpha).
FOREGROUND_OPACITY = 0.5
#: Where on the colormap's half-range (0 = centre, 1 = end) the visible entries start and end: the first visible
#: entry is already clearly red or blue, the last one stops short of the colormap's near-black ends.
_SHADE_RANGE = (0.4, 0.8)
_GOLDEN = (5 ** 0.5 - 1) / 2
#: Hue intervals of nodule colours: orange..cyan and violet..magenta, never the maps' red or blue.
_NODULE_HUES = ((0.08, 0.52), (0.74, 0.86))


def _signed_shade(fraction: np.ndarray) -> np.ndarray:
    """Colormap positions (0..1) of signed values given as fractions of the half-window (-1..1)."""
    magnitude = np.clip((np.abs(fraction) - TRANSPARENT_BAND) / (1.0 - TRANSPARENT_BAND), 0.0, 1.0)
    low, high = _SHADE_RANGE
    return 0.5 + 0.5 * np.sign(fraction) * (low + (high - low) * magnitude)


@functools.cache
def _diverging_colormap() -> Any:
    # One instance per process: matplotlib's registry hands out a fresh copy on every lookup, and each copy builds
    # its lookup table on first use (0.5 ms; a report page draws a dozen maps).
    import matplotlib  # deferred: the Slicer renderer's child process imports this module and needs no plotting

    return matplotlib.colormaps[DIVERGING_COLORMAP]


def heat_rgba(values: np.ndarray, half_window: float, opacity: float = 1.0) -> np.ndarray:
    """RGBA (floats 0-1) of signed values under the bundle's rule: transparent inside the band, else red/blue."""
    fraction = np.clip(np.asarray(values, dtype=np.float64) / max(float(half_window), 1e-30), -1.0, 1.0)
    rgba = np.array(_diverging_colormap()(_signed_shade(fraction)))
    rgba[..., 3] = np.where(np.abs(fraction) > TRANSPARENT_BAND, opacity, 0.0)
    return rgba


def diverging_table(n_colors: int = 256) -> np.ndarray:
    """(n, 4) uint8 RGBA rows of the CDAM table: alpha 0 inside the band around the centre, 255 outside."""
    if n_colors < 3:
        raise ValueError(f"a diverging colour table needs at least 3 colours, got {n_colors}")
    centre = (n_colors - 1) / 2.0
    fraction = (np.arange(n_colors) - centre) / centre
    rgba = heat_rgba(fraction, 1.0)
    return np.round(rgba * 255).astype(np.uint8)


def write_color_table(path: Path, n_colors: int = 256) -> Path:
    """Write the diverging table in Slicer's ``.ctbl`` format (``index name R G B A``, 0-255)."""
    table = diverging_table(n_colors)
    lines = [f"# Color table file {Path(path).name}", f"# {n_colors} values"]
    lines += [f"{i} cdam{i} {r} {g} {b} {a}" for i, (r, g, b, a) in enumerate(table)]
    return io.write_text(path, "\n".join(lines) + "\n")


#: Colours of the known-cause segments: saturated and dark enough to stand out on the bright soft tissue and
#: calcium of a lung window, distinct from each other and never the maps' red or blue.
CAUSE_COLORS: dict[str, tuple[float, float, float]] = {
    "spicules": (0.0, 0.85, 0.0),
    "calcification": (0.6, 0.0, 1.0),
}
_OTHER_CAUSE_COLOR = (1.0, 0.85, 0.0)


def cause_color(cause: str) -> tuple[float, float, float]:
    """RGB (0-1) of a known-cause segment (one colour per cause, whichever nodule carries it)."""
    return CAUSE_COLORS.get(cause, _OTHER_CAUSE_COLOR)


def nodule_color(index: int) -> tuple[float, float, float]:
    """RGB (0-1) of the k-th nodule (1-based): distinct for every k, never the maps' red or blue.

    Hues step by the golden ratio (an irrational step never returns to a hue already used, and consecutive
    nodules land far apart), squeezed into the hue intervals that stay visible on red and blue maps; brightness
    and saturation cycle through three and two levels so that nodules with close hues still differ.
    """
    if index < 1:
        raise ValueError(f"nodule indices start at 1, got {index}")
    u = ((index - 1) * _GOLDEN) % 1.0
    total = sum(high - low for low, high in _NODULE_HUES)
    position = u * total
    for low, high in _NODULE_HUES:
        if position <= high - low:
            hue = low + position
            break
        position -= high - low
    else:  # only reachable through rounding at u -> 1
        hue = _NODULE_HUES[-1][1]
    value = (1.0, 0.75, 0.55)[(index - 1) % 3]
    saturation = (0.9, 0.55)[(index - 1) % 2]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return float(r), float(g), float(b)
