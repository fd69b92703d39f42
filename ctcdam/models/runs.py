"""Where training runs live and how later stages find one (no torch import: CLIs check arguments fast)."""
from __future__ import annotations

from pathlib import Path

from ctcdam.models.device import resolve_device  # noqa: F401  (moved to models/device.py; kept until callers switch)

#: Parent folder of training runs (relative to the working directory, as train.py's --out).
TRAIN_OUTPUTS = Path("outputs/train")


def newest_checkpoint(root: Path = TRAIN_OUTPUTS) -> Path:
    """The most recently written ``best.ckpt`` under ``root`` (any ``*.ckpt`` when there is none)."""
    root = Path(root)
    candidates = (sorted(root.rglob("best.ckpt")) or sorted(root.rglob("*.ckpt"))) if root.is_dir() else []
    if not candidates:
        raise FileNotFoundError(
            f"no checkpoint under {root}: train one with `python pipelines/train.py` or pass --checkpoint PATH"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
