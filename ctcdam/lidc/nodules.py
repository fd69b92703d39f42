"""Annotations -> nodules (pylidc clusters) -> labels, following the reference work's protocol.

The protocol (Brocki, Binda, Chung, arXiv 2312.02364): nodules with at least 3 readers' annotations;
malignancy median > 3 is malignant, < 3 benign, = 3 has no malignancy label (kept for the biomarkers);
the biomarker targets are the annotators' means. calcification and internalStructure are nominal codes, so
their majority codes are recorded too, with "calcified" (more than half chose a code != 6); internalStructure
is never averaged.

A nodule is a cluster of annotations from different readers (pylidc ``cluster_annotations``). Labels use
the annotations' integer columns, never pylidc's string properties (``Annotation.InternalStructure``
asserts on the out-of-range code 5 of annotation 3761).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctcdam.lidc import pylidc_compat
from ctcdam.targets import BIOMARKERS

logger = logging.getLogger(__name__)

#: pylidc splits clusters until no group has more than 4 annotations (4 readers); larger ones are failures.
MAX_READERS = 4
#: Annotators' means that become regression targets (diameter handled separately, in mm).
MEAN_FEATURES: tuple[str, ...] = tuple(name for name in BIOMARKERS if name != "diameter")
INTERNAL_STRUCTURE_CODES = {1: "soft tissue", 2: "fluid", 3: "fat", 4: "air"}
CALCIFICATION_ABSENT = 6


@dataclass(frozen=True)
class AnnotationFeatures:
    """One reader's annotation of a nodule: the integer feature codes and pylidc's diameter (mm)."""

    annotation_id: int
    subtlety: int
    internal_structure: int
    calcification: int
    sphericity: int
    margin: int
    lobulation: int
    spiculation: int
    texture: int
    malignancy: int
    diameter_mm: float


def annotation_features(annotation, diameter_mm: float | None = None) -> AnnotationFeatures:
    """The integer columns of a pylidc Annotation (no string property, which asserts on code 5).

    ``diameter_mm`` replaces pylidc's ``annotation.diameter`` when the caller computed it already.
    """
    return AnnotationFeatures(
        annotation_id=int(annotation.id),
        subtlety=int(annotation.subtlety),
        internal_structure=int(annotation.internalStructure),
        calcification=int(annotation.calcification),
        sphericity=int(annotation.sphericity),
        margin=int(annotation.margin),
        lobulation=int(annotation.lobulation),
        spiculation=int(annotation.spiculation),
        texture=int(annotation.texture),
        malignancy=int(annotation.malignancy),
        diameter_mm=float(annotation.diameter if diameter_mm is None else diameter_mm),
    )


def majority_code(codes: Sequence[int]) -> int | None:
    """Most frequent code; ties go to the lowest code so the result never depends on reader order."""
    if not codes:
        return None
    counts = Counter(codes)
    return min(counts, key=lambda code: (-counts[code], code))


def malignancy_label(median: float) -> int | None:
    """1 (malignant) for a median > 3, 0 (benign) for < 3, None (ambiguous, excluded from the task) for 3."""
    if median > 3:
        return 1
    if median < 3:
        return 0
    return None


def nodule_labels(features: Sequence[AnnotationFeatures]) -> tuple[dict[str, float | int | bool | None], list[str]]:
    """Per-nodule labels from its annotations: (manifest columns, notes to log)."""
    notes: list[str] = []
    malignancy_median = float(np.median([f.malignancy for f in features]))
    labels: dict[str, float | int | bool | None] = {
        "n_annotations": len(features),
        "annotation_ids": ";".join(str(f.annotation_id) for f in sorted(features, key=lambda f: f.annotation_id)),
        "malignancy_median": malignancy_median,
        "malignancy_label": malignancy_label(malignancy_median),
    }
    for name in MEAN_FEATURES:
        labels[name] = float(np.mean([getattr(f, name) for f in features]))
    labels["diameter_mm"] = float(np.mean([f.diameter_mm for f in features]))
    valid_structure = []
    for f in features:
        if f.internal_structure in INTERNAL_STRUCTURE_CODES:
            valid_structure.append(f.internal_structure)
        else:  # annotation 3761 (LIDC-IDRI-0510) has code 5, outside the LIDC code list 1-4
            notes.append(
                f"annotation {f.annotation_id}: internalStructure code {f.internal_structure} is not one of "
                f"{sorted(INTERNAL_STRUCTURE_CODES)}; left out of the internal-structure vote"
            )
    labels["internal_structure_mode"] = majority_code(valid_structure)
    calcification_codes = [f.calcification for f in features]
    labels["calcification_mode"] = majority_code(calcification_codes)
    # Calcification is nominal (6 = absent); "calcified" = more than half of the readers chose a calcified code.
    labels["calcified"] = sum(c != CALCIFICATION_ABSENT for c in calcification_codes) * 2 > len(features)
    return labels, notes


@dataclass(frozen=True)
class Cluster:
    """A pylidc cluster of annotations with its position (for a stable order) and annotated z extent."""

    annotations: tuple
    position: tuple[float, float, float]  # mean contour point: (z mm, row i, column j)
    z_extent: tuple[float, float]  # lowest and highest annotated contour z (mm)


def _cluster_record(annotations: Sequence, slice_zvals: np.ndarray) -> Cluster:
    points = np.vstack([a.contours_matrix for a in annotations])  # (i, j, k) per contour point
    i, j, k = points.mean(axis=0)
    z = float(np.interp(k, np.arange(len(slice_zvals)), slice_zvals))
    contour_z = [float(c.image_z_position) for a in annotations for c in a.contours]
    return Cluster(
        annotations=tuple(sorted(annotations, key=lambda a: a.id)),
        position=(round(z, 3), round(float(i), 3), round(float(j), 3)),
        z_extent=(min(contour_z), max(contour_z)),
    )


def scan_clusters(scan) -> list[Cluster]:
    """The scan's annotation clusters ordered by position (z, row, column): cluster k is nodule ``n<k+1>``."""
    slice_zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    clusters = pylidc_compat.cluster_annotations(scan)
    records = [_cluster_record(annotations, slice_zvals) for annotations in clusters]
    return sorted(records, key=lambda c: c.position)


def nodule_id(scan_id: str, cluster_index: int) -> str:
    """Stable nodule id: ``<scan_id>-n<k>`` with k = 1-based position of the cluster in scan order."""
    return f"{scan_id}-n{cluster_index + 1}"


def selection_problem(cluster: Cluster, min_annotations: int) -> str | None:
    """Why a cluster is not a nodule of the data set (None when it is)."""
    n = len(cluster.annotations)
    if n > MAX_READERS:
        return (
            f"cluster of {n} annotations: pylidc could not split it into nodules of at most {MAX_READERS} "
            "readers (several nodules merged)"
        )
    if n < min_annotations:
        return f"{n} annotation(s), fewer than min_annotations={min_annotations}"
    return None
