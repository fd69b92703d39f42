"""Where training runs live and how later stages find one (no torch import: CLIs check arguments fast)."""
from __future__ import annotations

from pathlib import Path

#: Parent folder of training runs (relative to the working directory, as the pipelines' --output_dir).
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


def resolve_device(name: str = "auto") -> str:
    """A torch device name: ``auto`` is the first CUDA device when one is available, else the CPU."""
    if name != "auto":
        return name
    import torch  # deferred: callers check their arguments before paying for the import

    return "cuda" if torch.cuda.is_available() else "cpu"
