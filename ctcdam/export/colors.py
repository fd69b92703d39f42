"""Colours of a bundle: the diverging CDAM colour table (zero transparent) and the nodule palette."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

#: Blue = counter-evidence (negative CDAM), red = evidence (positive), white around zero.
DIVERGING_COLORMAP = "RdBu_r"
#: Qualitative palette for nodule segments and report frames.
NODULE_COLORMAP = "tab10"


def diverging_table(n_colors: int = 256, transparent_fraction: float = 0.06) -> np.ndarray:
    """(n, 4) uint8 RGBA rows of the diverging map; alpha rises linearly from 0 at the centre to 255 at
    ``transparent_fraction`` of the half-range, so values near zero let the CT show through."""
    if n_colors < 3:
        raise ValueError(f"a diverging colour table needs at least 3 colours, got {n_colors}")
    rgba = matplotlib.colormaps[DIVERGING_COLORMAP](np.linspace(0.0, 1.0, n_colors))
    centre = (n_colors - 1) / 2.0
    distance = np.abs(np.arange(n_colors) - centre) / centre
    # The two entries next to the centre (where Slicer's symmetric window maps 0) are fully transparent.
    ramp = (distance - distance.min()) / max(transparent_fraction, 1e-9)
    rgba[:, 3] = np.clip(ramp, 0.0, 1.0)
    return np.round(rgba * 255).astype(np.uint8)


def write_color_table(path: Path, n_colors: int = 256) -> Path:
    """Write the diverging table in Slicer's ``.ctbl`` format (``index name R G B A``, 0-255)."""
    table = diverging_table(n_colors)
    lines = [f"# Color table file {path.name}", f"# {n_colors} values"]
    lines += [f"{i} cdam{i} {r} {g} {b} {a}" for i, (r, g, b, a) in enumerate(table)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def nodule_color(index: int) -> tuple[float, float, float]:
    """RGB (0-1) of the k-th nodule (1-based), from a qualitative palette."""
    r, g, b, _ = matplotlib.colormaps[NODULE_COLORMAP]((index - 1) % 10)
    return float(r), float(g), float(b)
