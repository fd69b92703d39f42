"""``predictions.tsv``: the predictions beside the radiologists' values, as a table Slicer's Tables module shows.

One row per nodule and target (Slicer's table view is narrow; long rows would need scrolling). Slicer's
``vtkMRMLTableStorageNode`` reads tab-separated text with the column names on the first line.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ctcdam import io
from ctcdam.export.result import NoduleResult
from ctcdam.targets import MALIGNANCY, TARGETS

COLUMNS = ("nodule", "nodule_id", "target", "model", "radiologists", "labelled")


def value_text(value: float | None) -> str:
    """A value as the bundle's text files show it: 4 significant digits, ``na`` when missing."""
    return "na" if value is None or not math.isfinite(float(value)) else f"{float(value):.4g}"


def _target_label(target: str) -> str:
    return "p(malignancy)" if target == MALIGNANCY else target


def prediction_rows(nodules: Sequence[NoduleResult]) -> list[tuple[str, ...]]:
    """The table's rows (strings), nodules in order, targets in the project's order."""
    rows = []
    for nodule in nodules:
        targets = [t for t in TARGETS if t in nodule.predictions]
        targets += [t for t in nodule.predictions if t not in TARGETS]
        for target in targets:
            rows.append((f"Nodule {nodule.index}", nodule.nodule_id, _target_label(target),
                         value_text(nodule.predictions[target]), value_text(nodule.radiologists.get(target)),
                         str(nodule.in_training_population).lower()))
    return rows


def write_predictions_table(nodules: Sequence[NoduleResult], path: Path) -> Path:
    """Write ``predictions.tsv``; tabs and line breaks inside values would split cells, so they are replaced."""
    def clean(cell: str) -> str:
        return " ".join(cell.split())

    lines = ["\t".join(COLUMNS)] + ["\t".join(clean(c) for c in row) for row in prediction_rows(nodules)]
    return io.write_text(path, "\n".join(lines) + "\n")
