"""One explain run (what pipelines/explain.py calls): checks that need no model first, then load the checkpoint,
explain the scan, write the bundle.

The checks on paths and scan ids run before torch, timm and pylidc are imported, so a mistyped argument is
answered in about a second instead of after ~15 s of imports; that is why the heavy imports sit inside
:func:`run_explain` instead of at the top of this module.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctcdam.export.paths import check_output_root
from ctcdam.models.device import resolve_device
from ctcdam.workflows.sources import check_scan_present, existing_checkpoint, newest_checkpoint, recorded_lidc_root

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RunOutcome:
    """Where the bundle went and what it holds (for the CLI's closing summary)."""

    bundle: Path
    checkpoint: Path
    lidc_root: Path
    nodules: list[dict[str, Any]]  # nodule_id, in_training_population, predictions, radiologists
    note: str
    details: dict[str, Any]
    write_seconds: float

    def summary(self) -> str:
        """What the CLI prints: sources, concept, per nodule predictions (readers' value) and cost, the bundle."""
        lines = [f"checkpoint: {self.checkpoint}", f"data: {self.lidc_root}"]
        concept = self.details.get("concept")
        if concept:
            lines.append(f"concept {concept['query']}: mean embedding of {concept['training_examples']} training nodules")
        if self.note:
            lines.append(self.note)
        cost = {row["nodule_id"]: row for row in self.details.get("timing", {}).get("nodules", [])}
        for nodule in self.nodules:
            readers = nodule["radiologists"]
            values = "  ".join(f"{t}={v:.3g}" + ("" if readers.get(t) is None else f" ({readers[t]:.3g})")
                               for t, v in nodule["predictions"].items())
            row = cost.get(nodule["nodule_id"], {})
            lines.append(f"{nodule['nodule_id']}{'' if nodule['in_training_population'] else ' [unlabelled]'}: {values}"
                         f"  [{row.get('images', 0)} images in {row.get('explain_s', 0.0):.2f} s]")
        lines.append(f"{len(self.nodules)} nodule(s) explained (model, readers' value in brackets); bundle written "
                     f"in {self.write_seconds:.1f} s: {self.bundle}")
        lines.append(f"open {self.bundle / (self.bundle.name + '.mrb')} in 3D Slicer, or run "
                     f"`Slicer --python-script {self.bundle / 'review.py'}`")
        return "\n".join(lines)


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
    device: str = "auto",
) -> RunOutcome:
    """Explain one scan with a checkpoint and write its review bundle to ``out_root/<scan_id>``."""
    out_root = check_output_root(Path(out_root))
    checkpoint = existing_checkpoint(checkpoint) if checkpoint is not None else newest_checkpoint()
    if lidc_root is not None:
        check_scan_present(scan_id, lidc_root)

    from ctcdam.data.views import VIEWS
    from ctcdam.export.bundle import write_bundle
    from ctcdam.models.checkpoint import load_for_inference
    from ctcdam.targets import TARGETS
    from ctcdam.workflows.explain_scan import ExplainSettings, explain_scan

    settings = ExplainSettings(method=method, targets=tuple(targets or TARGETS), views=tuple(views or VIEWS),
                               volume=volume, concept=concept, method_options=dict(method_options or {}))
    device = resolve_device(device)
    loaded = load_for_inference(checkpoint, map_location=device)
    if lidc_root is None:
        lidc_root = recorded_lidc_root(loaded.data, checkpoint)
        check_scan_present(scan_id, lidc_root)
    result = explain_scan(scan_id, loaded, Path(lidc_root), settings)
    start = time.perf_counter()
    bundle = write_bundle(result, out_root)
    write_seconds = time.perf_counter() - start
    nodules = [{"nodule_id": n.nodule_id, "in_training_population": n.in_training_population, "predictions": dict(n.predictions),
                "radiologists": dict(n.radiologists)} for n in result.nodules]
    return RunOutcome(bundle=bundle, checkpoint=checkpoint, lidc_root=Path(lidc_root), nodules=nodules,
                      note=result.note, details=dict(result.details), write_seconds=write_seconds)
