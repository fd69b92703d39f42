"""The evaluation run (ctcdam.evaluate) and its CLI (pipelines/evaluate.py) on the tiny demo checkpoint."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ctcdam.data.transforms import InputConfig
from ctcdam.evaluate import inputs, run, summary
from ctcdam.explain.metrics import SCORE_COLUMNS
from ctcdam.models.runs import newest_checkpoint

REPO = Path(__file__).resolve().parents[1]
METHODS = ("cdam", "smooth", "attention", "random")
TARGETS = ("malignancy", "spiculation", "diameter")


def _cli():
    """pipelines/evaluate.py as a module (pipelines/ is not a package)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "pipelines" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI run on two test nodules of the demo checkpoint with four methods and three targets."""
    out = tmp_path_factory.mktemp("evaluate")
    status = _cli().main([
        "--checkpoint", str(demo_checkpoint), "--methods", ",".join(METHODS), "--targets", ",".join(TARGETS),
        "--max-nodules", "2", "--sanity-nodules", "1", "--out", str(out), "--run", "demo", "--quiet",
    ])
    assert status == 0
    return out / "demo"


def test_run_writes_every_table_and_plot(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    expected = {"metrics.csv", "class_sensitivity.csv", "sanity.csv", "curves.csv", "summary.md", "deletion_curves.png", "metrics.png"}
    assert expected <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]  # atomic writes leave no temporaries
    for png in ("deletion_curves.png", "metrics.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_table_has_one_row_per_nodule_view_method_target(run_dir: Path) -> None:
    table = pd.read_csv(run_dir / "metrics.csv")
    assert list(table.columns) == list(run.METRIC_COLUMNS)
    n_nodules = table["nodule_id"].nunique()
    assert 1 <= n_nodules <= 2
    assert len(table) == n_nodules * 3 * len(METHODS) * len(TARGETS)
    assert not table.duplicated(["nodule_id", "view", "method", "target"]).any()
    assert set(table["method"]) == set(METHODS) and set(table["target"]) == set(TARGETS)
    for column in ("correctness", "auc_mif", "auc_lif", "insertion_auc", "near_zero_share", "gini", "seconds"):
        assert np.isfinite(table[column]).all(), column
    # correctness is the LIF area minus the MIF area, row by row
    np.testing.assert_allclose(table["correctness"], table["auc_lif"] - table["auc_mif"], atol=1e-5)
    assert table["near_zero_share"].between(0, 1).all() and table["gini"].between(0, 1).all()
    # the synthetic crops have consensus masks, so localisation is NaN only for a map without positive relevance:
    # never for attention (a softmax) nor for the Gaussian random map
    located = table["localisation"].dropna()
    assert located.between(0, 1).all()
    assert table[table["method"].isin(["attention", "random"])]["localisation"].notna().all()
    assert set(table["pointing_hit"].dropna().unique()) <= {0.0, 1.0}


def test_class_sensitivity_and_sanity_tables(run_dir: Path) -> None:
    pairs = pd.read_csv(run_dir / "class_sensitivity.csv")
    n_nodules = pairs["nodule_id"].nunique()
    assert len(pairs) == n_nodules * 3 * len(METHODS) * 3  # three pairs of three targets
    attention = pairs[pairs["method"] == "attention"]["pearson"]
    np.testing.assert_allclose(attention, 1.0, atol=1e-5)  # one map for every target
    assert pairs[pairs["method"] == "cdam"]["pearson"].abs().max() < 1 - 1e-3
    sanity = pd.read_csv(run_dir / "sanity.csv")
    assert sanity["nodule_id"].nunique() == 1
    stages = list(dict.fromkeys(sanity["stage"]))
    assert stages[0] == "head" and len(stages) == 3
    # a seeded random map ignores the model entirely: it must fail the test with rho = 1 at every stage
    np.testing.assert_allclose(sanity[sanity["method"] == "random"]["spearman"], 1.0)


def test_summary_lists_every_method_with_intervals(run_dir: Path) -> None:
    text = (run_dir / "summary.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in text
    assert "## Correctness per target" in text and "## Paired differences" in text and "## Sanity" in text
    assert "**" in text  # a best value is marked
    assert " [" in text  # intervals are printed
    curves = pd.read_csv(run_dir / "curves.csv")
    assert set(curves["curve"]) == {"mif", "lif", "insertion"}
    assert np.allclose(curves[curves["share"] == 0]["mean"], 0.0)


def test_cli_help_shows_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "python pipelines/evaluate.py --max-nodules" in capsys.readouterr().out


def test_cli_refuses_bad_input_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    cli = _cli()
    assert cli.main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no outputs/train here
    assert cli.main(["--quiet"]) == 2
    assert "no checkpoint under outputs/train" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path / "x.ckpt"), "--methods", "cdam,gradcam", "--quiet"]) == 2
    assert "unknown method(s) gradcam" in capsys.readouterr().err


def test_newest_checkpoint_and_run_name(tmp_path: Path) -> None:
    older, newer = tmp_path / "a" / "best.ckpt", tmp_path / "b" / "fold-1" / "best.ckpt"
    for path in (older, newer):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    os.utime(older, (time.time() - 100, time.time() - 100))
    assert newest_checkpoint(tmp_path) == newer
    assert run.default_run_name(newer) == "b-fold-1"
    assert run.default_run_name(older) == "a"


def test_mask_tokens_follow_the_image_resize_and_the_dilation() -> None:
    """A 16 mm crop at 1 mm, 32 px input, 8 px tokens: each token covers 4 x 4 voxels of a slice."""
    mask = np.zeros((16, 16, 16), dtype=np.uint8)
    mask[4:12, 4:12, 4:12] = 1  # an 8 mm cube: exactly the central 2 x 2 tokens of each view
    config = InputConfig(img_size=32)
    views = ("axial", "coronal", "sagittal")
    inside = inputs.mask_tokens(mask, (1.0, 1.0, 1.0), views, config, (4, 4), dilation_mm=0.0)
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, 1:3] = True
    for view in inside:
        np.testing.assert_array_equal(view.numpy(), expected)
    # grown by a 3 mm ball: 3 of the 4 voxel rows of each edge token (overlap 0.75, inside), while the rounded
    # corner reaches 4 of the 16 voxels of each corner token (0.25, outside)
    grown = inputs.mask_tokens(mask, (1.0, 1.0, 1.0), views, config, (4, 4), dilation_mm=3.0)
    corners = np.zeros((4, 4), dtype=bool)
    corners[[0, 0, 3, 3], [0, 3, 0, 3]] = True
    for view in grown:
        np.testing.assert_array_equal(view.numpy(), ~corners)


def test_confidence_interval_is_the_student_t_interval() -> None:
    values = [0.1, 0.4, 0.35, 0.8, float("nan")]
    mean, low, high, n = summary.confidence_interval(values)
    finite = np.array(values[:4])
    expected = stats.t.interval(0.95, 3, loc=finite.mean(), scale=stats.sem(finite))
    assert n == 4 and mean == pytest.approx(finite.mean())
    assert (low, high) == pytest.approx(expected)
    assert np.isnan(summary.confidence_interval([1.0])[1])
    # a share cannot leave [0, 1]: the interval of a few hits and misses is clipped there
    _, low, high, _ = summary.confidence_interval([1.0, 1.0, 0.0], bounds=(0.0, 1.0))
    assert (low, high) == (0.0, 1.0)


def test_best_method_respects_direction_and_skips_the_control() -> None:
    rows = []
    for nodule in ("n1", "n2", "n3"):
        for method, correctness, seconds in (("cdam", 2.0, 0.5), ("attention", 1.0, 0.1), ("random", 5.0, 0.01)):
            row = {"scan_id": "s", "nodule_id": nodule, "view": "axial", "method": method, "target": "malignancy"}
            row.update({c: 0.5 for c in SCORE_COLUMNS})
            row.update(correctness=correctness + (0.1 if nodule == "n1" else 0.0), seconds=seconds)
            rows.append(row)
    frame = pd.DataFrame(rows)
    table = summary.method_table(frame, pd.DataFrame(), pd.DataFrame())
    assert summary.best_methods(table, "correctness") == {"cdam"}  # random is higher but is the control
    assert summary.best_methods(table, "seconds") == {"attention"}  # lower is better
    differences = summary.paired_differences(frame, ("correctness",))
    cdam_vs_attention = differences[(differences["variant"] == "cdam") & (differences["other"] == "attention")]
    assert cdam_vs_attention["mean"].item() == pytest.approx(1.0)


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown view"):
        run.EvaluationConfig(checkpoint=tmp_path / "x.ckpt", views=("oblique",))
    with pytest.raises(ValueError, match="unknown target"):
        run.EvaluationConfig(checkpoint=tmp_path / "x.ckpt", targets=("size",))
    with pytest.raises(ValueError, match="max_nodules"):
        run.EvaluationConfig(checkpoint=tmp_path / "x.ckpt", max_nodules=0)



def test_warm_up_reports_a_failing_method(caplog: pytest.LogCaptureFixture) -> None:
    """A method that cannot run is logged at warm-up (the timed run then records it), never silently dropped."""
    from tests.fixtures_explain import images_for, tiny_vit

    model = tiny_vit()
    config = run.EvaluationConfig(checkpoint=Path("unused.ckpt"), methods=("cdam", "integrated"),
                                  targets=("malignancy",), method_options={"integrated": {"steps": 1}})
    with caplog.at_level("WARNING", logger=run.__name__):
        run.warm_up(model, images_for(model, batch=1), config)
    assert [r.getMessage() for r in caplog.records] == [
        "warm-up of method integrated failed: integrated CDAM needs steps >= 2 (it averages k = 1..steps-1), got 1"
    ]
    with pytest.raises(ValueError, match="method cdam has no option"):
        run.EvaluationConfig(checkpoint=Path("unused.ckpt"), methods=("cdam",), method_options={"cdam": {"samples": 3}})


def test_default_methods_come_from_the_registry() -> None:
    from ctcdam.explain import list_methods

    assert sorted(run.DEFAULT_METHODS) == list_methods()
    assert run.DEFAULT_METHODS[:3] == ("cdam", "smooth", "integrated") and run.DEFAULT_METHODS[-1] == "random"
