"""Speed of head fine-tuning with and without the embedding cache, as a ratio measured in one run."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ctcdam.models.cli import main as train_main


def head_cache_speedup(
    manifest: str | Path | None = None,
    model: str = "vit_small_patch16_224.dino",
    img_size: int = 112,
    epochs: int = 10,
    batch_size: int = 32,
    threads: int | None = 1,
    extra_args: tuple[str, ...] = (),
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
        *([f"--torch_threads={threads}"] if threads is not None else []),
        *extra_args,
    ]
    with tempfile.TemporaryDirectory(prefix="ctcdam-head-cache-") as out:
        runs = {
            cached: train_main([*args, f"--model.cache_embeddings={str(cached).lower()}", f"--output_dir={out}", f"--run_name=cache-{cached}"])
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
