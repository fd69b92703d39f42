"""Scan-space ground truth: where the mass of an exported 3D map lies in the world, against the painted cause masks.

The 2D scores (``ground_truth``) look at the centre slice of each view on the model's token grid. Here the map is
the one a reader opens: the 3D NIfTI of a review bundle (the mean of the three view stacks, on the nodule's crop
grid), read back with nibabel, the NIfTI reference reader, from the file that the bundle's ``predictions.json``
names. Per test nodule carrying a sign, the mass centre of the map's part of that sign is placed in world
coordinates through the file's affine and tested against the nodule's cause mask dilated in mm
(``ctcdam.explain.cause_metrics``: ``signed_mass_centre``, ``distance_to_mask``, ``inside_dilated_mask``):

- positive part (evidence) against the spicules, for nodules with spicules;
- negative part (counter-evidence) against the calcified foci, for nodules with a calcification.

The baseline ``crop_centre`` is the same test for the centre of the crop grid: the mass centre of any map symmetric
about the centre (the centred Gaussian control), which is the nodule's centroid the crop is centred on. World
coordinates are reported in LPS (DICOM and ITK's convention, as ``predictions.json`` and ``nodules.mrk.json``);
nibabel's affine maps to RAS, and the two differ by the sign of x and y.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctcdam.evaluate.summary import wilson_interval
from ctcdam.explain import cause_metrics
from ctcdam.targets import MALIGNANCY

log = logging.getLogger(__name__)

#: sign -> (the mass of the map it takes, the cause mask it should lie in, the manifest column saying the nodule has it)
SIGNS: dict[str, tuple[int, str, str]] = {
    "positive": (1, "spicules", "sign_spicules"),
    "negative": (-1, "calcification", "sign_calcified"),
}
BASELINE = "crop_centre"
SCAN_SPACE_COLUMNS: tuple[str, ...] = (
    "scan_id", "nodule_id", "sign", "cause", "method", "centre_x_lps", "centre_y_lps", "centre_z_lps",
    "distance_mm", "inside", "map_file",
)
#: The heading of the scan-space section of summary.md.
SCAN_SPACE_HEADING = "## Scan space: mass centre of the exported 3D map"
#: nibabel's affines map voxels to RAS; this flips them to LPS.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti_lps(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's voxel values (float64, nibabel's (i, j, k) order) and its voxel-to-LPS affine, read with nibabel."""
    import nibabel  # deferred: only the scan-space step reads NIfTI this way

    image = nibabel.load(str(path))
    return np.asarray(image.get_fdata(dtype=np.float64)), RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)


def bundle_map_files(cohort_root: Path, scan_ids: Sequence[str], target: str = MALIGNANCY) -> dict[str, Path]:
    """The 3D ``target`` map of every nodule in the bundles of ``scan_ids``, by nodule id (from predictions.json)."""
    files: dict[str, Path] = {}
    for scan_id in dict.fromkeys(scan_ids):
        folder = Path(cohort_root) / scan_id
        document = folder / "predictions.json"
        if not document.is_file():
            log.warning("scan space: %s has no bundle (no %s)", scan_id, document)
            continue
        for nodule in json.loads(document.read_text())["nodules"]:
            name = nodule.get("maps", {}).get(target)
            if name:
                files[str(nodule["nodule_id"])] = folder / name
    return files


def _carries(value: Any) -> bool:
    """Whether a manifest's sign cell says yes (a bool, 0/1, or text as a CSV may hold it; empty is no)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "1.0", "yes")
    return bool(pd.notna(value) and value)


def _row(scan_id: str, nodule_id: str, sign: str, cause: str, method: str, centre: np.ndarray, distance: float,
         inside: bool, map_file: str) -> dict[str, Any]:
    return {"scan_id": scan_id, "nodule_id": nodule_id, "sign": sign, "cause": cause, "method": method,
            "centre_x_lps": float(centre[0]), "centre_y_lps": float(centre[1]), "centre_z_lps": float(centre[2]),
            "distance_mm": distance, "inside": inside, "map_file": map_file}


def scan_space_table(
    cohort_root: Path, rows: pd.DataFrame, method: str, target: str = MALIGNANCY,
    dilation_mm: float = cause_metrics.SCAN_SPACE_DILATION_MM,
) -> pd.DataFrame:
    """One row per test nodule carrying a sign x (``method``, the crop centre): the map's mass centre of that sign
    in LPS, its distance to the cause mask and whether it lies in the mask dilated by ``dilation_mm``.

    ``rows`` are manifest rows (``scan_id``, ``nodule_id``, the ``sign_*`` columns and absolute
    ``cause_<name>_path``); a nodule whose bundle holds no ``target`` map is left out, with a warning.
    """
    files = bundle_map_files(cohort_root, rows["scan_id"].astype(str).tolist(), target)
    records = []
    for row in rows.to_dict("records"):
        wanted = [(sign, spec) for sign, spec in SIGNS.items() if _carries(row.get(spec[2]))]
        if not wanted:
            continue
        nodule_id = str(row["nodule_id"])
        if nodule_id not in files:
            log.warning("scan space: no 3D %s map of %s in %s; left out", target, nodule_id, cohort_root)
            continue
        values, affine = read_nifti_lps(files[nodule_id])
        positions = cause_metrics.voxel_positions(affine, values.shape)
        # The uniform map's mass centre: the grid centre, where any centred symmetric map has its mass centre.
        crop_centre = cause_metrics.signed_mass_centre(np.ones(values.size), positions)
        map_file = files[nodule_id].relative_to(cohort_root).as_posix()
        for sign, (factor, cause, _) in wanted:
            mask, mask_affine = read_nifti_lps(Path(row[f"cause_{cause}_path"]))
            centres = {method: cause_metrics.signed_mass_centre(values, positions, factor), BASELINE: crop_centre}
            for name, centre in centres.items():
                distance = cause_metrics.distance_to_mask(centre, mask, mask_affine)
                inside = cause_metrics.inside_dilated_mask(centre, mask, mask_affine, dilation_mm)
                records.append(_row(str(row["scan_id"]), nodule_id, sign, cause, name, centre, distance, inside,
                                    map_file if name == method else ""))
    return pd.DataFrame(records, columns=list(SCAN_SPACE_COLUMNS))


def scan_space_summary(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per sign: its cause and, per method, hits, n, hit rate with its Wilson 95 % interval, median distance (mm)."""
    out: dict[str, dict[str, Any]] = {}
    for sign, (_, cause, _) in SIGNS.items():
        part = table[table["sign"] == sign]
        methods: dict[str, Any] = {}
        for method, group in part.groupby("method", sort=False):
            hits, n = int(group["inside"].astype(bool).sum()), len(group)
            rate, low, high = wilson_interval(hits, n)
            distance = group["distance_mm"].to_numpy(dtype=float)
            methods[str(method)] = {"hits": hits, "n": n, "hit_rate": rate, "low": low, "high": high,
                                    "median_distance_mm": float(np.median(distance)) if n else float("nan")}
        out[sign] = {"cause": cause, "methods": methods}
    return out


def scan_space_markdown(summary: Mapping[str, Any]) -> str:
    """The summary.md section of the scan-space step."""
    lines = ["", SCAN_SPACE_HEADING, "",
             f"Target {summary['target']}, method {summary['method']}: the mass centre of the positive (negative) part "
             f"of each test nodule's 3D map ({summary['coordinates']}, through the NIfTI affine) inside its spicule "
             f"(calcification) mask dilated by {summary['dilation_mm']:g} mm; `{BASELINE}` = the crop's centre (the "
             f"centred Gaussian's mass centre, the nodule centroid). Hit rate with its Wilson 95 % interval; per nodule: "
             "scan_space.csv.", "",
             "| sign | cause | method | hit rate [95 % CI] | hits / n | median distance (mm) |", "|---|---|---|---|---|---|"]
    for sign, part in summary["signs"].items():
        for method, s in part["methods"].items():
            rate = "n/a" if not s["n"] else f"{s['hit_rate']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"
            lines.append(f"| {sign} | {part['cause']} | {method} | {rate} | {s['hits']} / {s['n']} | "
                         f"{s['median_distance_mm']:.2f} |")
    seconds = summary.get("seconds", {})
    if seconds:
        lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + "."]
    return "\n".join(lines) + "\n"
