"""File names inside a review bundle, and the rule that keeps heat maps from loading as label maps in Slicer."""
from __future__ import annotations

import re

from ctcdam.data.views import VIEWS

#: Slicer's Add-Data dialog ticks "LabelMap" when a base name matches one of these
#: (qSlicerVolumesIOOptionsWidget.cxx); a heat map loaded that way is cast to integers and drawn as labels.
SLICER_LABELMAP_NAME_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(\b|_)([Ll]abel(s)?)(\b|_)"),
    re.compile(r"(\b|_)([Ss]eg)(\b|_)"),
)

CT_FILE = "ct.nii.gz"
SEGMENTATION_FILE = "nodules.seg.nrrd"
#: The known causes (spicules, calcification) of a known-cause scan's nodules: a second segmentation, because the
#: calcification lies inside the nodule's segment and one labelmap layer cannot hold both.
CAUSES_SEGMENTATION_FILE = "causes.seg.nrrd"
MARKUPS_FILE = "nodules.mrk.json"
COLOR_TABLE_FILE = "cdam_diverging.ctbl"
PREDICTIONS_FILE = "predictions.json"
PREDICTIONS_TABLE_FILE = "predictions.tsv"
REPORT_FILE = "report.png"
VIEWS_FILE = "views.png"
REVIEW_SCRIPT_FILE = "review.py"

_OPERATOR_WORDS = {">=": "ge", "<=": "le", "==": "eq", "!=": "ne", ">": "gt", "<": "lt", "=": "eq"}


def looks_like_labelmap(file_name: str) -> bool:
    """True when Slicer would load this file as a label map (its base name matches Slicer's regexes)."""
    base = file_name.split("/")[-1]
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return any(pattern.search(base) for pattern in SLICER_LABELMAP_NAME_PATTERNS)


def nodule_dir(index: int) -> str:
    """Folder of the k-th nodule (1-based) inside a bundle."""
    return f"nodule-{index}"


def nodule_report_file(index: int) -> str:
    """Bundle-relative path of the k-th nodule's report page."""
    return f"{nodule_dir(index)}/{REPORT_FILE}"


def map_file(index: int, map_name: str, view: str | None = None) -> str:
    """Bundle-relative path of a CDAM map: the 3D map, or a view's centre-slice map when view is given."""
    if view is not None and view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid views: {', '.join(VIEWS)}")
    stem = f"cdam_{map_name}" if view is None else f"cdam_{map_name}_{view}"
    name = f"{nodule_dir(index)}/{stem}.nii.gz"
    if looks_like_labelmap(name):
        raise ValueError(f"map name {map_name!r} gives {name!r}, which Slicer would load as a label map")
    return name


def concept_map_name(query: str) -> str:
    """Map name of a concept query, e.g. 'spiculation>=4' -> 'concept_spiculation_ge_4'."""
    text = query.strip()
    for operator in sorted(_OPERATOR_WORDS, key=len, reverse=True):
        text = text.replace(operator, f"_{_OPERATOR_WORDS[operator]}_")
    slug = re.sub(r"[^0-9A-Za-z]+", "_", text.replace(".", "p")).strip("_").lower()
    # "seg"/"label" as a word would make Slicer load the heat map as a label map; spell them out of the way.
    slug = re.sub(r"(?<![0-9a-z])(seg|labels?)(?![0-9a-z])", r"\1x", slug)
    return f"concept_{slug}"
