"""Names of the prediction targets, shared by every layer (the model's output order)."""
from __future__ import annotations

#: The malignancy logit is output 0; the eight radiologist attributes follow (regression).
MALIGNANCY = "malignancy"
BIOMARKERS: tuple[str, ...] = (
    "subtlety",
    "calcification",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "sphericity",
    "diameter",
)
TARGETS: tuple[str, ...] = (MALIGNANCY, *BIOMARKERS)

#: Manifest column of each biomarker target (annotators' mean; diameter in mm).
BIOMARKER_COLUMNS: dict[str, str] = {name: name for name in BIOMARKERS} | {"diameter": "diameter_mm"}


def target_index(name: str) -> int:
    """Output index of a target name (raises ValueError listing the valid names)."""
    try:
        return TARGETS.index(name)
    except ValueError:
        raise ValueError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}") from None
