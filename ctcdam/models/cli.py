"""The training CLI (LightningCLI): one fold or all folds, each fit then tested on its held-out fold, outputs per run.

Outputs of a run ``<output_dir>/<run_name>/`` (per fold ``fold-<k>/`` when ``--data.fold all``):
``best.ckpt`` (selected on the validation part, never on the test fold), ``metrics.json``, ``metrics.csv``
(Lightning's per-epoch log), ``predictions.csv``, ``roc.png``, ``training_curves.png``, ``config.yaml``.
With all folds, the run folder also gets the pooled ``metrics.json``, ``predictions.csv`` and ``roc.png``.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from rich.logging import RichHandler

from ctcdam import io
from ctcdam.data.datamodule import NoduleDataModule
from ctcdam.models.metrics import evaluation_metrics
from ctcdam.models.module import NoduleModule
from ctcdam.models.report import plot_roc, plot_training_curves

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
#: DDP children re-run the script; they take the run name chosen by rank 0 from this variable.
RUN_NAME_ENV = "CTCDAM_RUN_NAME"
CHECKPOINT_NAME = "best"
MONITOR = "val/loss"


class TrainCLI(LightningCLI):
    """LightningCLI for NoduleModule + NoduleDataModule with run naming, fold handling and fixed outputs."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name (default: <config>-<time>)")
        parser.add_argument("--output_dir", type=str, default="outputs/train", help="parent folder of the runs")
        parser.add_argument(
            "--torch_threads", type=int | None, default=None, help="torch intra-op CPU threads (default: torch's choice)"
        )
        # the model owns its input contract (size, window, normalisation); the data renders slices for it
        parser.link_arguments("model.input_config", "data.input_config", apply_on="instantiate")
        parser.link_arguments("model.uses_embedding_cache", "data.embedding_cache", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        threads = self.config.get("torch_threads")
        if threads is not None:
            torch.set_num_threads(threads)
        self.run_dir = self._run_dir()

    def _run_dir(self) -> Path:
        config = self.config
        name = config.get("run_name")
        if name is None and os.environ.get("LOCAL_RANK", "0") != "0":
            name = os.environ.get(RUN_NAME_ENV)
        if name is None:
            files = [Path(str(p)) for p in (config.get("config") or []) if p is not None]
            stem = files[-1].stem if files else "run"
            name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            base = Path(config["output_dir"]) / name
            suffix = 2
            while base.exists():
                base = Path(config["output_dir"]) / f"{name}-{suffix}"
                suffix += 1
            name = base.name
        os.environ[RUN_NAME_ENV] = name
        return Path(config["output_dir"]) / name

    def fold_dir(self) -> Path:
        """Output folder of the fold being run (the run folder itself for a single fold)."""
        fold = getattr(self, "current_fold", None)
        return self.run_dir / f"fold-{fold}" if getattr(self, "all_folds", False) else self.run_dir

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        out = self.fold_dir()
        trainer_config = self._get(self.config_init, "trainer", default={})
        # kwargs replace config values in LightningCLI, so the configured callbacks are kept explicitly
        callbacks = list(trainer_config.get("callbacks") or [])
        # selection on the validation part (carved from the training folds), never on the test fold
        self.best_checkpoint = ModelCheckpoint(dirpath=out, filename=CHECKPOINT_NAME, monitor=MONITOR, mode="min", save_top_k=1)
        callbacks.append(self.best_checkpoint)
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.append(RichProgressBar())
        kwargs["callbacks"] = callbacks + list(kwargs.get("callbacks") or [])
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = CSVLogger(save_dir=out, name="", version="")
        if trainer_config.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(out)
        return super().instantiate_trainer(**kwargs)


def _summary(model: NoduleModule, checkpoint: str, fold: int, seed: Any, extra: dict[str, Any]) -> dict[str, Any]:
    return {"test": model.test_metrics, "fold": fold, "seed": seed, "checkpoint": checkpoint, **extra}


def _run_one_fold(cli: TrainCLI, fold: int) -> tuple[dict[str, Any], pd.DataFrame | None]:
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    seed = cli.config.get("seed_everything")
    out = cli.fold_dir()
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started
    checkpoint = cli.best_checkpoint.best_model_path
    if not checkpoint:
        raise RuntimeError(f"fold {fold}: no checkpoint was written (did validation run? see {out})")
    started = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    test_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}, None
    caches = {stage: {"entries": len(c), "hits": c.hits, "misses": c.misses} for stage, c in model.caches.items()}
    record = _summary(
        model,
        str(Path(checkpoint).resolve()),
        fold,
        seed,
        {
            "n_folds": datamodule.n_folds,
            "run_dir": str(out.resolve()),
            "data": {k: v for k, v in datamodule.record().items() if not k.endswith("_ids")},
            "best_val_loss": float(cli.best_checkpoint.best_model_score),
            "epochs": int(trainer.current_epoch),
            "seconds": {"fit": round(fit_seconds, 2), "test": round(test_seconds, 2)},
            "embedding_cache": caches,
        },
    )
    predictions = model.test_predictions.assign(fold=fold)
    io.write_json(out / "metrics.json", record)
    io.write_csv(out / "predictions.csv", predictions)
    plot_roc(predictions, out / "roc.png", title=f"fold {fold}")
    if (out / "metrics.csv").is_file():
        plot_training_curves(out / "metrics.csv", out / "training_curves.png")
    _print_summary(record)
    return record, predictions


def _print_summary(record: dict[str, Any]) -> None:
    test = record["test"]

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"fold {record['fold']}: test malignancy AUROC {fmt(test['auroc'])} (diameter only {fmt(test['diameter_auroc'])}), "
        f"accuracy {fmt(test['accuracy'])}, sensitivity {fmt(test['sensitivity'])}, specificity {fmt(test['specificity'])}, "
        f"n={test['n']}",
        "  biomarker        RMSE (baseline)     MAE (baseline)   Pearson r",
    ]
    for name, m in test["biomarkers"].items():
        lines.append(
            f"  {name:<14} {fmt(m['rmse']):>7} ({fmt(m['baseline_rmse'])})   {fmt(m['mae']):>7} ({fmt(m['baseline_mae'])})   "
            f"{fmt(m['pearson_r'])}"
        )
    lines.append(f"  checkpoint {record['checkpoint']}")
    print("\n".join(lines), flush=True)


def run(cli: TrainCLI) -> dict[str, Any]:
    """Train and test the configured fold, or every fold one after another (pooled metrics at the end)."""
    fold = cli.config["data"]["fold"]
    cli.all_folds = fold == "all"
    n_folds = int(cli.config["data"]["n_folds"])
    folds = list(range(n_folds)) if cli.all_folds else [int(fold)]
    seed = cli.config.get("seed_everything")
    records, tables = [], []
    for k in folds:
        cli.current_fold = k
        if cli.all_folds:
            cli.config["data"]["fold"] = k
            if seed is not None and seed is not False:
                pl.seed_everything(seed, workers=True)  # fold k of "all" equals a run with --data.fold k
            cli.instantiate_classes()
        record, table = _run_one_fold(cli, k)
        records.append(record)
        tables.append(table)
    if not cli.all_folds or not cli.trainer.is_global_zero:
        return records[0]
    pooled = pd.concat(tables, ignore_index=True)
    aurocs = [r["test"]["auroc"] for r in records if r["test"]["auroc"] is not None]
    summary = {
        "test": evaluation_metrics(pooled),
        "fold": "all",
        "seed": seed,
        "checkpoint": [r["checkpoint"] for r in records],
        "folds": records,
        "auroc_mean": float(np.mean(aurocs)) if aurocs else None,
        "auroc_sd": float(np.std(aurocs, ddof=1)) if len(aurocs) > 1 else None,
    }
    io.write_json(cli.run_dir / "metrics.json", summary)
    io.write_csv(cli.run_dir / "predictions.csv", pooled)
    plot_roc(pooled, cli.run_dir / "roc.png", title="pooled over folds")
    print(f"pooled over {len(folds)} folds:", flush=True)
    _print_summary({**summary, "fold": "all", "checkpoint": str(cli.run_dir)})
    return summary


def with_default_config(args: Sequence[str]) -> list[str]:
    """Prepend ``--config configs/demo.yaml`` when no config file is given (the synthetic default run)."""
    args = list(args)
    if not any(a == "--config" or a.startswith("--config=") for a in args) and not {"-h", "--help"} & set(args):
        args = ["--config", str(DEFAULT_CONFIG), *args]
    return args


def main(args: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Entry point of pipelines/train.py; returns the metrics record (None for --print_config / --help)."""
    argv = with_default_config(sys.argv[1:] if args is None else args)
    package_log = logging.getLogger("ctcdam")
    if args is None and not package_log.handlers:
        # as a script: show ctcdam's progress lines (data generation, preprocessing) beside Lightning's own
        package_log.addHandler(RichHandler(show_path=False))
        package_log.setLevel(logging.INFO)
    threads = torch.get_num_threads()  # --torch_threads applies to this run only (in-process callers keep theirs)
    with warnings.catch_warnings():
        # the run folder also holds the logger's files and config.yaml, which Lightning flags for checkpoint folders
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        # argv is sys.argv (with the default config prepended) or the caller's own list, never both
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
        try:
            cli = TrainCLI(
                NoduleModule,
                NoduleDataModule,
                run=False,
                args=argv,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
            )
            return run(cli)
        finally:
            torch.set_num_threads(threads)
