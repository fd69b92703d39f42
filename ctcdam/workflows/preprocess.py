"""A preprocessing run on a LIDC root, or on the synthetic default when no root is given (what pipelines/preprocess.py calls)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ctcdam.lidc.scan_nodules import PreprocessConfig
from ctcdam.preprocess.run import RunSummary, run_preprocess
from ctcdam.workflows.defaults import preprocess_default

#: Output folder of a real-data run given no --out.
DEFAULT_OUT = Path("outputs/preprocess")


def preprocess(
    lidc_root: Path | None,
    out_dir: Path | None = None,
    scan_ids: Sequence[str] | None = None,
    config: PreprocessConfig | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    resume: bool = False,
    progress: Callable[[int], Callable[[str], None]] | None = None,
) -> RunSummary:
    """Preprocess ``lidc_root`` into ``out_dir`` (default outputs/preprocess); without a root, the synthetic default
    into its one cache copy (the one training uses) unless ``out_dir`` is given."""
    if lidc_root is None:
        return preprocess_default(config, out_dir=out_dir, scan_ids=scan_ids, workers=workers, shard=shard,
                                  resume=resume, progress=progress)
    return run_preprocess(lidc_root, out_dir or DEFAULT_OUT, scan_ids, config, workers=workers, shard=shard,
                          resume=resume, progress=progress)
