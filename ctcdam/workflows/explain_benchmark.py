"""Cost of explaining a cohort: the cohort command against a loop of single-scan commands on the same scans.

Both are real ``pipelines/explain.py`` processes with the same settings, timed by wall clock in one run: the loop
runs ``--scan`` once per scan (each run imports torch, loads the model, starts Slicer for its views.png), the
cohort runs ``--scans`` once (one import, one model load, one Slicer renderer per worker, workers loading and
writing while the model works). The time split (load, crop, maps, write) is the sum over the cohort's bundle
records, the stage seconds of every scan wherever they ran (with workers they overlap, so their sum can exceed
the cohort's wall time). The CPU seconds of each command are those of its whole process tree (workers and Slicer
children included, from ``getrusage``); ``cohort_vs_loop_at_full_cpu`` is the ratio the cohort would reach if its
CPU work kept every core busy from its first second to its last: a bound on what overlapping can still give with
the work as it is. The model is the synthetic demo's architecture (``configs/demo.yaml``) with random
weights unless a checkpoint is given: the cost of a map does not depend on what the weights learned.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctcdam.workflows import worklist
from ctcdam.workflows.explain_cohort import split_scans

#: The ratio the cohort command should reach on 5 synthetic scans.
TARGETS = {"cohort_vs_loop": ">= 5"}
STAGES = ("load", "crop", "maps", "write")
EXPLAIN_SCRIPT = Path(__file__).resolve().parents[2] / "pipelines" / "explain.py"


def demo_checkpoint(path: Path, manifest: Path | None = None) -> Path:
    """A random-weight checkpoint of the synthetic demo's model (configs/demo.yaml) on its fold 0 of ``manifest``
    (default: the synthetic default's), written to ``path``."""
    import torch
    import yaml

    from ctcdam.data.datamodule import NoduleDataModule
    from ctcdam.models.checkpoint import checkpoint_record
    from ctcdam.models.module import NoduleModule
    from ctcdam.workflows.defaults import ensure_default_data

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    model = demo["model"]
    torch.manual_seed(0)
    module = NoduleModule(backbone=model["backbone"], weights="none", img_size=model["img_size"],
                          backbone_kwargs=model["backbone_kwargs"], finetune=model["finetune"])
    data = NoduleDataModule(manifest=str(manifest or ensure_default_data().manifest), input_config=module.input_config,
                            fold=0, n_folds=demo["data"]["n_folds"], val_fraction=demo["data"]["val_fraction"])
    data.setup("fit")
    record = checkpoint_record(module.model_config(data.record()), data.scaler, data.record())
    state = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    torch.save({"state_dict": state, "ctcdam": record}, path)
    return Path(path)


def _explain(args: Sequence[str], threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of one ``pipelines/explain.py`` process and its children; RuntimeError with its last
    lines when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    command = [sys.executable, str(EXPLAIN_SCRIPT), *args, "-q", *([] if threads is None else ["--threads", str(threads)])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {' '.join(done.stderr.strip().splitlines()[-3:])}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _stage_seconds(out: Path, scan_ids: Sequence[str]) -> dict[str, float]:
    totals = dict.fromkeys(STAGES, 0.0)
    for scan_id in scan_ids:
        record = json.loads((out / scan_id / "bundle.json").read_text())
        for stage in STAGES:
            totals[stage] += float(record.get("seconds", {}).get(stage, 0.0))
    return {stage: round(value, 3) for stage, value in totals.items()}


def benchmark_explain(checkpoint: Path | None = None, scan_ids: Sequence[str] | None = None, n_scans: int = 5,
                      workers: int = 1, threads: int | None = 1, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Nodules per second of the cohort command and of a loop of single-scan commands on the same scans (default:
    ``n_scans`` of the checkpoint's scans, its test fold first), the cohort's time split and the CPU seconds of
    both. ``extra_args`` go to both, e.g. ``("--no-volume",)``."""
    with tempfile.TemporaryDirectory(prefix="ctcdam-explain-benchmark-") as scratch:
        scratch = Path(scratch)
        if checkpoint is None:
            checkpoint = demo_checkpoint(scratch / "demo-random.ckpt")
        if not scan_ids:
            import torch

            data = torch.load(checkpoint, map_location="cpu", weights_only=True)["ctcdam"]["data"]
            test = split_scans(data, "test")
            scan_ids = [*test, *(s for s in split_scans(data, "all") if s not in test)][:n_scans]
        common = ["--checkpoint", str(checkpoint), *extra_args]
        runs = [_explain(["--scan", scan_id, "--out", str(scratch / "loop"), *common], threads) for scan_id in scan_ids]
        loop, loop_cpu = sum(wall for wall, _ in runs), sum(cpu for _, cpu in runs)
        cohort, cohort_cpu = _explain(["--scans", *scan_ids, "--out", str(scratch / "cohort"), "--workers",
                                       str(workers), *common], threads)
        index = worklist.read_index(str(scratch / "cohort"))
        nodules = len(index)
        loop_nodules = sum(len(json.loads((scratch / "loop" / s / "predictions.json").read_text())["nodules"])
                           for s in scan_ids)
        if loop_nodules != nodules:
            raise RuntimeError(f"the loop explained {loop_nodules} nodules, the cohort {nodules}")
        seconds = _stage_seconds(scratch / "cohort", scan_ids)
    cores = len(os.sched_getaffinity(0))
    return {
        "ratios": {"cohort_vs_loop": loop / cohort},
        "nodules_per_s": nodules / cohort,
        "seconds": seconds,
        "targets": dict(TARGETS),
        "loop_nodules_per_s": nodules / loop,
        "wall_seconds": {"cohort": round(cohort, 2), "loop": round(loop, 2)},
        "cpu_seconds": {"cohort": round(cohort_cpu, 2), "loop": round(loop_cpu, 2)},
        "cores": cores,
        "cohort_cpu_use": cohort_cpu / (cohort * cores),
        "bounds": {"cohort_vs_loop_at_full_cpu": loop / (cohort_cpu / cores)},
        "scans": list(scan_ids),
        "nodules": nodules,
        "workers": workers,
        "threads": threads,
        "extra_args": list(extra_args),
    }
