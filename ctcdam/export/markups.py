"""Slicer markups (``.mrk.json``): one fiducial per nodule centroid, in LPS millimetres (research/conventions.md §1.3)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcdam import io

#: Slicer's reader accepts any ``markups-schema-v1.<minor>.<patch>.json`` schema URL.
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)


@dataclass(frozen=True)
class Fiducial:
    """A labelled point in LPS millimetres."""

    point_id: str
    label: str
    description: str
    position_lps: tuple[float, float, float]


@dataclass(frozen=True)
class MarkupsStyle:
    """How the centroid markers look: written into the file's display block (read by Add Data / ``review.py``)
    and onto the scene's display node (a scene never reads the file's display block)."""

    color: tuple[float, float, float] = (1.0, 1.0, 0.0)
    glyph_type: str = "Sphere3D"
    glyph_scale: float = 2.0
    text_scale: float = 2.5
    opacity: float = 1.0
    point_labels: bool = True

    def json_display(self) -> dict:
        """The ``display`` block of a ``.mrk.json`` file."""
        return {"visibility": True, "opacity": self.opacity, "color": list(self.color),
                "selectedColor": list(self.color), "pointLabelsVisibility": self.point_labels,
                "textScale": self.text_scale, "glyphType": self.glyph_type, "glyphScale": self.glyph_scale}

    def mrml_attributes(self) -> dict[str, object]:
        """The same settings as attributes of a ``MarkupsFiducialDisplay`` scene node (Slicer's own names)."""
        # Every point is written "selected", so the selected colour is what Slicer draws.
        return {"visibility": True, "opacity": self.opacity, "color": self.color, "selectedColor": self.color,
                "pointLabelsVisibility": self.point_labels, "textScale": self.text_scale,
                "glyphType": self.glyph_type, "glyphScale": self.glyph_scale}


MARKUPS_STYLE = MarkupsStyle()


def fiducials_document(fiducials: Sequence[Fiducial], style: MarkupsStyle = MARKUPS_STYLE) -> dict:
    """The markups JSON document (schema v1.0.3) of a fiducial list."""
    return {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": True,
                "labelFormat": "%N-%d",
                "controlPoints": [
                    {
                        "id": fiducial.point_id,
                        "label": fiducial.label,
                        "description": fiducial.description,
                        "associatedNodeID": "",
                        "position": [float(v) for v in fiducial.position_lps],
                        "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                        "selected": True,
                        "locked": True,
                        "visibility": True,
                        "positionStatus": "defined",
                    }
                    for fiducial in fiducials
                ],
                "display": style.json_display(),
            }
        ],
    }


def write_fiducials(fiducials: Sequence[Fiducial], path: Path) -> Path:
    """Write fiducials as a Slicer ``.mrk.json`` file."""
    return io.write_json(path, fiducials_document(fiducials))
