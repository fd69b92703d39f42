"""Explain one scan's nodules with CDAM and write a 3D Slicer review bundle.

Example:
  python pipelines/explain.py --scan LIDC-IDRI-0078
  python pipelines/explain.py --scan LIDC-IDRI-0003 --lidc-root ../shared/lidc-sample --method smooth \\
      --targets malignancy,spiculation --concept "spiculation>=4"

Defaults: the newest checkpoint under outputs/train, the data that checkpoint was trained on (the
synthetic default included), all targets, vanilla CDAM, all three views, the 3D map, --out outputs/explain.
Output: OUT/<scan_id>/ with <scan_id>.mrb (open in 3D Slicer), review.py, report.png, predictions.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ctcdam.export.paths import BundleError
from ctcdam.export.run import run_explain
from ctcdam.targets import TARGETS, VIEWS

METHODS = ("cdam", "smooth", "integrated")


def _names(text: str, valid: Sequence[str], what: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return tuple(valid)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(valid)} or 'all'")
    return names


def parser() -> argparse.ArgumentParser:
    """The command line of explain.py."""
    p = argparse.ArgumentParser(
        prog="explain.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", required=True, help="scan id, e.g. LIDC-IDRI-0078")
    p.add_argument("--checkpoint", type=Path, help="training checkpoint (default: newest under outputs/train)")
    p.add_argument("--lidc-root", type=Path, help="LIDC-IDRI DICOM root (default: the checkpoint's data)")
    p.add_argument("--out", type=Path, default=Path("outputs/explain"), help="output folder (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default="cdam", help="CDAM variant (default: %(default)s)")
    p.add_argument("--targets", type=lambda t: _names(t, TARGETS, "target(s)"), default=TARGETS,
                   help=f"comma-separated targets or 'all' (default: all = {','.join(TARGETS)})")
    p.add_argument("--views", type=lambda t: _names(t, VIEWS, "view(s)"), default=VIEWS,
                   help="comma-separated views (default: axial,coronal,sagittal)")
    p.add_argument("--concept", help="concept map from training nodules matching a query, e.g. 'spiculation>=4'")
    p.add_argument("--no-volume", dest="volume", action="store_false",
                   help="skip the 3D map (explain only the centre slice of each view)")
    p.add_argument("--samples", type=int, help="smooth: noise samples (default 50); integrated: path steps (default 50)")
    p.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 a bad argument or input, with one readable sentence)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    options = {}
    if args.samples is not None:
        options = {"samples": args.samples} if args.method == "smooth" else {"steps": args.samples}
    try:
        outcome = run_explain(args.scan, args.out, checkpoint=args.checkpoint, lidc_root=args.lidc_root,
                              method=args.method, targets=args.targets, views=args.views, volume=args.volume,
                              concept=args.concept, method_options=options, device=args.device)
    except (ValueError, FileNotFoundError, BundleError) as error:
        print(f"explain.py: error: {error}", file=sys.stderr)
        return 2
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
