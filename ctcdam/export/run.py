"""One explain run: checks that need no model first, then load the checkpoint, explain the scan, write the bundle.

The checks on paths and scan ids run before torch, timm and pylidc are imported, so a mistyped argument is
answered in about a second instead of after ~15 s of imports; that is why the heavy imports sit inside
:func:`run_explain` instead of at the top of this module.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctcdam.export.paths import existing_checkpoint, newest_checkpoint, prepare_output_root

log = logging.getLogger(__name__)

#: Preprocessed synthetic default: <cache>/synthetic-preprocessed/manifest.csv beside <cache>/synthetic-lidc/.
SYNTHETIC_PREPROCESSED_DIR = "synthetic-preprocessed"


@dataclass(frozen=True)
class RunOutcome:
    """Where the bundle went and what it holds (for the CLI's closing summary)."""

    bundle: Path
    checkpoint: Path
    lidc_root: Path
    nodules: list[dict[str, Any]]  # nodule_id, labelled, predictions, radiologists
    note: str
    details: dict[str, Any]


def check_scan_present(scan_id: str, lidc_root: Path) -> None:
    """FileNotFoundError for a missing data folder; ValueError listing the closest ids for a missing scan."""
    lidc_root = Path(lidc_root)
    if not lidc_root.is_dir():
        raise FileNotFoundError(f"LIDC root {lidc_root} is not a folder (pass --lidc-root DIR)")
    present = sorted(p.name for p in lidc_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if scan_id not in present:
        close = difflib.get_close_matches(scan_id, present, n=3, cutoff=0.0) or present[:3]
        raise ValueError(f"scan {scan_id!r} is not under {lidc_root}; closest scan ids there: "
                         f"{', '.join(close) or 'none (the folder holds no scan)'}")


def default_lidc_root(data: dict[str, Any], checkpoint: Path) -> Path:
    """The DICOM root a checkpoint was trained on: its recorded lidc_root, else the synthetic default's DICOM
    (generated if missing) when it was trained on the synthetic default."""
    if data.get("lidc_root"):
        return Path(data["lidc_root"])
    manifest = Path(str(data.get("manifest", "")))
    if manifest.parent.name == SYNTHETIC_PREPROCESSED_DIR:
        from ctcdam.synthetic.default import ensure_default_dicom

        return Path(ensure_default_dicom(manifest.parent.parent, progress=False))
    raise ValueError(f"checkpoint {checkpoint} does not record the DICOM root of its data (ctcdam.data.lidc_root); "
                     "pass --lidc-root DIR")


def run_explain(
    scan_id: str,
    out_root: Path,
    checkpoint: Path | None = None,
    lidc_root: Path | None = None,
    method: str = "cdam",
    targets: tuple[str, ...] | None = None,
    views: tuple[str, ...] | None = None,
    volume: bool = True,
    concept: str | None = None,
    method_options: dict[str, Any] | None = None,
) -> RunOutcome:
    """Explain one scan with a checkpoint and write its review bundle to ``out_root/<scan_id>``."""
    out_root = prepare_output_root(Path(out_root))
    checkpoint = existing_checkpoint(checkpoint) if checkpoint is not None else newest_checkpoint()
    if lidc_root is not None:
        check_scan_present(scan_id, lidc_root)

    from ctcdam.export.bundle import write_bundle
    from ctcdam.export.scan import ExplainSettings, explain_scan
    from ctcdam.models.checkpoint import load_for_inference
    from ctcdam.targets import TARGETS, VIEWS

    settings = ExplainSettings(method=method, targets=tuple(targets or TARGETS), views=tuple(views or VIEWS),
                               volume=volume, concept=concept, method_options=dict(method_options or {}))
    loaded = load_for_inference(checkpoint)
    if lidc_root is None:
        lidc_root = default_lidc_root(loaded.data, checkpoint)
        check_scan_present(scan_id, lidc_root)
    result = explain_scan(scan_id, loaded, Path(lidc_root), settings)
    bundle = write_bundle(result, out_root)
    return RunOutcome(bundle=bundle, checkpoint=checkpoint, lidc_root=Path(lidc_root), nodules=[{"nodule_id": n.nodule_id, "labelled": n.labelled, "predictions": dict(n.predictions),
                               "radiologists": dict(n.radiologists)} for n in result.nodules],
                      note=result.note, details=dict(result.details))
