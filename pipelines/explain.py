"""Explain one scan's nodules, or a cohort's, with CDAM and write 3D Slicer review bundles.

Defaults: the newest checkpoint under outputs/train, the data that checkpoint was trained on (the
synthetic default included), all targets, vanilla CDAM, all three views, the 3D map, --out outputs/explain.
Output: OUT/<scan_id>/ with <scan_id>.mrb (open in 3D Slicer), review.py, report.png, predictions.json.
A cohort (--scans, --split, --scans-file) loads the model once and adds OUT/index.csv (most suspicious first),
OUT/failures.csv and OUT/review_cohort.py, the worklist for Slicer that records ratings in OUT/ratings.csv;
--summarise-ratings OUT summarises them. The work lives in ctcdam.workflows.explain_run and explain_cohort.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from ctcdam.cli.common import (
    ArgumentParser,
    add_device,
    add_out,
    add_shard,
    add_threads,
    add_verbosity,
    exit_process,
    name_list,
    non_negative_int,
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
from ctcdam.workflows.explain_cohort import DEFAULT_BATCH, SORT_KEYS, SPLITS, run_cohort
from ctcdam.workflows.explain_run import run_explain
from ctcdam.workflows.worklist import summarise_ratings, summary_text

PROG = "explain.py"
EXAMPLES = """\
  python pipelines/explain.py --scan LIDC-IDRI-0078
  python pipelines/explain.py --scan LIDC-IDRI-0003 --lidc-root ../shared/lidc-sample --method smooth \\
      --targets malignancy,spiculation --concept "spiculation>=4"
  python pipelines/explain.py --scan LIDC-IDRI-0078 --targets all --views axial --device cuda:0 -v
  python pipelines/explain.py --split test --out outputs/cohort --workers 2          # the checkpoint's test fold
  python pipelines/explain.py --scans LIDC-IDRI-0003 LIDC-IDRI-0013 --out outputs/cohort --no-volume
  python pipelines/explain.py --scans-file reader_study.txt --out /shared/cohort --device cuda \\
      --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --resume       # then once more with --resume: the index
  python pipelines/explain.py --summarise-ratings outputs/cohort                     # after the reader's ratings
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
    cohort = p.add_mutually_exclusive_group(required=True)
    cohort.add_argument("--scan", help="scan id, e.g. LIDC-IDRI-0078 (one bundle)")
    cohort.add_argument("--scans", nargs="+", type=name_list(what="scan id"), metavar="ID",
                        help="a cohort of scan ids (space- or comma-separated): bundles, index, worklist")
    cohort.add_argument("--split", choices=SPLITS, help="a cohort: the scans of the checkpoint's own train/val/test fold")
    cohort.add_argument("--scans-file", type=Path, metavar="FILE", help="a cohort: scan ids in a file, one per line")
    cohort.add_argument("--summarise-ratings", type=Path, metavar="OUT",
                        help="summarise the reader's ratings.csv of the cohort folder OUT (nothing is explained)")
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
    p.add_argument("--workers", type=non_negative_int, default=1,
                   help="cohort: processes that write bundles (2 or more: and load scans) beside the model's (0: all in one; default: 1)")
    add_shard(p)
    p.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH, metavar="N",
                   help="cohort: images per explain call, packed across a scan's nodules (default: %(default)s)")
    p.add_argument("--sort-by", choices=SORT_KEYS, default="malignancy",
                   help="cohort: index order, a target's prediction highest first, or scan (default: %(default)s)")
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
        if args.summarise_ratings is not None:
            print(summary_text(summarise_ratings(str(args.summarise_ratings))))
            return 0
        with torch_threads(args.threads):
            if args.scan is not None:
                outcome = run_explain(args.scan, args.out, checkpoint=args.checkpoint, lidc_root=args.lidc_root,
                                      method=args.method, targets=args.targets, views=args.views, volume=args.volume,
                                      concept=args.concept, method_options=options, device=args.device)
            else:
                scans = None if args.scans is None else [s for group in args.scans for s in group]
                outcome = run_cohort(args.out, scans=scans, split=args.split, scans_file=args.scans_file,
                                     checkpoint=args.checkpoint, lidc_root=args.lidc_root, method=args.method,
                                     targets=args.targets, views=args.views, volume=args.volume, concept=args.concept,
                                     method_options=options, device=args.device, workers=args.workers,
                                     shard=args.shard, resume=args.resume, batch=args.batch, sort_by=args.sort_by)
    except (ValueError, FileNotFoundError, BundleError, OutputError) as error:
        return report_error(PROG, error)
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    exit_process(main())
