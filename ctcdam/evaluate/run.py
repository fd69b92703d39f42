"""The evaluation run: a checkpoint's test fold -> crops -> central view slices -> explain per method -> metrics.

``evaluate(EvaluationConfig(checkpoint=...))`` writes into ``<out>/<run>/``:

* ``metrics.csv``: one row per nodule x view x method x target (:data:`METRIC_COLUMNS`);
* ``class_sensitivity.csv``: one row per nodule x view x method x pair of targets (Pearson r of the two maps);
* ``sanity.csv``: one row per nodule x view x method x target x re-initialisation stage (Spearman rho);
* ``curves.csv``: the mean deletion (MIF, LIF) and insertion curves per method, in units of each target's scale;
* ``summary.md``: mean and 95 % confidence interval per method and metric over nodules, the best in bold;
* ``deletion_curves.png``, ``metrics.png``; ``failures.csv`` when a nodule or a method had to be skipped.

The run folder is written as one unit (``ctcdam.io.atomic_dir``): after a kill it holds the finished run or
none. The metric definitions are in :mod:`ctcdam.explain.metrics`;
the choices made here: the central slice of each view (as at test time), the consensus mask dilated by 1 mm in
3D before slicing, air (-1000 HU) as the insertion baseline, and each target's scale = the standard deviation
of its output over all evaluated views.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ctcdam.data.transforms import InputConfig, to_model_input
from ctcdam.data.views import VIEWS
from ctcdam.evaluate import ground_truth
from ctcdam.evaluate.inputs import (
    NoduleViews,
    air_image,
    load_nodules,
    stack_inside,
    test_fold_rows,
)
from ctcdam.evaluate.plots import plot_curves, plot_metric_bars
from ctcdam.evaluate.summary import method_table, summary_markdown
from ctcdam.explain import (
    cause_metrics,
    explain,
    list_methods,
    method_info,
    method_infos,
    metrics,
    vit,
)
from ctcdam.io import atomic_dir, write_csv, write_text
from ctcdam.models.checkpoint import load_for_inference
from ctcdam.models.runs import resolve_device
from ctcdam.targets import TARGETS, target_index

log = logging.getLogger(__name__)

_FAMILY_ORDER = ("cdam", "baseline", "control")
#: The methods compared by default: every registered one, the CDAM family first, then the baselines and the control.
DEFAULT_METHODS: tuple[str, ...] = tuple(
    info.name for info in sorted(method_infos(), key=lambda info: _FAMILY_ORDER.index(info.family))
)
ID_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "view", "method", "target")
METRIC_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, *metrics.SCORE_COLUMNS, *cause_metrics.GROUND_TRUTH_COLUMNS, "seconds")
CLASS_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "view", "method", "target_a", "target_b", "pearson")
SANITY_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "stage", "spearman")
FAILURE_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "stage", "reason")


@dataclass(frozen=True)
class EvaluationConfig:
    """What one evaluation run does; ``method_options`` are passed to ``explain`` per method name."""

    checkpoint: Path
    out_dir: Path = Path("outputs/evaluate")
    run: str | None = None  #: folder name under out_dir (default: the training run's folder name)
    methods: tuple[str, ...] = DEFAULT_METHODS
    targets: tuple[str, ...] = TARGETS
    views: tuple[str, ...] = VIEWS
    max_nodules: int | None = None
    nodules_per_batch: int = 4
    sanity_nodules: int = 2  #: nodules (all their views) that get the cascading re-initialisation test
    sanity_blocks: int = 2
    step: float = metrics.DEFAULT_STEP
    removal: str = "drop"
    dilation_mm: float = 1.0
    device: str = "auto"
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in list_methods()]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(list_methods())}")
        for method, options in self.method_options.items():
            allowed = method_info(method).options
            extra = [name for name in options if name not in allowed]
            if extra:
                raise ValueError(f"method {method} has no option(s) {', '.join(extra)}; its options: "
                                 f"{', '.join(allowed) or '(none)'}")
        for target in self.targets:
            target_index(target)
        bad_views = [v for v in self.views if v not in VIEWS]
        if bad_views:
            raise ValueError(f"unknown view(s) {', '.join(bad_views)}; valid views: {', '.join(VIEWS)}")
        if self.removal not in metrics.REMOVALS:
            raise ValueError(f"removal must be one of {', '.join(metrics.REMOVALS)}, got {self.removal!r}")
        if self.max_nodules is not None and self.max_nodules < 1:
            raise ValueError(f"max_nodules must be at least 1, got {self.max_nodules}")
        if self.nodules_per_batch < 1:
            raise ValueError(f"nodules_per_batch must be at least 1, got {self.nodules_per_batch}")

    @property
    def target_indices(self) -> list[int]:
        """The model output index of each target."""
        return [target_index(t) for t in self.targets]


def default_run_name(checkpoint: Path) -> str:
    """The training run's folder name (the folder holding the checkpoint, or its parent for per-fold folders)."""
    folder = checkpoint.resolve().parent
    return f"{folder.parent.name}-{folder.name}" if folder.name.startswith("fold-") else folder.name


@dataclass
class _CurveTotals:
    """Running sums of scaled curves per method, for the mean-curve plot."""

    shares: np.ndarray | None = None
    sums: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, method: str, curves: metrics.PerturbationCurves, scale: torch.Tensor) -> None:
        """Add one batch's curves (B, T, S) of ``method``, divided by each target's scale."""
        self.shares = curves.shares.numpy()
        for kind in ("mif", "lif", "insertion"):
            scaled = (getattr(curves, kind) / scale.to(curves.mif)[None, :, None]).double()
            total = scaled.sum((0, 1)).numpy()
            self.sums[(method, kind)] = self.sums.get((method, kind), 0) + total
        self.counts[method] = self.counts.get(method, 0) + curves.mif.shape[0] * curves.mif.shape[1]

    def frame(self) -> pd.DataFrame:
        """The mean curve per method and kind: one row per (method, curve, share)."""
        if self.shares is None:
            return pd.DataFrame(columns=["method", "curve", "share", "mean"])
        rows = [
            {"method": method, "curve": kind, "share": share, "mean": value / self.counts[method]}
            for (method, kind), total in self.sums.items()
            for share, value in zip(self.shares, total)
        ]
        return pd.DataFrame(rows, columns=["method", "curve", "share", "mean"])


@dataclass(frozen=True)
class _Batch:
    """One batch of nodules as model inputs: every view of every nodule, and the tokens inside their masks."""

    nodules: Sequence[NoduleViews]
    images: torch.Tensor  #: (B = nodules x views, 3, H, W)
    inside: torch.Tensor | None  #: (B, grid_h, grid_w)
    sanity_rows: int  #: the first rows that also get the re-initialisation test


def evaluate(config: EvaluationConfig) -> Path:
    """Run every method on the checkpoint's test fold and write the tables, summary and plots; returns the run folder."""
    checkpoint = Path(config.checkpoint)
    config = dataclasses.replace(config, device=resolve_device(config.device))
    loaded = load_for_inference(checkpoint, map_location=config.device)
    model, input_config = loaded.model, loaded.input_config
    out = Path(config.out_dir) / (config.run or default_run_name(checkpoint))
    grid = vit.grid_size(model, (input_config.img_size, input_config.img_size))
    rows = test_fold_rows(loaded, config.max_nodules)
    nodules, failures = load_nodules(rows, config.views, input_config, grid, config.dilation_mm)
    if not nodules:
        reasons = "; ".join(f"{f['nodule_id']}: {f['reason']}" for f in failures[:3])
        raise ValueError(f"no test nodule of {checkpoint} could be loaded ({reasons})")
    scale = target_scale(model, nodules, input_config, config)
    log.info("target scales (std of each output over the evaluated views): %s",
             ", ".join(f"{t} {s:.4g}" for t, s in zip(config.targets, scale.tolist())))
    frames, curves, run_failures = run_methods(model, nodules, input_config, scale, config)
    header = {
        "checkpoint": str(checkpoint), "nodules": len(nodules), "views": ", ".join(config.views),
        "targets": ", ".join(config.targets), "removal": config.removal, "skipped": len(failures) + len(run_failures),
        "scale": ", ".join(f"{t} {s:.3g}" for t, s in zip(config.targets, scale.tolist())),
    }
    # The run folder is one unit: staged, then published in one rename (a killed run leaves none, or the old one).
    with atomic_dir(out) as staging:
        write_outputs(staging, frames, curves, failures + run_failures, header)
        if ground_truth.has_causes(nodules):
            table = ground_truth.stratified_table(frames["metrics"], ground_truth.nodule_frame(nodules))
            write_csv(staging / "ground_truth.csv", table)
    log.info("evaluation written to %s", out)
    return out


def target_scale(model: torch.nn.Module, nodules: Sequence[NoduleViews], input_config: InputConfig,
                 config: EvaluationConfig) -> torch.Tensor:
    """Each target's scale: the standard deviation of its unperturbed output over every evaluated view."""
    outputs = []
    with vit.eval_mode(model), torch.no_grad():
        for i in range(0, len(nodules), config.nodules_per_batch):
            chunk = np.concatenate([n.slices_hu for n in nodules[i : i + config.nodules_per_batch]])
            outputs.append(model(to_model_input(chunk, input_config).to(config.device)).cpu())
    return metrics.output_scale(torch.cat(outputs), config.target_indices)


def run_methods(
    model: torch.nn.Module, nodules: Sequence[NoduleViews], input_config: InputConfig, scale: torch.Tensor,
    config: EvaluationConfig,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, list[dict[str, str]]]:
    """Explain and score every batch of nodules with every method: (tables, mean curves, failure rows)."""
    grid = vit.grid_size(model, (input_config.img_size, input_config.img_size))
    baseline = air_image(input_config, nodules[0].slices_hu.shape[1:]).to(config.device)
    warm_up(model, to_model_input(nodules[0].slices_hu[:1], input_config).to(config.device), config)
    tables: dict[str, list[dict[str, Any]]] = {"metrics": [], "class": [], "sanity": []}
    curves, failures = _CurveTotals(), []
    starts = range(0, len(nodules), config.nodules_per_batch)
    progress = tqdm(total=len(starts) * len(config.methods), desc="evaluate", unit="method", disable=not config.progress)
    for first in starts:
        members = nodules[first : first + config.nodules_per_batch]
        batch = _Batch(
            nodules=members,
            images=to_model_input(np.concatenate([n.slices_hu for n in members]), input_config).to(config.device),
            inside=stack_inside(members, grid),
            sanity_rows=max(0, min(len(members), config.sanity_nodules - first)) * len(config.views),
        )
        for method in config.methods:
            progress.set_postfix_str(method)
            options = {**ground_truth.control_options(method, members, input_config.img_size),
                       **config.method_options.get(method, {})}
            try:
                maps, scored, method_curves = score_method(model, batch, method, options, baseline, scale, config)
                curves.add(method, method_curves, scale)
                tables["metrics"] += scored["metrics"]
                tables["class"] += scored["class"]
                tables["sanity"] += sanity_rows(model, batch, method, options, maps, config)
            except (RuntimeError, ValueError, TypeError) as err:
                log.warning("method %s failed on nodules %s: %s", method, [n.nodule_id for n in members], err)
                failures += [{"scan_id": n.scan_id, "nodule_id": n.nodule_id, "stage": f"explain:{method}",
                              "reason": str(err)} for n in members]
            progress.update()
    progress.close()
    frames = {
        "metrics": pd.DataFrame(tables["metrics"], columns=list(METRIC_COLUMNS)),
        "class": pd.DataFrame(tables["class"], columns=list(CLASS_COLUMNS)),
        "sanity": pd.DataFrame(tables["sanity"], columns=list(SANITY_COLUMNS)),
    }
    return frames, curves.frame(), failures


def warm_up(model: torch.nn.Module, image: torch.Tensor, config: EvaluationConfig) -> None:
    """Run each method once on one slice, untimed, so one-off costs (allocations, lazy set-up) stay out of ``seconds``."""
    for method in config.methods:
        try:
            explain(model, image, config.target_indices, method=method, **dict(config.method_options.get(method, {})))
        except (RuntimeError, ValueError, TypeError) as err:
            # Not fatal here: the timed run meets the same error and records it, with its nodules, in failures.csv.
            log.warning("warm-up of method %s failed: %s", method, err)


def _row_keys(batch: _Batch, method: str, views: Sequence[str]) -> list[dict[str, str]]:
    """The identifying columns of each row (nodule x view) of a batch."""
    return [
        {"scan_id": n.scan_id, "nodule_id": n.nodule_id, "view": view, "method": method}
        for n in batch.nodules for view in views
    ]


def score_method(
    model: torch.nn.Module, batch: _Batch, method: str, options: Mapping[str, Any], baseline: torch.Tensor,
    scale: torch.Tensor, config: EvaluationConfig,
) -> tuple[torch.Tensor, dict[str, list[dict[str, Any]]], metrics.PerturbationCurves]:
    """Explain one batch with one method: (maps, its metric and class-sensitivity rows, its curves)."""
    targets, indices = list(config.targets), config.target_indices
    started = time.perf_counter()
    maps = explain(model, batch.images, indices, method=method, **options).maps.detach()
    seconds = (time.perf_counter() - started) / (len(batch.images) * len(targets))
    scores, curves = metrics.map_scores(
        model, batch.images, maps, indices, baseline, batch.inside, scale, step=config.step, removal=config.removal
    )
    keys = _row_keys(batch, method, config.views)
    truth = (ground_truth.ground_truth_rows(maps, batch.nodules, method, targets)
             if ground_truth.has_causes(batch.nodules) else [{} for _ in range(len(keys) * len(targets))])
    metric_rows = [
        {**key, "target": target, **{name: float(values[b, t]) for name, values in scores.items()},
         **truth[b * len(targets) + t], "seconds": seconds}
        for b, key in enumerate(keys) for t, target in enumerate(targets)
    ]
    correlation = metrics.target_correlation(maps.cpu())
    class_rows = [
        {**key, "target_a": targets[a], "target_b": targets[c], "pearson": float(correlation[b, a, c])}
        for b, key in enumerate(keys) for a in range(len(targets)) for c in range(a + 1, len(targets))
    ]
    return maps, {"metrics": metric_rows, "class": class_rows}, curves


def sanity_rows(
    model: torch.nn.Module, batch: _Batch, method: str, options: Mapping[str, Any], maps: torch.Tensor,
    config: EvaluationConfig,
) -> list[dict[str, Any]]:
    """The cascading re-initialisation rows of the batch's first ``sanity_rows`` images (none when 0)."""
    if not batch.sanity_rows:
        return []
    subset, indices = batch.images[: batch.sanity_rows], config.target_indices
    # Per-image options (the centred Gaussian's sigma) follow the images to the subset.
    options = {k: v[: batch.sanity_rows] if torch.is_tensor(v) and v.ndim and len(v) == len(batch.images) else v
               for k, v in options.items()}
    stages = metrics.cascading_randomisation(
        model, maps[: batch.sanity_rows], lambda m: explain(m, subset, indices, method=method, **options).maps,
        n_blocks=min(config.sanity_blocks, len(model.blocks)),
    )
    keys = _row_keys(batch, method, config.views)[: batch.sanity_rows]
    return [
        {**key, "target": target, "stage": stage, "spearman": float(rho[b, t])}
        for stage, rho in stages for b, key in enumerate(keys) for t, target in enumerate(config.targets)
    ]


def write_outputs(out: Path, frames: Mapping[str, pd.DataFrame], curves: pd.DataFrame,
                  failures: Sequence[Mapping[str, str]], header: Mapping[str, Any]) -> None:
    """The run's CSV tables, summary.md and plots, each written atomically."""
    write_csv(out / "metrics.csv", frames["metrics"])
    write_csv(out / "class_sensitivity.csv", frames["class"])
    write_csv(out / "sanity.csv", frames["sanity"])
    write_csv(out / "curves.csv", curves)
    if failures:
        write_csv(out / "failures.csv", pd.DataFrame(list(failures), columns=list(FAILURE_COLUMNS)))
    write_text(out / "summary.md", summary_markdown(frames["metrics"], frames["class"], frames["sanity"], header))
    plot_curves(curves, out / "deletion_curves.png")
    plot_metric_bars(method_table(frames["metrics"], frames["class"], frames["sanity"]), out / "metrics.png")
