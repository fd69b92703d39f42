"""The evaluation run: a checkpoint's test fold -> crops -> central view slices -> explain per method -> metrics.

``evaluate(EvaluationConfig(checkpoint=...))`` writes into ``<out>/<run>/``:

* ``metrics.csv``: one row per nodule x view x method x target (:data:`METRIC_COLUMNS`);
* ``class_sensitivity.csv``: one row per nodule x view x method x pair of targets (Pearson r of the two maps);
* ``sanity.csv``: one row per nodule x view x method x target x re-initialisation stage (Spearman rho);
* ``curves.csv``: the mean deletion (MIF, LIF) and insertion curves per method, in units of each target's scale;
* ``summary.md``: mean and 95 % confidence interval per method and metric over nodules, the best in bold;
* ``deletion_curves.png``, ``metrics.png``; ``failures.csv`` when a nodule or a method had to be skipped.

The metric definitions are in :mod:`ctcdam.explain.metrics`; the choices made here: the central slice of each
view (as at test time), the consensus mask dilated by 1 mm in 3D before slicing, air (-1000 HU) as the insertion
baseline, and each target's scale = the standard deviation of its output over all evaluated views.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from monai.transforms import Resize
from scipy import stats
from tqdm.auto import tqdm

from ctcdam.data.manifest import read_crop, read_manifest
from ctcdam.data.transforms import InputConfig, to_model_input
from ctcdam.data.views import centre_index, view_slice
from ctcdam.explain import metrics, vit
from ctcdam.explain.cdam import explain, list_methods
from ctcdam.models.checkpoint import LoadedModel, load_for_inference
from ctcdam.models.runs import newest_checkpoint, resolve_device
from ctcdam.models.report import write_csv_atomic
from ctcdam.targets import MALIGNANCY, TARGETS, VIEWS, target_index

log = logging.getLogger(__name__)

#: The methods compared by default: the CDAM family first, then the baselines and the random control.
DEFAULT_METHODS: tuple[str, ...] = (
    "cdam", "smooth", "integrated", "attention", "rollout", "token_ablation", "ig", "smoothgrad", "inputxgrad", "random",
)
#: The CDAM variants (paired differences in the summary compare each of them with every other method).
CDAM_METHODS: tuple[str, ...] = ("cdam", "smooth", "integrated")
#: The control that is never marked best.
CONTROL_METHOD = "random"
ID_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "view", "method", "target")
METRIC_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, *metrics.SCORE_COLUMNS, "seconds")
CLASS_COLUMNS: tuple[str, ...] = ("scan_id", "nodule_id", "view", "method", "target_a", "target_b", "pearson")
SANITY_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "stage", "spearman")
#: Whether a larger value of a summary column is better (the summary bolds the best method per column).
HIGHER_IS_BETTER: dict[str, bool] = {
    "correctness": True, "auc_mif": False, "auc_lif": True, "insertion_auc": True, "near_zero_share": True,
    "gini": True, "localisation": True, "pointing_hit": True, "seconds": False,
    "r_malignancy_biomarker": False, "r_biomarker_biomarker": False, "sanity_rho": False,
}
#: Range of the bounded summary columns (their confidence intervals are clipped to it).
COLUMN_BOUNDS: dict[str, tuple[float, float]] = {
    "near_zero_share": (0.0, 1.0), "gini": (0.0, 1.0), "localisation": (0.0, 1.0), "pointing_hit": (0.0, 1.0),
    "r_malignancy_biomarker": (0.0, 1.0), "r_biomarker_biomarker": (0.0, 1.0), "sanity_rho": (0.0, 1.0),
    "spearman": (-1.0, 1.0), "seconds": (0.0, np.inf),
}
#: Air: the insertion baseline, in HU (the lower end of the lung window).
AIR_HU = -1000.0
#: Methods that backpropagate to the input through the whole model, in batches of ``batch_size`` rows.
GRADIENT_METHODS: tuple[str, ...] = ("ig", "smoothgrad", "inputxgrad")
#: Token x channel elements per batch of the gradient methods (rows = this / (tokens * width), 16 .. 512).
GRADIENT_BATCH_ELEMENTS = 4 * 2**20


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


@dataclass(frozen=True)
class NoduleViews:
    """The central slice of each view of one test nodule, and which tokens of each lie inside its dilated mask."""

    scan_id: str
    nodule_id: str
    slices_hu: np.ndarray  #: (V, h, w)
    inside: torch.Tensor | None  #: (V, grid_h, grid_w) bool, None without a consensus mask


# ------------------------------------------------------------------------------------------------------------------
# Inputs


def default_run_name(checkpoint: Path) -> str:
    """The training run's folder name (the folder holding the checkpoint, or its parent for per-fold folders)."""
    folder = checkpoint.resolve().parent
    return f"{folder.parent.name}-{folder.name}" if folder.name.startswith("fold-") else folder.name


def test_fold_rows(loaded: LoadedModel, max_nodules: int | None = None) -> pd.DataFrame:
    """Manifest rows of the checkpoint's test fold, in the checkpoint's order (at most ``max_nodules``)."""
    manifest = Path(loaded.data["manifest"])
    frame = read_manifest(manifest).set_index("nodule_id", drop=False)
    ids = [str(i) for i in loaded.data["test_ids"]]
    absent = [i for i in ids if i not in frame.index]
    if absent:
        raise ValueError(
            f"checkpoint {loaded.path} names test nodule {absent[0]!r} that manifest {manifest} lacks "
            f"({len(absent)} missing): the manifest changed after training"
        )
    rows = frame.loc[ids[: max_nodules or None]].reset_index(drop=True)
    rows["mask_file"] = [_mask_file(manifest.parent, row) for row in rows.to_dict("records")]
    return rows


def _mask_file(root: Path, row: Mapping[str, Any]) -> str | None:
    path = row.get("mask_path")
    if path is None or (isinstance(path, float) and np.isnan(path)) or not str(path).strip():
        return None
    return str(Path(path) if Path(path).is_absolute() else root / str(path))


def mask_tokens(
    mask_zyx: np.ndarray, spacing_zyx: Sequence[float], views: Sequence[str], input_config: InputConfig,
    grid: tuple[int, int], dilation_mm: float = 1.0,
) -> torch.Tensor:
    """Tokens inside the dilated mask (V, grid_h, grid_w) on each view's central slice, resized like the image."""
    dilated = metrics.dilate_mask(mask_zyx, spacing_zyx, dilation_mm).astype(np.float32)
    # The resize of ctcdam.data.transforms.slice_transform, so mask pixels land where the image's do.
    size = (input_config.img_size, input_config.img_size)
    resize = Resize(spatial_size=size, mode="bilinear", align_corners=False, anti_aliasing=True)
    pixels = torch.stack([
        torch.as_tensor(resize(view_slice(dilated, v, centre_index(dilated.shape, v))[None]))[0] for v in views
    ])
    return metrics.tokens_inside(metrics.token_overlap(pixels.clamp(0, 1), grid))


def load_nodule(row: Mapping[str, Any], views: Sequence[str], input_config: InputConfig, grid: tuple[int, int],
                dilation_mm: float) -> NoduleViews:
    """Central view slices of one manifest row's crop and the tokens inside its dilated consensus mask."""
    crop, geometry = read_crop(row["image_file"])
    inside = None
    if row["mask_file"] is not None:
        mask, mask_geometry = read_crop(row["mask_file"])
        if mask_geometry.shape != geometry.shape or not np.allclose(mask_geometry.spacing_mm, geometry.spacing_mm):
            raise ValueError(
                f"mask {row['mask_file']} ({mask_geometry.shape} at {mask_geometry.spacing_mm} mm) does not match "
                f"its crop {row['image_file']} ({geometry.shape} at {geometry.spacing_mm} mm)"
            )
        inside = mask_tokens(mask, geometry.spacing_mm, views, input_config, grid, dilation_mm)
    slices = np.stack([view_slice(crop, v, centre_index(crop.shape, v)) for v in views]).astype(np.float32)
    return NoduleViews(str(row["scan_id"]), str(row["nodule_id"]), slices, inside)


def air_image(input_config: InputConfig, slice_shape: tuple[int, int]) -> torch.Tensor:
    """The model input (3, H, W) of a slice of air: the insertion baseline."""
    return to_model_input(np.full(slice_shape, AIR_HU, dtype=np.float32), input_config)[0]


# ------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _CurveTotals:
    """Running sums of scaled curves per method, for the mean-curve plot."""

    shares: np.ndarray | None = None
    sums: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, method: str, curves: metrics.PerturbationCurves, scale: torch.Tensor) -> None:
        self.shares = curves.shares.numpy()
        for kind in ("mif", "lif", "insertion"):
            scaled = (getattr(curves, kind) / scale.to(curves.mif)[None, :, None]).double()
            total = scaled.sum((0, 1)).numpy()
            self.sums[(method, kind)] = self.sums.get((method, kind), 0) + total
        self.counts[method] = self.counts.get(method, 0) + curves.mif.shape[0] * curves.mif.shape[1]

    def frame(self) -> pd.DataFrame:
        if self.shares is None:
            return pd.DataFrame(columns=["method", "curve", "share", "mean"])
        rows = [
            {"method": method, "curve": kind, "share": share, "mean": value / self.counts[method]}
            for (method, kind), total in self.sums.items()
            for share, value in zip(self.shares, total)
        ]
        return pd.DataFrame(rows, columns=["method", "curve", "share", "mean"])


def evaluate(config: EvaluationConfig) -> Path:
    """Run every method on the checkpoint's test fold and write the tables, summary and plots; returns the run folder."""
    config = dataclasses.replace(config, device=resolve_device(config.device))
    loaded = load_for_inference(config.checkpoint, map_location=config.device)
    model, input_config = loaded.model, loaded.input_config
    image_size = (input_config.img_size, input_config.img_size)
    out = Path(config.out_dir) / (config.run or default_run_name(Path(config.checkpoint)))
    out.mkdir(parents=True, exist_ok=True)
    grid = vit.grid_size(model, image_size)
    nodules, failures = load_nodules(test_fold_rows(loaded, config.max_nodules), config, input_config, grid)
    if not nodules:
        write_csv_atomic(out / "failures.csv", pd.DataFrame(failures))
        raise RuntimeError(f"no test nodule of {config.checkpoint} could be loaded; see {out / 'failures.csv'}")
    scale = target_scale(model, nodules, input_config, config)
    log.info("target scales (std of each output over the evaluated views): %s",
             ", ".join(f"{t} {s:.4g}" for t, s in zip(config.targets, scale.tolist())))
    frames, curves, run_failures = run_methods(model, nodules, input_config, scale, config)
    header = {
        "checkpoint": str(config.checkpoint), "nodules": len(nodules), "views": ", ".join(config.views),
        "targets": ", ".join(config.targets), "removal": config.removal, "skipped": len(failures) + len(run_failures),
        "scale": ", ".join(f"{t} {s:.3g}" for t, s in zip(config.targets, scale.tolist())),
    }
    write_outputs(out, frames, curves, failures + run_failures, header)
    log.info("evaluation written to %s", out)
    return out


def load_nodules(rows: pd.DataFrame, config: EvaluationConfig, input_config: InputConfig,
                 grid: tuple[int, int]) -> tuple[list[NoduleViews], list[dict[str, str]]]:
    """Every loadable test nodule, and one failure row (logged) for each one that is not."""
    nodules, failures = [], []
    for row in rows.to_dict("records"):
        try:
            nodules.append(load_nodule(row, config.views, input_config, grid, config.dilation_mm))
        except (OSError, ValueError) as err:
            log.warning("skipping nodule %s: %s", row["nodule_id"], err)
            failures.append({"scan_id": row["scan_id"], "nodule_id": row["nodule_id"], "stage": "load", "reason": str(err)})
    return nodules, failures


def run_methods(
    model: torch.nn.Module, nodules: Sequence[NoduleViews], input_config: InputConfig, scale: torch.Tensor,
    config: EvaluationConfig,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, list[dict[str, str]]]:
    """Explain and score every batch of nodules with every method: (tables, mean curves, failure rows)."""
    image_size = (input_config.img_size, input_config.img_size)
    grid = vit.grid_size(model, image_size)
    baseline = air_image(input_config, nodules[0].slices_hu.shape[1:]).to(config.device)
    options = method_options(model, config, image_size)
    warm_up(model, nodules[0], input_config, config, options)
    tables: dict[str, list[dict[str, Any]]] = {"metrics": [], "class": [], "sanity": []}
    curves, failures = _CurveTotals(), []
    starts = range(0, len(nodules), config.nodules_per_batch)
    progress = tqdm(total=len(starts) * len(config.methods), desc="evaluate", unit="method", disable=not config.progress)
    for first in starts:
        batch = nodules[first : first + config.nodules_per_batch]
        images = to_model_input(np.concatenate([n.slices_hu for n in batch]), input_config).to(config.device)
        inside = _stack_inside(batch, grid)
        sanity_rows = max(0, min(len(batch), config.sanity_nodules - first)) * len(config.views)
        for method in config.methods:
            progress.set_postfix_str(method)
            try:
                _evaluate_method(model, images, inside, batch, method, options.get(method, {}), baseline, scale,
                                 sanity_rows, config, tables, curves)
            except (RuntimeError, ValueError, TypeError) as err:
                log.warning("method %s failed on nodules %s: %s", method, [n.nodule_id for n in batch], err)
                failures += [{"scan_id": n.scan_id, "nodule_id": n.nodule_id, "stage": f"explain:{method}",
                              "reason": str(err)} for n in batch]
            progress.update()
    progress.close()
    frames = {
        "metrics": pd.DataFrame(tables["metrics"], columns=list(METRIC_COLUMNS)),
        "class": pd.DataFrame(tables["class"], columns=list(CLASS_COLUMNS)),
        "sanity": pd.DataFrame(tables["sanity"], columns=list(SANITY_COLUMNS)),
    }
    return frames, curves.frame(), failures


def write_outputs(out: Path, frames: Mapping[str, pd.DataFrame], curves: pd.DataFrame,
                  failures: Sequence[Mapping[str, str]], header: Mapping[str, Any]) -> None:
    """The run's CSV tables, summary.md and plots, each written atomically."""
    write_csv_atomic(out / "metrics.csv", frames["metrics"])
    write_csv_atomic(out / "class_sensitivity.csv", frames["class"])
    write_csv_atomic(out / "sanity.csv", frames["sanity"])
    write_csv_atomic(out / "curves.csv", curves)
    if failures:
        columns = ["scan_id", "nodule_id", "stage", "reason"]
        write_csv_atomic(out / "failures.csv", pd.DataFrame(list(failures), columns=columns))
    _write_text_atomic(out / "summary.md", summary_markdown(frames["metrics"], frames["class"], frames["sanity"], header))
    plot_curves(curves, out / "deletion_curves.png")
    plot_metric_bars(method_table(frames["metrics"], frames["class"], frames["sanity"]), out / "metrics.png")


def target_scale(model: torch.nn.Module, nodules: Sequence[NoduleViews], input_config: InputConfig,
                 config: EvaluationConfig) -> torch.Tensor:
    """Each target's scale: the standard deviation of its unperturbed output over every evaluated view."""
    outputs = []
    with vit.eval_mode(model), torch.no_grad():
        for i in range(0, len(nodules), config.nodules_per_batch):
            chunk = np.concatenate([n.slices_hu for n in nodules[i : i + config.nodules_per_batch]])
            outputs.append(model(to_model_input(chunk, input_config).to(config.device)).cpu())
    return metrics.output_scale(torch.cat(outputs), config.targets)


def warm_up(model: torch.nn.Module, nodule: NoduleViews, input_config: InputConfig, config: EvaluationConfig,
            options: Mapping[str, Mapping[str, Any]]) -> None:
    """Run each method once on one slice, untimed, so one-off costs (allocations, lazy set-up) stay out of ``seconds``."""
    image = to_model_input(nodule.slices_hu[:1], input_config).to(config.device)
    for method in config.methods:
        try:
            explain(model, image, list(config.targets), method=method, **dict(options.get(method, {})))
        except (RuntimeError, ValueError, TypeError):
            pass  # the timed run reports the failure with its nodules


def _stack_inside(batch: Sequence[NoduleViews], grid: tuple[int, int]) -> torch.Tensor | None:
    """Inside-mask tokens of a batch (B, gh, gw); nodules without a mask get none (their localisation is NaN)."""
    if all(n.inside is None for n in batch):
        return None
    views = len(batch[0].slices_hu)
    return torch.cat([n.inside if n.inside is not None else torch.zeros(views, *grid, dtype=torch.bool) for n in batch])


def method_options(
    model: torch.nn.Module, config: EvaluationConfig, image_size: tuple[int, int]
) -> dict[str, dict[str, Any]]:
    """Per-method ``explain`` options: the configured ones over batch sizes fitted to the model's size.

    The gradient methods' own default batch (16 rows) leaves a small model's CPU run dominated by per-batch
    overhead (about 10x slower for a tiny ViT); rows are sized so a batch holds about GRADIENT_BATCH_ELEMENTS
    token features, which bounds memory for large models too.
    """
    grid = vit.grid_size(model, image_size)
    per_row = (grid[0] * grid[1] + vit.num_prefix_tokens(model)) * int(model.embed_dim)
    rows = int(np.clip(GRADIENT_BATCH_ELEMENTS // per_row, 16, 512))
    options = {method: {"batch_size": rows} for method in GRADIENT_METHODS if method in config.methods}
    for method, given in config.method_options.items():
        options[method] = {**options.get(method, {}), **dict(given)}
    return options


def _evaluate_method(
    model: torch.nn.Module, images: torch.Tensor, inside: torch.Tensor | None, batch: Sequence[NoduleViews],
    method: str, options: Mapping[str, Any], baseline: torch.Tensor, scale: torch.Tensor, sanity_rows: int,
    config: EvaluationConfig, tables: dict[str, list[dict[str, Any]]], curves: _CurveTotals,
) -> None:
    """Explain one batch with one method and append its metric, class-sensitivity and sanity rows."""
    targets = list(config.targets)
    started = time.perf_counter()
    maps = explain(model, images, targets, method=method, **options).maps.detach()
    seconds = (time.perf_counter() - started) / (len(images) * len(targets))
    scores, method_curves = metrics.map_scores(
        model, images, maps, targets, baseline, inside, scale, step=config.step, removal=config.removal
    )
    curves.add(method, method_curves, scale)
    keys = [
        {"scan_id": n.scan_id, "nodule_id": n.nodule_id, "view": view, "method": method}
        for n in batch for view in config.views
    ]
    tables["metrics"] += [
        {**key, "target": target, **{name: float(values[b, t]) for name, values in scores.items()}, "seconds": seconds}
        for b, key in enumerate(keys) for t, target in enumerate(targets)
    ]
    correlation = metrics.target_correlation(maps.cpu())
    tables["class"] += [
        {**key, "target_a": targets[a], "target_b": targets[c], "pearson": float(correlation[b, a, c])}
        for b, key in enumerate(keys) for a in range(len(targets)) for c in range(a + 1, len(targets))
    ]
    if sanity_rows:
        subset = images[:sanity_rows]
        stages = metrics.cascading_randomisation(
            model, maps[:sanity_rows], lambda m: explain(m, subset, targets, method=method, **options).maps,
            n_blocks=min(config.sanity_blocks, len(model.blocks)),
        )
        tables["sanity"] += [
            {**key, "target": target, "stage": stage, "spearman": float(rho[b, t])}
            for stage, rho in stages for b, key in enumerate(keys[:sanity_rows]) for t, target in enumerate(targets)
        ]


# ------------------------------------------------------------------------------------------------------------------
# Summary: per-nodule means, then mean and 95 % CI over nodules


def confidence_interval(
    values: Iterable[float], level: float = 0.95, bounds: tuple[float, float] = (-np.inf, np.inf)
) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of finite values: Student-t interval of the mean, clipped to the metric's ``bounds``.

    The bounds are NaN for n < 2.
    """
    data = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    n = len(data)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(data.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * data.std(ddof=1) / np.sqrt(n))
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), n


def per_nodule(frame: pd.DataFrame, value_columns: Sequence[str]) -> pd.DataFrame:
    """Mean of each column per method and nodule (over views and targets): the unit the intervals are over."""
    return frame.groupby(["method", "nodule_id"], sort=False)[list(value_columns)].mean().reset_index()


def method_table(metrics_frame: pd.DataFrame, class_frame: pd.DataFrame, sanity_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method and summary column: mean, low, high, n over nodules (long format)."""
    columns = [*metrics.SCORE_COLUMNS, "seconds"]
    parts = [per_nodule(metrics_frame, columns)]
    if not class_frame.empty:
        is_malignancy = class_frame["target_a"].eq(MALIGNANCY) | class_frame["target_b"].eq(MALIGNANCY)
        # |r|: a map that is another's negative points at the same tokens; it is not more target-specific.
        magnitude = class_frame["pearson"].abs()
        pairs = class_frame.assign(
            r_malignancy_biomarker=magnitude.where(is_malignancy), r_biomarker_biomarker=magnitude.where(~is_malignancy)
        )
        parts.append(per_nodule(pairs, ["r_malignancy_biomarker", "r_biomarker_biomarker"]))
    if not sanity_frame.empty:
        last = sanity_frame[sanity_frame["stage"] == sanity_frame["stage"].iloc[-1]]
        parts.append(per_nodule(last.assign(sanity_rho=last["spearman"].abs()), ["sanity_rho"]))
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part, on=["method", "nodule_id"], how="left")
    records = []
    for method, group in merged.groupby("method", sort=False):
        for column in [c for c in merged.columns if c not in ("method", "nodule_id")]:
            mean, low, high, n = confidence_interval(group[column], bounds=COLUMN_BOUNDS.get(column, (-np.inf, np.inf)))
            records.append({"method": method, "column": column, "mean": mean, "low": low, "high": high, "n": n})
    return pd.DataFrame(records, columns=["method", "column", "mean", "low", "high", "n"])


def paired_differences(
    metrics_frame: pd.DataFrame, columns: Sequence[str] = ("correctness", "insertion_auc", "localisation", "pointing_hit")
) -> pd.DataFrame:
    """Per-nodule paired difference (CDAM variant - other method) of each column: mean, low, high, n."""
    table = per_nodule(metrics_frame, list(columns))
    methods = list(dict.fromkeys(table["method"]))
    records = []
    for variant in [m for m in CDAM_METHODS if m in methods]:
        for other in [m for m in methods if m != variant]:
            pair = table[table["method"] == variant].merge(
                table[table["method"] == other], on="nodule_id", suffixes=("", "_other")
            )
            for column in columns:
                mean, low, high, n = confidence_interval(pair[column] - pair[f"{column}_other"])
                records.append(
                    {"variant": variant, "other": other, "column": column, "mean": mean, "low": low, "high": high, "n": n}
                )
    return pd.DataFrame(records, columns=["variant", "other", "column", "mean", "low", "high", "n"])


def _cell(mean: float, low: float, high: float, bold: bool = False) -> str:
    if not np.isfinite(mean):
        return "n/a"
    value = f"**{mean:.3g}**" if bold else f"{mean:.3g}"
    return value if not np.isfinite(low) else f"{value} [{low:.3g}, {high:.3g}]"


def _best_methods(table: pd.DataFrame, column: str) -> set[str]:
    candidates = table[(table["column"] == column) & (table["method"] != CONTROL_METHOD) & np.isfinite(table["mean"])]
    if candidates.empty or column not in HIGHER_IS_BETTER:
        return set()
    best = candidates["mean"].max() if HIGHER_IS_BETTER[column] else candidates["mean"].min()
    return set(candidates.loc[np.isclose(candidates["mean"], best, rtol=1e-9, atol=0), "method"])


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_markdown(metrics_frame: pd.DataFrame, class_frame: pd.DataFrame, sanity_frame: pd.DataFrame,
                     header: Mapping[str, Any]) -> str:
    """The summary report: settings, the per-method table, correctness per target, paired differences, sanity."""
    lines = ["# Evaluation summary", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        "Mean [95 % CI] over nodules (each nodule = mean over its views and targets; Student t). Best method per "
        "column in bold (`random` is the control and never bold). Definitions: docs/evaluation.md. Correctness, "
        "AUCs and insertion are in units of each target's scale; `r_*` = |Pearson r| between maps of different "
        "targets (lower = more target-specific); `sanity_rho` = |Spearman| between the map and the map after "
        "re-initialising the head and the last blocks (lower = the map depends on the model); `seconds` = cost per map.",
        "",
    ]
    table = method_table(metrics_frame, class_frame, sanity_frame)
    methods = list(dict.fromkeys(table["method"]))
    columns = list(dict.fromkeys(table["column"]))
    best = {column: _best_methods(table, column) for column in columns}
    indexed = table.set_index(["method", "column"])
    lines += _markdown_table(
        ["method", *columns],
        ([method] + [_cell(*indexed.loc[(method, c), ["mean", "low", "high"]], bold=method in best[c]) for c in columns]
         for method in methods),
    )
    targets = list(dict.fromkeys(metrics_frame["target"]))
    lines += ["", "## Correctness per target", ""]
    by_target = []
    for method in methods:
        cells = [method]
        for target in targets:
            rows = metrics_frame[(metrics_frame["method"] == method) & (metrics_frame["target"] == target)]
            values = per_nodule(rows, ["correctness"])
            cells.append(_cell(*confidence_interval(values["correctness"])[:3]))
        by_target.append(cells)
    lines += _markdown_table(["method", *targets], by_target)
    differences = paired_differences(metrics_frame)
    if not differences.empty:
        lines += ["", "## Paired differences: CDAM variant minus other method (per nodule)", "",
                  "Bold: the 95 % CI excludes 0 in the variant's favour; *italic*: it excludes 0 against it.", ""]
        diff_columns = list(dict.fromkeys(differences["column"]))
        rows = []
        for (variant, other), group in differences.groupby(["variant", "other"], sort=False):
            cells = [f"{variant} - {other}"]
            for column in diff_columns:
                mean, low, high = group.set_index("column").loc[column, ["mean", "low", "high"]]
                favour = HIGHER_IS_BETTER.get(column, True)
                text = _cell(mean, low, high)
                if np.isfinite(low) and (low > 0 if favour else high < 0):
                    text = f"**{text}**"
                elif np.isfinite(low) and (high < 0 if favour else low > 0):
                    text = f"*{text}*"
                cells.append(text)
            rows.append(cells)
        lines += _markdown_table(["comparison", *diff_columns], rows)
    if not sanity_frame.empty:
        lines += ["", "## Sanity: Spearman rho between the map and the map of the re-initialised model", ""]
        stages = list(dict.fromkeys(sanity_frame["stage"]))
        rows = []
        for method in dict.fromkeys(sanity_frame["method"]):
            cells = [method]
            for stage in stages:
                part = sanity_frame[(sanity_frame["method"] == method) & (sanity_frame["stage"] == stage)]
                rho = per_nodule(part, ["spearman"])["spearman"]
                cells.append(_cell(*confidence_interval(rho, bounds=COLUMN_BOUNDS["spearman"])[:3]))
            rows.append(cells)
        lines += _markdown_table(["method", *stages], rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# Plots and files


def plot_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Mean MIF, LIF and insertion curves per method (one panel each)."""
    figure = Figure(figsize=(13, 4), layout="constrained")
    titles = {
        "mif": "deletion, most important first", "lif": "deletion, least important first", "insertion": "insertion into air"
    }
    for axis, (kind, title) in zip(figure.subplots(1, 3), titles.items()):
        for method, group in curves[curves["curve"] == kind].groupby("method", sort=False):
            style = "--" if method == CONTROL_METHOD else ("-" if method in CDAM_METHODS else ":")
            axis.plot(group["share"], group["mean"], style, label=method)
        axis.set(title=title, xlabel="share of tokens " + ("pasted" if kind == "insertion" else "removed"),
                 ylabel="output change / target scale")
        axis.axhline(0, color="grey", linewidth=0.5)
    figure.axes[0].legend(fontsize=7)
    return _save_figure(figure, path)


def plot_metric_bars(table: pd.DataFrame, path: Path) -> Path:
    """Bars with 95 % confidence intervals per method, one panel per summary column."""
    columns = [c for c in dict.fromkeys(table["column"]) if c != "seconds"]
    if not columns:
        figure = Figure(figsize=(4, 2))
        figure.text(0.5, 0.5, "no results (see failures.csv)", ha="center")
        return _save_figure(figure, path)
    n_cols = 4
    figure = Figure(figsize=(4 * n_cols, 3.2 * ((len(columns) + n_cols - 1) // n_cols)), layout="constrained")
    axes = figure.subplots((len(columns) + n_cols - 1) // n_cols, n_cols, squeeze=False).ravel()
    for axis, column in zip(axes, columns):
        part = table[table["column"] == column]
        errors = np.stack([part["mean"] - part["low"], part["high"] - part["mean"]]).clip(min=0)
        colours = [
            "tab:orange" if m in CDAM_METHODS else "tab:grey" if m == CONTROL_METHOD else "tab:blue" for m in part["method"]
        ]
        axis.bar(part["method"], part["mean"], yerr=np.nan_to_num(errors), color=colours, capsize=2)
        axis.set_title(column)
        axis.tick_params(axis="x", rotation=60, labelsize=7)
    for axis in axes[len(columns):]:
        axis.set_visible(False)
    return _save_figure(figure, path)


def _save_figure(figure: Figure, path: Path) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, dpi=110, format="png")
    os.replace(temporary, path)
    return path


def _write_text_atomic(path: Path, text: str) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


__all__: list[str] = [
    "CLASS_COLUMNS", "DEFAULT_METHODS", "EvaluationConfig", "METRIC_COLUMNS", "NoduleViews", "SANITY_COLUMNS",
    "air_image", "confidence_interval", "load_nodules", "method_options", "run_methods", "write_outputs",
    "default_run_name", "evaluate", "load_nodule", "mask_tokens", "method_table", "newest_checkpoint",
    "paired_differences", "summary_markdown", "target_scale", "test_fold_rows",
]
