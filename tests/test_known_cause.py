"""The known-cause set: labels follow the painted signs, and each cause mask covers the voxels that were painted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctcdam.manifest.schema import read_manifest, read_run_record
from ctcdam.synthetic.known_cause import CAUSES
from ctcdam.workflows.known_cause import known_cause_data

#: Two small scans whose five nodules carry every combination the rule needs (seed 0): spicules alone
#: (malignant), calcification alone, both (calcification overrides: benign), and a vessel alone.
SCANS = ("LIDC-IDRI-0407", "LIDC-IDRI-0237")


@pytest.fixture(scope="module")
def known_cause(tmp_path_factory):
    cache = tmp_path_factory.mktemp("known-cause-cache")
    data = known_cause_data(cache, scans=SCANS, seed=0, workers=1)
    return data, read_manifest(data.manifest)


def _image(path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def test_labels_follow_the_painted_rule(known_cause):
    _, frame = known_cause
    assert len(frame) == 5
    spicules, calcified = frame["sign_spicules"].astype(bool), frame["sign_calcified"].astype(bool)
    assert (frame["malignancy_label"].astype(int) == (spicules & ~calcified)).all()
    assert {(s, c) for s, c in zip(spicules, calcified)} >= {(True, False), (False, True), (True, True)}
    np.testing.assert_array_equal(frame["spiculation"], np.where(spicules, 4.5, 1.0))
    np.testing.assert_array_equal(frame["calcification"], np.where(calcified, 1.0, 6.0))
    assert frame["sign_vessel"].astype(bool).any() and not frame["sign_vessel"].astype(bool).all()


def test_cause_masks_cover_the_painted_voxels_on_the_crop_grid(known_cause):
    data, frame = known_cause
    root = data.manifest.parent
    for row in frame.to_dict("records"):
        hu, crop = _image(row["image_file"])
        nodule = sitk.GetArrayFromImage(sitk.ReadImage(row["mask_file"])).astype(bool)
        painted = {"spicules": row["sign_spicules"], "calcification": row["sign_calcified"], "vessel": row["sign_vessel"]}
        for name in CAUSES:
            mask, image = _image(root / row[f"cause_{name}_path"])
            assert image.GetOrigin() == crop.GetOrigin() and image.GetSpacing() == crop.GetSpacing()
            assert image.GetDirection() == crop.GetDirection()
            mask = mask.astype(bool)
            assert mask.any() == bool(painted[name]), (row["nodule_id"], name)
            if not mask.any():
                continue
            if name == "calcification":
                assert (mask & nodule).sum() >= 0.8 * mask.sum()  # inside the nodule
                assert np.median(hu[mask]) > 150  # calcified (500 HU), partial volume at the rims
            else:
                assert not (mask & nodule).any()  # spikes and vessels run outside the nodule
                assert np.median(hu[mask]) > -500  # soft tissue in the lung (-850 HU), partial volume aside
    lung = [_image(r["image_file"])[0] for r in frame.to_dict("records")]
    assert min(np.percentile(a, 5) for a in lung) < -700  # the phantom lung is there to be contrasted with


def test_the_set_is_reused_and_its_record_travels(known_cause, tmp_path_factory):
    data, _ = known_cause
    record = read_run_record(data.manifest)
    assert record["known_cause"]["scans"] == list(SCANS) and record["lidc_root"] == str(data.lidc_root.resolve())
    stamp = data.manifest.stat().st_mtime_ns
    again = known_cause_data(data.manifest.parent.parent, scans=SCANS, seed=0, workers=1)
    assert again == data and data.manifest.stat().st_mtime_ns == stamp
    other = pd.read_csv(data.manifest)
    assert set(other.columns) >= {"cause_spicules_path", "cause_calcification_path", "cause_vessel_path"}


@pytest.fixture(scope="module")
def known_cause_checkpoint(known_cause, tmp_path_factory) -> Path:
    """A tiny ViT trained for two epochs on the five known-cause nodules."""
    from tests.fixtures_models import train_tiny

    data, _ = known_cause
    # Two patients: folds group by nodule so that train, validation and test stay disjoint.
    record = train_tiny(data.manifest, tmp_path_factory.mktemp("known-cause-train"), "known-cause",
                        ["--data.n_folds=2", "--data.val_fraction=0.45", "--data.group_by=nodule_id"])
    return Path(record["checkpoint"])


def test_evaluation_scores_every_method_against_the_cause_masks(known_cause_checkpoint, tmp_path):
    from ctcdam.evaluate import EvaluationConfig, evaluate

    out = evaluate(EvaluationConfig(
        checkpoint=known_cause_checkpoint, out_dir=tmp_path / "evaluate", methods=("cdam", "rp", "uniform", "centred_gaussian"),
        targets=("malignancy", "spiculation", "calcification", "texture"), sanity_nodules=1, progress=False,
    ))
    assert not (out / "failures.csv").exists()  # every method ran on every nodule, the re-initialisation test too
    scores = pd.read_csv(out / "metrics.csv")
    uniform = scores[scores["method"] == "uniform"]
    lift = uniform["evidence_lift"].dropna()
    assert len(lift) and np.allclose(lift, 1.0)  # a flat map puts on the evidence exactly its area share
    assert scores.loc[scores["method"].isin(["uniform", "centred_gaussian", "rp"]), "counter_evidence_share"].isna().all()
    by_target = scores.groupby("target")
    assert by_target.get_group("texture")[["evidence_share", "cause_auroc"]].isna().all().all()  # no known cause
    assert by_target.get_group("spiculation")["counter_evidence_share"].isna().all()
    assert by_target.get_group("calcification")["evidence_share"].isna().all()
    cdam = scores[(scores["method"] == "cdam") & (scores["target"] == "malignancy")]
    assert cdam["cause_auroc"].between(0, 1).any()
    strata = pd.read_csv(out / "ground_truth.csv")
    assert {"all", "class", "diameter"} >= set(strata["stratum"]) and "all" in set(strata["stratum"])


def test_the_benchmark_writes_its_json_and_picture(known_cause, known_cause_checkpoint, tmp_path):
    from ctcdam.workflows.known_cause import BenchmarkSettings, run_benchmark

    data, _ = known_cause
    settings = BenchmarkSettings(out_dir=tmp_path, cache_dir=data.manifest.parent.parent, scans=SCANS,
                                 checkpoint=known_cause_checkpoint, methods=("cdam", "uniform"), sanity_nodules=0)
    run_dir, summary = run_benchmark(settings)
    assert set(summary) == {"model", "methods"} and set(summary["methods"]) == {"cdam", "uniform"}
    assert set(summary["methods"]["cdam"]) == {"evidence_share", "evidence_lift", "counter_evidence_share",
                                                "cause_auroc", "correctness"}
    assert summary["methods"]["uniform"]["counter_evidence_share"] is None  # unsigned: not expressible
    assert (run_dir / "known_cause.png").stat().st_size > 10_000
    assert json.loads((run_dir / "known_cause.json").read_text()) == summary
