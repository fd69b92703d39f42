"""The known-cause set: labels follow the painted signs, and each cause mask covers the voxels that were painted;
the benchmark scores every method, and its scan-space step (exported 3D maps in world coordinates) agrees with a
recomputation through SimpleITK."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from ctcdam import io
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


@pytest.fixture(scope="module")
def benchmark_run(known_cause, known_cause_checkpoint, tmp_path_factory):
    """One benchmark run with its default steps, the scan-space step included: (settings, run folder, JSON)."""
    from ctcdam.workflows.known_cause import BenchmarkSettings, run_benchmark

    data, _ = known_cause
    settings = BenchmarkSettings(out_dir=tmp_path_factory.mktemp("benchmark"), cache_dir=data.manifest.parent.parent,
                                 scans=SCANS, checkpoint=known_cause_checkpoint, methods=("cdam", "uniform"),
                                 sanity_nodules=0)
    run_dir, summary = run_benchmark(settings)
    return settings, run_dir, summary


def test_the_benchmark_writes_its_json_and_picture(benchmark_run):
    _, run_dir, summary = benchmark_run
    assert set(summary) == {"model", "methods", "scan_space"} and set(summary["methods"]) == {"cdam", "uniform"}
    assert set(summary["methods"]["cdam"]) == {"evidence_share", "evidence_lift", "counter_evidence_share",
                                                "cause_auroc", "correctness"}
    assert summary["methods"]["uniform"]["counter_evidence_share"] is None  # unsigned: not expressible
    assert (run_dir / "known_cause.png").stat().st_size > 10_000
    assert json.loads((run_dir / "known_cause.json").read_text()) == summary


def _sitk_mass_centre(path: Path, sign: int) -> np.ndarray:
    """The map's mass centre of one sign, read with SimpleITK: weighted mean continuous index, then to LPS."""
    image = sitk.ReadImage(str(path))
    weights = np.maximum(sign * sitk.GetArrayFromImage(image).astype(np.float64), 0.0)  # (z, y, x)
    index_zyx = np.indices(weights.shape).reshape(3, -1)
    mean_xyz = (index_zyx * weights.reshape(-1)).sum(1)[::-1] / weights.sum()
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(mean_xyz.tolist()))


def _sitk_distance(point: np.ndarray, mask_path: Path) -> float:
    """Distance (mm) from an LPS point to the mask's voxel boxes: the point's index clamped to each box, back to LPS."""
    mask = sitk.ReadImage(str(mask_path))
    continuous = np.asarray(mask.TransformPhysicalPointToContinuousIndex(point.tolist()))
    best = np.inf
    for voxel in np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1]:  # (x, y, z) indices
        nearest = np.clip(continuous, voxel - 0.5, voxel + 0.5)
        best = min(best, float(np.linalg.norm(np.asarray(mask.TransformContinuousIndexToPhysicalPoint(nearest.tolist()))
                                              - point)))
    return best


def test_scan_space_matches_an_independent_recomputation(known_cause, benchmark_run):
    data, frame = known_cause
    settings, run_dir, summary = benchmark_run
    table = pd.read_csv(run_dir / "scan_space.csv")
    scan_space = summary["scan_space"]
    cohort = Path(scan_space["explain_dir"])
    assert scan_space["coordinates"] == "LPS" and scan_space["scans_failed"] == 0
    test = frame.set_index("nodule_id").loc[[str(i) for i in torch.load(
        settings.checkpoint, weights_only=True)["ctcdam"]["data"]["test_ids"]]]
    # Every test nodule with a sign has one row per method: CDAM and the crop centre.
    expected = {(n, "positive") for n in test.index[test["sign_spicules"].astype(bool)]}
    expected |= {(n, "negative") for n in test.index[test["sign_calcified"].astype(bool)]}
    assert expected and set(zip(table["nodule_id"], table["sign"])) == expected
    assert len(table) == 2 * len(expected) and set(table["method"]) == {"cdam", "crop_centre"}
    for row in table.to_dict("records"):
        nodule = test.loc[row["nodule_id"]]
        bundle = cohort / row["scan_id"]
        document = json.loads((bundle / "predictions.json").read_text())
        entry = next(n for n in document["nodules"] if n["nodule_id"] == row["nodule_id"])
        assert document["targets"] == ["malignancy"] and set(entry["maps"]) == {"malignancy"}
        centre = np.array([row["centre_x_lps"], row["centre_y_lps"], row["centre_z_lps"]])
        if row["method"] == "cdam":
            assert row["map_file"] == f"{row['scan_id']}/{entry['maps']['malignancy']}"
            expected_centre = _sitk_mass_centre(bundle / entry["maps"]["malignancy"], 1 if row["sign"] == "positive" else -1)
        else:  # the crop is centred on the nodule's centroid
            expected_centre = np.asarray(entry["centroid_lps"])
        np.testing.assert_allclose(centre, expected_centre, atol=1e-3)
        cause = "spicules" if row["sign"] == "positive" else "calcification"
        assert row["cause"] == cause
        distance = _sitk_distance(centre, data.manifest.parent / nodule[f"cause_{cause}_path"])
        assert row["distance_mm"] == pytest.approx(distance, abs=1e-4)
        assert bool(row["inside"]) == (distance <= 1.0)
    for sign, part in scan_space["signs"].items():
        for method, counts in part["methods"].items():
            rows = table[(table["sign"] == sign) & (table["method"] == method)]
            assert counts["n"] == len(rows) and counts["hits"] == int(rows["inside"].sum())
            assert counts["low"] <= counts["hit_rate"] <= counts["high"]
    assert (run_dir / "summary.md").read_text().count("## Scan space") == 1


def test_a_rerun_of_the_scan_space_step_keeps_the_bundles_and_one_section(benchmark_run):
    from ctcdam.workflows.known_cause import scan_space_step

    settings, run_dir, summary = benchmark_run
    again = scan_space_step(settings, settings.checkpoint, run_dir)
    assert again["scans_explained"] == 0 and io.json_safe(again["signs"]) == summary["scan_space"]["signs"]
    assert (run_dir / "summary.md").read_text().count("## Scan space") == 1
