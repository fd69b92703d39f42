"""The torch device a run uses, from a ``--device`` name (no torch import until a device is resolved)."""
from __future__ import annotations


def resolve_device(name: str = "auto") -> str:
    """A torch device name: ``auto`` is the first CUDA device when one is available, else the CPU.

    A CUDA or MPS device that torch cannot see raises ValueError in one sentence (not a traceback from deep inside torch).
    """
    import torch  # deferred: callers check their arguments before paying for the import

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"device {name} was asked for, but torch sees {seen} CUDA device(s); use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for, but torch sees no MPS device; use --device cpu or auto")
    return name
