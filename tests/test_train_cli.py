"""The training CLI end to end with a tiny ViT: outputs, metrics, determinism, folds, weights file, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
from sklearn.metrics import roc_auc_score

from ctcdam import io
from ctcdam.models.checkpoint import load_for_inference
from ctcdam.models.module import warmup_pct
from ctcdam.workflows.train import config_dir, head_cache_speedup, pool_folds, resolve_config_args, with_default_config
from ctcdam.targets import BIOMARKERS
from tests.fixtures_models import tiny_train_args, train_tiny

REPO = Path(__file__).resolve().parents[1]


def test_run_writes_checkpoint_metrics_and_figures(tiny_run: dict):
    run_dir = Path(tiny_run["run_dir"])
    for name in ("best.ckpt", "metrics.json", "metrics.csv", "predictions.csv", "roc.png", "training_curves.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["fold"] == 0 and record["seed"] == 42 and Path(record["checkpoint"]) == run_dir / "best.ckpt"
    test = record["test"]
    assert {"auroc", "accuracy", "sensitivity", "specificity", "diameter_auroc", "n", "biomarkers"} <= set(test)
    assert set(test["biomarkers"]) == set(BIOMARKERS)
    for values in test["biomarkers"].values():
        assert {"rmse", "mae", "pearson_r", "baseline_rmse"} <= set(values)
    log = pd.read_csv(run_dir / "metrics.csv")
    assert {"train/loss", "val/loss", "epoch"} <= set(log.columns)


def test_metrics_agree_with_an_independent_computation(tiny_run: dict):
    run_dir = Path(tiny_run["run_dir"])
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    predictions = pd.read_csv(run_dir / "predictions.csv")
    loaded = load_for_inference(run_dir / "best.ckpt")
    assert sorted(predictions["nodule_id"]) == sorted(loaded.data["test_ids"])
    labelled = predictions.dropna(subset=["label"])
    assert test["n"] == len(labelled)
    assert test["auroc"] == pytest.approx(roc_auc_score(labelled["label"], labelled["probability"]))
    assert test["diameter_auroc"] == pytest.approx(roc_auc_score(labelled["label"], labelled["true_diameter"]))
    predicted = (labelled["probability"] >= 0.5).astype(int)
    assert test["accuracy"] == pytest.approx((predicted == labelled["label"]).mean())
    d = BIOMARKERS.index("diameter")
    error = predictions["pred_diameter"] - predictions["true_diameter"]
    assert test["biomarkers"]["diameter"]["rmse"] == pytest.approx(np.sqrt((error**2).mean()))
    baseline = predictions["true_diameter"] - loaded.scaler.mean[d]  # the training mean of this fold
    assert test["biomarkers"]["diameter"]["baseline_rmse"] == pytest.approx(np.sqrt((baseline**2).mean()))


def test_same_seed_gives_the_same_metrics(tiny_run: dict, blob_manifest: Path, tmp_path: Path):
    again = train_tiny(blob_manifest, tmp_path, "again")
    assert again["test"] == tiny_run["test"]
    first = pd.read_csv(Path(tiny_run["run_dir"]) / "predictions.csv")
    second = pd.read_csv(Path(again["run_dir"]) / "predictions.csv")
    pd.testing.assert_frame_equal(first, second)


def test_print_config_shows_demo_defaults_and_lidc_config(capsys):
    from ctcdam.workflows.train import main

    with pytest.raises(SystemExit) as done:
        main(["--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "backbone: vit_tiny_patch16_224" in printed and "weights: none" in printed and "finetune: full" in printed
    with pytest.raises(SystemExit):
        main(["--config", str(REPO / "configs" / "lidc.yaml"), "--model.lr=0.01", "--print_config"])
    printed = capsys.readouterr().out
    assert "backbone: vit_small_patch8_224.dino" in printed and "img_size: 224" in printed and "lr: 0.01" in printed
    # the pipelines' flags, and the older LightningCLI names as aliases of them
    with pytest.raises(SystemExit):
        main(["--output_dir=runs", "--run_name=r1", "--torch_threads=2", "--device=cpu", "--print_config"])
    printed = capsys.readouterr().out
    assert "\nout: runs\n" in printed and "\nrun: r1\n" in printed and "\nthreads: 2\n" in printed and "device: cpu" in printed


def test_all_folds_head_mode_from_a_weight_file(blob_manifest: Path, tmp_path: Path):
    # a timm-format weight file of the tiny ViT, used through the file option; head mode must keep it frozen
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    record = train_tiny(
        blob_manifest, tmp_path, "folds",
        [f"--model.weights={weights}", "--model.finetune=head", "--data.fold=all", "--data.n_folds=2"],
    )
    run_dir = tmp_path / "folds"
    assert record["fold"] == "all" and len(record["folds"]) == 2
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["n"] == record["test"]["n"]
    pooled = pd.read_csv(run_dir / "predictions.csv")
    assert len(pooled) == len(pd.read_csv(blob_manifest)) and pooled["nodule_id"].is_unique
    assert record["test"]["n"] == sum(f["test"]["n"] for f in record["folds"])
    # the pooling step on its own (as after a SLURM array of single folds) rewrites the same pooled metrics
    pooled_record = json.loads((run_dir / "metrics.json").read_text())
    assert pool_folds(run_dir) == pooled_record
    assert json.loads((run_dir / "metrics.json").read_text()) == pooled_record
    for k, fold in enumerate(record["folds"]):
        assert Path(fold["checkpoint"]) == run_dir / f"fold-{k}" / "best.ckpt"
        loaded = load_for_inference(fold["checkpoint"])
        assert loaded.config["weights"] == str(weights) and loaded.data["fold"] == k
        for key in ("blocks.1.attn.qkv.weight", "pos_embed", "cls_token"):
            assert torch.equal(loaded.model.state_dict()[key], source.state_dict()[key]), key
        cache = fold["embedding_cache"]
        assert cache["train"]["misses"] > 0 and cache["val"]["hits"] > 0  # epoch 2 reuses the validation embeddings


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_the_same_metrics_format(tiny_run: dict, blob_manifest: Path, tmp_path: Path):
    args = tiny_train_args(blob_manifest, tmp_path, "ddp", ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single = tiny_run["test"]
    assert set(record["test"]) == set(single) and set(record["test"]["biomarkers"]) == set(single["biomarkers"])
    # the distributed sampler pads with repeated rows; the gathered test set still has each nodule once
    assert record["test"]["n"] == single["n"] and record["test"]["n_nodules"] == single["n_nodules"]
    predictions = pd.read_csv(tmp_path / "ddp" / "predictions.csv")
    assert predictions["nodule_id"].is_unique
    assert load_for_inference(record["checkpoint"]).data["test_ids"] == load_for_inference(tiny_run["checkpoint"]).data["test_ids"]


def test_demo_checkpoint_is_trained_on_the_synthetic_manifest(demo_checkpoint: Path, synthetic_manifest):
    out_dir, frame = synthetic_manifest
    loaded = load_for_inference(demo_checkpoint)
    ids = loaded.data["train_ids"] + loaded.data["val_ids"] + loaded.data["test_ids"]
    assert sorted(ids) == sorted(frame["nodule_id"].astype(str)) and loaded.data["test_ids"]
    assert Path(loaded.data["manifest"]) == (Path(out_dir) / "manifest.csv").resolve()
    assert loaded.config["crop_shape"] == [32, 32, 32]


def test_a_killed_run_resumes_from_its_last_checkpoint(blob_manifest: Path, tmp_path: Path):
    # A real SIGKILL at a fixed point: ctcdam.io's fault injection kills the process at its 5th write point.
    # Each checkpoint has two (temporary complete, published); epoch 0 publishes best.ckpt and last.ckpt
    # (points 1-4), so the kill lands inside epoch 1's first checkpoint write, after last.ckpt appeared.
    args = tiny_train_args(blob_manifest, tmp_path, "killed", ["--trainer.max_epochs=4"])
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        io.FAULT_COUNTER_ENV: str(tmp_path / "writes"), io.FAULT_AT_ENV: "5",
    }
    killed = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=400,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "killed"
    last = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)  # complete: written atomically
    assert last["epoch"] == 0 and not (run_dir / "metrics.json").exists()
    assert [p for p in run_dir.iterdir() if io.is_temporary(p)]  # the write the kill cut off

    record = train_tiny(blob_manifest, tmp_path, "killed", ["--trainer.max_epochs=4", "--ckpt_path=last"])
    assert record["resumed_from"] == {"checkpoint": str((run_dir / "last.ckpt").resolve()), "epoch": 0}
    assert record["epochs"] == 4 and Path(record["checkpoint"]) == run_dir / "best.ckpt"
    # it continued after the checkpoint's epoch: this process trained epochs 1-3 only, not 0-3
    log = pd.read_csv(run_dir / "metrics.csv")
    assert log.dropna(subset=["train/loss"])["epoch"].astype(int).tolist() == [1, 2, 3]
    final = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["epoch"] == record["epochs"] and final["global_step"] == 4 * last["global_step"]  # 4 epochs of steps
    for name in ("best.ckpt", "metrics.json", "predictions.csv", "roc.png", "training_curves.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert not [p for p in run_dir.iterdir() if io.is_temporary(p)]
    assert sorted(pd.read_csv(run_dir / "predictions.csv")["nodule_id"]) == sorted(load_for_inference(run_dir / "best.ckpt").data["test_ids"])


def test_resume_needs_a_named_run(blob_manifest: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="--ckpt_path last continues an earlier run: name its folder with --run"):
        train_tiny(blob_manifest, tmp_path, "x", ["--ckpt_path=last", "--run=null"])


def test_configs_ship_with_the_package_and_resolve_by_name():
    assert (config_dir() / "demo.yaml").is_file() and (config_dir() / "lidc.yaml").is_file()
    assert with_default_config(["--model.lr=0.1"]) == ["--config", str(config_dir() / "demo.yaml"), "--model.lr=0.1"]
    lidc = str(config_dir() / "lidc.yaml")
    assert resolve_config_args(["--config", "configs/lidc.yaml"]) == ["--config", lidc]
    assert resolve_config_args(["--config=lidc"]) == [f"--config={lidc}"]
    assert resolve_config_args(["--config", "no/such.yaml"]) == ["--config", "no/such.yaml"]  # jsonargparse says so


def test_a_one_step_warmup_does_not_divide_by_zero():
    assert warmup_pct(0.1, 10) == 0.2 and warmup_pct(1.0, 1) == 0.5
    assert warmup_pct(0.1, 4) == 0.1 and warmup_pct(0.1, 30) == 0.1  # every other case is untouched
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=10, pct_start=warmup_pct(0.1, 10))


def test_head_cache_benchmark_runs_both_modes(blob_manifest: Path, capsys):
    data = head_cache_speedup(
        blob_manifest, model="vit_tiny_patch16_224", img_size=32, epochs=2, batch_size=8, extra_args=("--data.n_folds=3",)
    )
    assert data["fit_seconds_cached"] > 0 and data["fit_seconds_uncached"] > 0 and data["speedup"] > 0
    assert data["cache"]["val"]["hits"] > 0  # epoch 2 reuses the validation embeddings
    assert data["epochs"] == 2 and set(data["cache"]) == {"train", "val", "test"}
    assert "test malignancy AUROC" not in capsys.readouterr().out  # the runs' summaries went to stderr
