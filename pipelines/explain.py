"""Explain one scan's nodules with CDAM and write a 3D Slicer review bundle.

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

from ctcdam.cli.common import (
    ArgumentParser,
    add_device,
    add_out,
    add_threads,
    add_verbosity,
    name_list,
    positive_int,
    report_error,
    setup_logging,
    torch_threads,
)
from ctcdam.data.views import VIEWS
from ctcdam.explain import list_methods, method_info
from ctcdam.export.paths import BundleError
from ctcdam.io import OutputError
from ctcdam.targets import TARGETS
from ctcdam.workflows.explain_run import run_explain

PROG = "explain.py"
EXAMPLES = """\
  python pipelines/explain.py --scan LIDC-IDRI-0078
  python pipelines/explain.py --scan LIDC-IDRI-0003 --lidc-root ../shared/lidc-sample --method smooth \\
      --targets malignancy,spiculation --concept "spiculation>=4"
  python pipelines/explain.py --scan LIDC-IDRI-0078 --targets all --views axial --device cuda:0 -v
"""

#: The CDAM variants (the registry's "cdam" family; its metadata loads without torch).
METHODS = tuple(list_methods(family="cdam"))
#: Command-line flags that set one keyword option of the chosen method.
OPTION_FLAGS = {"samples": "--samples", "steps": "--steps"}


def _taking(option: str) -> str:
    """The CDAM variants that take ``option``, for the help text."""
    return ", ".join(m for m in METHODS if option in method_info(m).options) or "no method"


def method_options(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, int]:
    """The method options given on the command line; a flag the chosen method does not take is an error."""
    options = {option: getattr(args, option) for option in OPTION_FLAGS if getattr(args, option) is not None}
    for option in options:
        if option not in method_info(args.method).options:
            p.error(f"{OPTION_FLAGS[option]} is not an option of --method {args.method} (it is of {_taking(option)})")
    return options


def parser() -> argparse.ArgumentParser:
    """The command line of explain.py."""
    p = ArgumentParser(PROG, __doc__, EXAMPLES)
    p.add_argument("--scan", required=True, help="scan id, e.g. LIDC-IDRI-0078")
    p.add_argument("--checkpoint", type=Path, help="training checkpoint (default: newest under outputs/train)")
    p.add_argument("--lidc-root", type=Path, help="LIDC-IDRI DICOM root (default: the checkpoint's data)")
    add_out(p, "outputs/explain", "output folder; the bundle goes to OUT/<scan_id>/")
    p.add_argument("--method", choices=METHODS, default="cdam", help="CDAM variant (default: %(default)s)")
    p.add_argument("--targets", type=name_list(TARGETS, "target"), default=TARGETS,
                   help=f"comma-separated targets or 'all' (default: all = {','.join(TARGETS)})")
    p.add_argument("--views", type=name_list(VIEWS, "view"), default=VIEWS,
                   help="comma-separated views or 'all' (default: axial,coronal,sagittal)")
    p.add_argument("--concept", help="concept map from training nodules matching a query, e.g. 'spiculation>=4'")
    p.add_argument("--no-volume", dest="volume", action="store_false",
                   help="skip the 3D map (explain only the centre slice of each view)")
    p.add_argument("--samples", type=positive_int, help=f"noise samples of {_taking('samples')} (default 50)")
    p.add_argument("--steps", type=positive_int, help=f"path steps of {_taking('steps')} (default 50)")
    add_device(p)
    add_threads(p)
    add_verbosity(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 a bad argument or input, with one readable sentence)."""
    p = parser()
    args = p.parse_args(argv)
    options = method_options(args, p)
    setup_logging(args, logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with torch_threads(args.threads):
            outcome = run_explain(args.scan, args.out, checkpoint=args.checkpoint, lidc_root=args.lidc_root,
                                  method=args.method, targets=args.targets, views=args.views, volume=args.volume,
                                  concept=args.concept, method_options=options, device=args.device)
    except (ValueError, FileNotFoundError, BundleError, OutputError) as error:
        return report_error(PROG, error)
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
