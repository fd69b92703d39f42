"""Preprocess LIDC-IDRI into nodule crops: manifest.csv, failures.csv, one HU crop + consensus mask per nodule.

Without --lidc-root, the embedded synthetic LIDC (phantom CT for real LIDC annotations) is generated
once and preprocessed into ctcdam's cache folder, the one copy that train.py uses. The work itself lives in
ctcdam.workflows.preprocess and ctcdam.preprocess.run; this file parses and wires.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ctcdam.cli.common import (
    ArgumentParser, add_out, add_verbosity, exit_process, name_list, positive_int, report_error, setup_logging,
)
from ctcdam.io import OutputError
from ctcdam.lidc.crops import CropSpec
from ctcdam.lidc.scan_nodules import PreprocessConfig
from ctcdam.preprocess.run import RunSummary
from ctcdam.workflows.preprocess import preprocess

PROG = "preprocess.py"
EXAMPLES = """\
  python pipelines/preprocess.py                                   # synthetic default -> its cache copy (train.py's)
  python pipelines/preprocess.py --lidc-root /data/LIDC-IDRI --out outputs/lidc --workers 8
  python pipelines/preprocess.py --lidc-root /data/LIDC-IDRI --out outputs/lidc --scans LIDC-IDRI-0001,LIDC-IDRI-0003
  python pipelines/preprocess.py --lidc-root /data/LIDC-IDRI --out outputs/lidc --shard 3/16 --resume   # SLURM array task 3 of 16
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = ArgumentParser(PROG, __doc__, EXAMPLES)
    parser.add_argument("--lidc-root", type=Path, help="LIDC-IDRI root (<root>/LIDC-IDRI-xxxx/...); default: synthetic LIDC")
    add_out(parser, None, "output folder (default: outputs/preprocess; without --lidc-root the synthetic default's "
            "copy in $CTCDAM_CACHE, the one train.py reads)")
    parser.add_argument("--scans", type=name_list(what="scan id"), metavar="IDS",
                        help="comma-separated scan ids, or all (default: every patient folder of the root)")
    parser.add_argument("--min-annotations", type=int, default=3, help="readers needed for a nodule (default: %(default)s)")
    parser.add_argument("--crop-mm", type=float, default=32.0, help="edge of the cubic crop in mm (default: %(default)s)")
    parser.add_argument("--spacing-mm", type=float, default=1.0, help="crop voxel spacing in mm (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=1, help="parallel scan workers (default: %(default)s)")
    parser.add_argument("--shard", default="0/1", metavar="i/n", help="process every n-th scan from i, 0 <= i < n (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="skip scans finished by an earlier run with the same settings")
    add_verbosity(parser)
    return parser.parse_args(argv)


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not of the form i/n (e.g. 0/4)") from None
    return index, count


def _summary_table(summary: RunSummary) -> Table:
    table = Table(title="preprocessing summary", show_header=False)
    table.add_row("scans ok / failed / pending", f"{summary.scans_ok} / {summary.scans_failed} / {summary.scans_pending}")
    if summary.scans_resumed:
        table.add_row("scans resumed (skipped)", str(summary.scans_resumed))
    table.add_row("nodules", str(summary.nodules))
    table.add_row("malignant / benign / ambiguous", " / ".join(str(summary.labels[k]) for k in ("malignant", "benign", "ambiguous")))
    table.add_row("failure rows", f"{summary.failures} ({summary.failures_path})")
    table.add_row("manifest", str(summary.manifest_path))
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing; exit status 0, or 2 with one sentence on bad input."""
    args = parse_args(argv)
    console = Console(stderr=True)
    setup_logging(args, logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    try:
        config = PreprocessConfig(
            min_annotations=args.min_annotations, crop=CropSpec(size_mm=args.crop_mm, spacing_mm=args.spacing_mm)
        )
        with Progress(
            TextColumn("[bold]preprocess"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=args.quiet,
        ) as bar:

            def progress(total: int):
                task = bar.add_task("", total=total)
                return lambda scan_id: bar.update(task, advance=1, description=scan_id)

            summary = preprocess(
                args.lidc_root, args.out, args.scans, config,
                workers=args.workers, shard=_shard(args.shard), resume=args.resume, progress=progress,
            )
    except OutputError as error:
        return report_error(PROG, f"{error}; nothing of the interrupted scan was kept, rerun with --resume once the "
                            "output folder is writable")
    except (ValueError, FileNotFoundError) as error:
        return report_error(PROG, error)
    console.print(_summary_table(summary))
    return 0


if __name__ == "__main__":
    exit_process(main())
