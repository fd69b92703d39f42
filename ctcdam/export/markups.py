"""Slicer markups (``.mrk.json``): one fiducial per nodule centroid, in LPS millimetres (research/conventions.md §1.3)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def fiducials_document(fiducials: Sequence[Fiducial], color: tuple[float, float, float] = (1.0, 1.0, 0.0)) -> dict:
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
                "display": {
                    "visibility": True,
                    "opacity": 1.0,
                    "color": list(color),
                    "selectedColor": list(color),
                    "pointLabelsVisibility": True,
                    "textScale": 3.0,
                    "glyphType": "Sphere3D",
                    "glyphScale": 2.0,
                },
            }
        ],
    }


def write_fiducials(fiducials: Sequence[Fiducial], path: Path) -> Path:
    """Write fiducials as a Slicer ``.mrk.json`` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fiducials_document(fiducials), indent=2) + "\n")
    return path
