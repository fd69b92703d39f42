"""Where bundles are written: checks on the output folder (stdlib only, so the CLI rejects a bad path before it
pays for importing torch)."""
from __future__ import annotations

import os
from pathlib import Path


class BundleError(RuntimeError):
    """A bundle cannot be written (the output location is unusable)."""


def check_output_root(out_root: Path) -> Path:
    """BundleError with one sentence when ``out_root`` exists and is not a folder (nothing is created)."""
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise BundleError(f"--out {out_root} is a file, not a folder; give a folder for the review bundles")
    return out_root


def prepare_output_root(out_root: Path) -> Path:
    """Check and create the output folder; BundleError with one sentence when it cannot hold bundles."""
    out_root = check_output_root(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BundleError(f"cannot create the output folder {out_root}: {error.strerror or error}") from None
    if not os.access(out_root, os.W_OK):
        raise BundleError(f"the output folder {out_root} is not writable")
    return out_root
