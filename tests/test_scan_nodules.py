"""The one per-scan nodule pipeline: preprocessing and explain select, mask and crop a scan's nodules the same way,
with the settings they are given."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.scan_nodules import PreprocessConfig, crop, load_scan, scan_nodules

SCAN = "LIDC-IDRI-0237"  # synthetic_lidc: clusters of 2, 4 and 4 annotations


def test_training_population_and_the_other_clusters(synthetic_lidc):
    loaded = load_scan(SCAN, synthetic_lidc.root, PreprocessConfig())
    kept, rejected = scan_nodules(loaded.scan, SCAN, loaded.series, PreprocessConfig())
    assert [n.nodule_id for n in kept] == [f"{SCAN}-n2", f"{SCAN}-n3"]
    assert [(r.nodule_id, r.stage) for r in rejected] == [(f"{SCAN}-n1", "select")]
    everything, none_rejected = scan_nodules(loaded.scan, SCAN, loaded.series, PreprocessConfig(),
                                             training_population_only=False)
    assert [n.in_training_population for n in everything] == [False, True, True] and not none_rejected
    assert "fewer than min_annotations=3" in everything[0].selection_problem
    two_readers, _ = scan_nodules(loaded.scan, SCAN, loaded.series, PreprocessConfig(min_annotations=2))
    assert [n.nodule_id for n in two_readers] == [f"{SCAN}-n1", f"{SCAN}-n2", f"{SCAN}-n3"]


def test_clusters_outside_a_partial_series_are_rejected_for_coverage(generated_lidc):
    config = PreprocessConfig()
    loaded = load_scan("LIDC-IDRI-0021", generated_lidc, config)
    # generated_lidc writes the slices around the nodules with >= 3 readers only: the two single-reader clusters
    # of this scan lie outside them
    kept, rejected = scan_nodules(loaded.scan, "LIDC-IDRI-0021", loaded.series, config, training_population_only=False)
    assert [n.nodule_id for n in kept] == ["LIDC-IDRI-0021-n3"]
    assert [(r.nodule_id, r.stage) for r in rejected] == [("LIDC-IDRI-0021-n1", "coverage"), ("LIDC-IDRI-0021-n2", "coverage")]
    assert all("is not inside the present slices" in r.reason for r in rejected)
    # with the training population only, selection comes first, as preprocessing reports it
    _, selected_first = scan_nodules(loaded.scan, "LIDC-IDRI-0021", loaded.series, config)
    assert [r.stage for r in selected_first] == ["select", "select"]


def test_the_crop_is_the_one_preprocessing_wrote(synthetic_lidc, synthetic_manifest):
    out_dir, manifest = synthetic_manifest
    config = PreprocessConfig()
    loaded = load_scan(SCAN, synthetic_lidc.root, config)
    nodules, _ = scan_nodules(loaded.scan, SCAN, loaded.series, config)
    for nodule in nodules:
        row = manifest.set_index("nodule_id").loc[nodule.nodule_id]
        written = sitk.ReadImage(str(out_dir / row["image_path"]))
        cut = crop(loaded.series, nodule, config)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(cut.hu), sitk.GetArrayFromImage(written))
        assert np.allclose(cut.hu.GetOrigin(), written.GetOrigin(), atol=1e-4)
    small = crop(loaded.series, nodules[0], PreprocessConfig(crop=CropSpec(16.0, 2.0), pad_hu=-1000))
    assert small.hu.GetSize() == (8, 8, 8) and small.hu.GetSpacing() == (2.0, 2.0, 2.0)
