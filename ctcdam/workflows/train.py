"""The training run behind pipelines/train.py (LightningCLI): one fold per run, then :func:`pool_folds` over the folds.

A run ``<out>/<run>/`` (``--out`` default ``outputs/train``, ``--run`` default ``<config>-<time>``) holds
``best.ckpt`` (selected on the validation part, never on the test fold), ``last.ckpt`` (for resuming),
``metrics.json``, ``metrics.csv`` (Lightning's per-epoch log), ``predictions.csv``, ``roc.png``,
``training_curves.png`` and ``config.yaml``.

``--data.fold all`` runs every fold as its own fresh CLI into ``<run>/fold-<k>/`` (the same as a shell loop or
SLURM array of ``--data.fold k --run <run>/fold-k``), then :func:`pool_folds` writes the pooled ``metrics.json``,
``predictions.csv`` and ``roc.png`` into the run folder (``train.py --pool <run folder>`` does it on its own).

A killed run continues with the same command plus ``--run <name> --ckpt_path last``: Lightning restores the
weights, optimizer, scheduler and loop state from ``last.ckpt`` and trains on from the epoch after it.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from argparse import ArgumentError, ArgumentTypeError, RawDescriptionHelpFormatter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO

from ctcdam import io
from ctcdam.cli.common import device_name, report_error
from ctcdam.data.datamodule import NoduleDataModule
from ctcdam.models.backbone import WeightsUnavailableError
from ctcdam.models.callbacks import AtomicCheckpointIO, NoduleRecord, TestPredictionWriter
from ctcdam.models.metrics import evaluation_metrics
from ctcdam.models.module import NoduleModule
from ctcdam.models.report import plot_roc, plot_training_curves

log = logging.getLogger(__name__)

PROG = "train.py"
DESCRIPTION = "Train and test a nodule ViT (malignancy + 8 biomarkers) on one fold or all folds (LightningCLI)."
EXAMPLES = """\
examples:
  python pipelines/train.py                                   # synthetic default, the shipped configs/demo.yaml
  python pipelines/train.py --config configs/lidc.yaml        # real LIDC (DINO ViT-S/8, head fine-tuning)
  python pipelines/train.py --data.fold all                   # every fold into <run>/fold-<k>/, pooled metrics
  python pipelines/train.py --model.finetune full --trainer.max_epochs 5 --run try1
  python pipelines/train.py --run try1 --ckpt_path last       # continue a killed run from its last.ckpt
  python pipelines/train.py --data.fold 3 --run cv/fold-3     # one fold (a SLURM array task), then:
  python pipelines/train.py --pool outputs/train/cv           #   pool the finished cv/fold-<k>/ runs
  python pipelines/train.py --print_config                    # the resolved configuration
  python pipelines/train.py --trainer.devices 2 --trainer.strategy ddp   # DDP (SLURM: srun ...)

Outputs: <out>/<run>/ (default outputs/train/<config>-<time>/) with best.ckpt, last.ckpt, metrics.json,
metrics.csv, predictions.csv, roc.png, training_curves.png and config.yaml. Exit status: 0 done, 2 a bad
argument or input (one sentence), 1 an unexpected failure.
"""
DEFAULT_CONFIG = "demo.yaml"
CHECKPOINT_NAME = "best"
LAST_CHECKPOINT = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
MONITOR = "val/loss"
#: Loggers that -v/-q set for the run (main() restores them: in-process callers keep theirs).
_LOGGERS = ("ctcdam", "lightning.pytorch", "lightning.fabric")
#: Bad arguments or inputs: one sentence and exit 2 (anything else is an unexpected failure, exit 1).
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError, ValueError, FileNotFoundError, WeightsUnavailableError, MisconfigurationException, io.OutputError,
)


# -- configs shipped with the package --------------------------------------------------------------------
def config_dir() -> Path:
    """The folder of the YAML configs that ship inside the package (``ctcdam/configs``)."""
    return Path(str(importlib.resources.files("ctcdam") / "configs"))


def shipped_config(name: str) -> Path | None:
    """The shipped config that `name` means (``lidc``, ``lidc.yaml``, ``configs/lidc.yaml``), or None."""
    stem = Path(name).name
    for candidate in (stem, f"{stem}.yaml"):
        path = config_dir() / candidate
        if path.is_file():
            return path
    return None


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Let ``--config`` name a shipped config when no such file exists (``configs/lidc.yaml`` from any folder)."""
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in ("-c", "--config"):
            continue
        if eq:
            if not Path(value).exists() and (path := shipped_config(value)) is not None:
                out[i] = f"{flag}={path}"
        elif i + 1 < len(out) and not Path(out[i + 1]).exists() and (path := shipped_config(out[i + 1])) is not None:
            out[i + 1] = str(path)
    return out


def with_default_config(args: Sequence[str]) -> list[str]:
    """Prepend the shipped ``demo.yaml`` when no config file is given (the synthetic default run)."""
    args = list(args)
    if not any(a in ("-c", "--config") or a.startswith(("--config=", "-c=")) for a in args) and not {"-h", "--help"} & set(args):
        args = ["--config", str(config_dir() / DEFAULT_CONFIG), *args]
    return args


def new_run_name(out: Path, stem: str) -> str:
    """``<stem>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... when a folder of that name exists under `out`."""
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, suffix = name, 2
    while (out / candidate).exists():
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return candidate


def _accelerator(device: str) -> dict[str, Any]:
    """Trainer settings for a ``--device`` name, the vocabulary of the other pipelines (cuda:N selects that GPU)."""
    try:
        device_name(device)
    except ArgumentTypeError as error:
        raise ValueError(f"--device: {error}") from None
    kind, _, index = device.partition(":")
    accelerator = {"cuda": "gpu"}.get(kind, kind)
    return {"accelerator": accelerator, **({"devices": [int(index)]} if index else {})}


class TrainCLI(LightningCLI):
    """LightningCLI for NoduleModule + NoduleDataModule with the pipelines' flags and a fixed run folder.

    Flags beside Lightning's own: ``--out`` (alias ``--output_dir``), ``--run`` (``--run_name``), ``--ckpt_path``,
    ``--threads`` (``--torch_threads``), ``--device`` (sets ``trainer.accelerator``/``devices``), ``-v``/``-q``.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--out", "--output_dir", type=str, default="outputs/train", help="parent folder of the runs")
        parser.add_argument(
            "--run", "--run_name", type=str | None, default=None,
            help="run folder name under --out (default: <config>-<time>); reuse it with --ckpt_path last to resume",
        )
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="resume fit from a checkpoint: 'last' (the run's last.ckpt; needs --run) or a path",
        )
        parser.add_argument(
            "--threads", "--torch_threads", type=int | None, default=None,
            help="torch intra-op CPU threads (default: torch's choice)",
        )
        parser.add_argument(
            "--device", type=str | None, default=None,
            help="auto, cpu, cuda, cuda:N or mps: sets trainer.accelerator (and devices for cuda:N)",
        )
        parser.add_argument("-v", "--verbose", action="store_true", help="debug log lines of ctcdam")
        parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar or model summary")
        # the model owns its input contract (size, window, normalisation); the data renders slices for it
        parser.link_arguments("model.input_config", "data.input_config", apply_on="instantiate")
        parser.link_arguments("model.uses_embedding_cache", "data.embedding_cache", apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check the pipeline flags before anything runs (seeding logs a line; instantiation is slow)."""
        super().parse_arguments(parser, args)
        config = self.config
        if config.ckpt_path == "last" and config.run is None:
            raise ValueError("--ckpt_path last continues an earlier run: name its folder with --run")
        if config.threads is not None and config.threads < 1:
            raise ValueError(f"--threads must be a positive number, got {config.threads}")
        self._device_settings = {} if config.device is None else _accelerator(config.device)

    def before_instantiate_classes(self) -> None:
        config = self.config
        for key, value in self._device_settings.items():
            config.trainer[key] = value
        if config.quiet:
            config.trainer.enable_progress_bar = False
            config.trainer.enable_model_summary = False
        self._set_log_levels(config.verbose, config.quiet)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if config.data.manifest is None:
            # the synthetic default, generated and preprocessed once (resume-safe); DDP ranks > 0 start at fit,
            # after rank 0 has finished this, and find it done
            from ctcdam.workflows.defaults import ensure_default_data  # deferred: pylidc and the DICOM writer

            config.data.manifest = str(ensure_default_data().manifest)
        files = [Path(str(p)) for p in (config.get("config") or []) if p is not None]
        out = Path(config.out)
        # rank 0 names the run; ranks > 0 of a DDP launch get every folder from it through Lightning's broadcast
        # (ModelCheckpoint.setup, trainer.log_dir), and only rank 0 writes into the run folder
        self.run_dir = out / (config.run or new_run_name(out, files[-1].stem if files else "run"))
        self.predictions = TestPredictionWriter(self.run_dir, columns={"fold": config.data.fold})
        self.best_checkpoint = ModelCheckpoint(
            dirpath=self.run_dir, filename=CHECKPOINT_NAME, monitor=MONITOR, mode="min", save_top_k=1, save_last=True
        )
        # persistent callbacks (LightningCLI's trainer_defaults), set here because they write into the run folder
        progress = [RichProgressBar()] if config.trainer.enable_progress_bar is not False else []
        self.trainer_defaults["callbacks"] = [NoduleRecord(), self.predictions, self.best_checkpoint, *progress]

    @staticmethod
    def _set_log_levels(verbose: bool, quiet: bool) -> None:
        if verbose:
            logging.getLogger("ctcdam").setLevel(logging.DEBUG)
        if quiet:
            for name in _LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, logging into the run folder unless a logger or root folder is configured."""
        trainer_config = self.config.trainer
        if trainer_config.logger in (None, True):
            kwargs.setdefault("logger", CSVLogger(save_dir=self.run_dir, name="", version=""))
        if trainer_config.default_root_dir is None:
            kwargs.setdefault("default_root_dir", str(self.run_dir))
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # a kill mid-save must leave the previous last.ckpt readable, or --ckpt_path last cannot resume
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _checkpoint_epoch(path: Path) -> int:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["epoch"])


def _resume_path(cli: TrainCLI) -> Path | None:
    """The checkpoint that ``--ckpt_path`` names: ``last`` is the run folder's last.ckpt (None when there is none)."""
    ckpt_path = cli.config.ckpt_path
    if ckpt_path is None:
        return None
    path = cli.run_dir / LAST_CHECKPOINT if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path == "last" and not path.is_file():
        log.warning("no %s in %s yet: the run starts from epoch 0", LAST_CHECKPOINT, cli.run_dir)
        return None
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} (--ckpt_path) does not exist")
    return path


def run_fold(cli: TrainCLI) -> dict[str, Any]:
    """Fit and test the configured fold; writes the run folder and returns its metrics record (rank 0; ``{}`` elsewhere)."""
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    fold = int(cli.config.data.fold)
    out = cli.run_dir
    if trainer.is_global_zero:
        io.remove_stale_temporaries(out)  # a checkpoint cut off mid-write by a kill
    resume = _resume_path(cli)
    # read before fit: the run overwrites last.ckpt at every epoch
    resumed_from = None if resume is None else {"checkpoint": str(resume.resolve()), "epoch": _checkpoint_epoch(resume)}
    started = time.perf_counter()
    with warnings.catch_warnings():
        # the run folder also holds the logger's files and config.yaml, which Lightning flags for checkpoint folders
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(model, datamodule=datamodule, ckpt_path=None if resume is None else str(resume))
    fit_seconds = time.perf_counter() - started
    checkpoint = cli.best_checkpoint.best_model_path
    if not checkpoint:
        raise RuntimeError(f"fold {fold}: no checkpoint was written (did validation run? see {out})")
    started = time.perf_counter()
    trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    test_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    caches = {stage: {"entries": len(c), "hits": c.hits, "misses": c.misses} for stage, c in model.caches.items()}
    record = {
        "test": cli.predictions.metrics,
        "fold": fold,
        "seed": cli.config.get("seed_everything"),
        "checkpoint": str(Path(checkpoint).resolve()),
        "n_folds": datamodule.n_folds,
        "run_dir": str(out.resolve()),
        "data": {k: v for k, v in datamodule.record().items() if not k.endswith("_ids")},
        "best_val_loss": float(cli.best_checkpoint.best_model_score),
        "epochs": int(trainer.current_epoch),
        "resumed_from": resumed_from,
        "seconds": {"fit": round(fit_seconds, 2), "test": round(test_seconds, 2)},
        "embedding_cache": caches,
    }
    io.write_json(out / "metrics.json", record)
    plot_roc(cli.predictions.predictions, out / "roc.png", title=f"fold {fold}")
    if (out / "metrics.csv").is_file():
        plot_training_curves(out / "metrics.csv", out / "training_curves.png")
    _print_summary(record)
    return record


def _fold_number(folder: Path) -> int:
    match = re.fullmatch(r"fold-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def pool_folds(run_dir: str | Path) -> dict[str, Any]:
    """Pool the finished ``fold-<k>/`` runs of `run_dir`: writes its metrics.json, predictions.csv and roc.png."""
    run_dir = Path(run_dir)
    folds = sorted((p for p in run_dir.glob("fold-*") if _fold_number(p) >= 0), key=_fold_number)
    finished = [p for p in folds if (p / "metrics.json").is_file() and (p / "predictions.csv").is_file()]
    if not finished:
        raise FileNotFoundError(f"no finished fold-<k>/ runs (metrics.json + predictions.csv) under {run_dir}")
    if len(finished) < len(folds):
        missing = ", ".join(p.name for p in folds if p not in finished)
        raise ValueError(f"{run_dir} has unfinished folds ({missing}): finish them (--ckpt_path last) before pooling")
    records = [json.loads((p / "metrics.json").read_text()) for p in finished]
    # pandas reads back the floats it wrote exactly: pooled metrics equal those of the in-memory tables to the bit
    tables = [pd.read_csv(p / "predictions.csv", dtype={"nodule_id": str}) for p in finished]
    pooled = pd.concat(tables, ignore_index=True)
    aurocs = [r["test"]["auroc"] for r in records if r["test"]["auroc"] is not None]
    summary = {
        "test": evaluation_metrics(pooled),
        "fold": "all",
        "seed": records[0].get("seed"),
        "checkpoint": [r["checkpoint"] for r in records],
        "folds": records,
        "auroc_mean": float(np.mean(aurocs)) if aurocs else None,
        "auroc_sd": float(np.std(aurocs, ddof=1)) if len(aurocs) > 1 else None,
    }
    io.write_json(run_dir / "metrics.json", summary)
    io.write_csv(run_dir / "predictions.csv", pooled)
    plot_roc(pooled, run_dir / "roc.png", title="pooled over folds")
    print(f"pooled over {len(records)} folds:", flush=True)
    _print_summary({**summary, "checkpoint": str(run_dir)})
    return summary


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


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the examples kept line by line."""


def _make_cli(argv: list[str]) -> TrainCLI:
    with warnings.catch_warnings():
        # argv is sys.argv (with the default config prepended) or the caller's own list, never both
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
        return TrainCLI(
            NoduleModule,
            NoduleDataModule,
            run=False,
            args=argv,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={
                "exit_on_error": False, "prog": PROG, "description": DESCRIPTION, "epilog": EXAMPLES,
                "formatter_class": _HelpFormatter,
            },
        )


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the configured fold (or every fold, then pool them); returns the metrics record.

    `args` defaults to ``sys.argv[1:]``. ``--help`` and ``--print_config`` exit through SystemExit(0); a bad
    argument raises argparse.ArgumentError, bad inputs ValueError / FileNotFoundError (see :func:`cli_main`).
    """
    argv = with_default_config(resolve_config_args(sys.argv[1:] if args is None else args))
    # --threads and -v/-q apply to this run only (in-process callers keep theirs)
    threads = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    try:
        cli = _make_cli(argv)
        if cli.config.data.fold != "all":
            return run_fold(cli)
        # every fold as a fresh CLI on the same arguments (never a mutated config), then the pooling step
        run_dir, n_folds, manifest = cli.run_dir, int(cli.config.data.n_folds), cli.config.data.manifest
        seed = cli.config.get("seed_everything")  # resolved once: a random seed (True) is shared by all folds
        del cli
        records, is_global_zero = [], True
        for k in range(n_folds):
            fold_cli = _make_cli(
                [*argv, f"--data.fold={k}", f"--data.manifest={manifest}", f"--out={run_dir}", f"--run=fold-{k}",
                 f"--seed_everything={'false' if seed is False else seed}"]
            )
            records.append(run_fold(fold_cli))
            is_global_zero = fold_cli.trainer.is_global_zero
        return pool_folds(run_dir) if is_global_zero else records[0]
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """pipelines/train.py: 0 done, 2 a bad argument or input (one sentence on stderr), 1 an unexpected failure.

    `argv` defaults to ``sys.argv[1:]``; ``--pool RUN_DIR`` runs :func:`pool_folds` alone.
    """
    package_log = logging.getLogger("ctcdam")
    if argv is None and not package_log.handlers:
        from rich.logging import RichHandler

        # as a script: show ctcdam's progress lines (data generation, preprocessing) beside Lightning's own
        package_log.addHandler(RichHandler(show_path=False))
        package_log.setLevel(logging.INFO)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--pool"]:
        if len(args) != 2:
            return report_error(PROG, "--pool takes one run folder (the parent of its fold-<k>/ folders)")
        try:
            pool_folds(args[1])
        except (ValueError, FileNotFoundError, io.OutputError) as error:
            return report_error(PROG, error)
        return 0
    try:
        main(args)
    except ArgumentError as error:
        return report_error(PROG, f"{_argument_message(error)} (see {PROG} --help)")
    except USAGE_ERRORS as error:
        return report_error(PROG, error)
    return 0


def _argument_message(error: ArgumentError) -> str:
    """jsonargparse's multi-line 'Parser key "k": ... Given value: v' as one short sentence."""
    text = str(error)
    key = re.match(r'Parser key "([^"]+)":', text)
    if key is None:
        return text
    given = re.search(r"Given value: (.*)$", text.strip(), re.MULTILINE)
    reason = text[key.end():].strip().splitlines()[0].strip().rstrip(".")
    value = f" {given.group(1).strip()!r}" if given else ""
    return f"bad value{value} for --{key.group(1)}: {reason}"


def head_cache_speedup(
    manifest: str | Path | None = None,
    model: str = "vit_small_patch16_224.dino",
    img_size: int = 112,
    epochs: int = 10,
    batch_size: int = 32,
    threads: int | None = 1,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Fit the same head-mode run (random backbone, same seed) with and without cached embeddings.

    Returns the fit seconds of both, their ratio and the cache's hits/misses; ``manifest=None`` uses the
    synthetic default. Pass e.g. ``("--data.rotate=false", "--data.flip=false", "--data.slice_jitter=0")``
    in `extra_args` to see the regime where every image repeats (epochs after the first need no backbone pass).
    """
    args = [
        f"--model.backbone={model}",
        "--model.weights=none",
        f"--model.img_size={img_size}",
        "--model.backbone_kwargs=null",
        "--model.finetune=head",
        f"--data.batch_size={batch_size}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.intensity_jitter=0",  # both runs see the same (cacheable) augmentation
        *([f"--data.manifest={manifest}"] if manifest is not None else []),
        *([f"--threads={threads}"] if threads is not None else []),
        *extra_args,
    ]
    # the runs' own summaries go to stderr: stdout carries only the benchmark's table or JSON
    with tempfile.TemporaryDirectory(prefix="ctcdam-head-cache-") as out, contextlib.redirect_stdout(sys.stderr):
        runs = {
            cached: main([*args, f"--model.cache_embeddings={str(cached).lower()}", f"--out={out}", f"--run=cache-{cached}"])
            for cached in (True, False)
        }
    with_cache, without = runs[True]["seconds"]["fit"], runs[False]["seconds"]["fit"]
    return {
        "fit_seconds_cached": with_cache,
        "fit_seconds_uncached": without,
        "speedup": without / with_cache if with_cache > 0 else None,
        "epochs": epochs,
        "cache": runs[True]["embedding_cache"],
        "test_auroc_cached": runs[True]["test"]["auroc"],
        "test_auroc_uncached": runs[False]["test"]["auroc"],
    }
