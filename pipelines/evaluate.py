"""Evaluate CDAM against the baselines on a checkpoint's test fold: correctness, compactness, class sensitivity,
localisation and sanity, per nodule x view x method x target.

Writes outputs/evaluate/<run>/: metrics.csv, class_sensitivity.csv, sanity.csv, curves.csv, summary.md,
deletion_curves.png, metrics.png (and failures.csv when something was skipped). Metric definitions:
ctcdam/explain/metrics.py and docs/evaluation.md. The work lives in ctcdam.explain.evaluation.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from ctcdam.explain.evaluation import DEFAULT_METHODS, EvaluationConfig, evaluate, newest_checkpoint
from ctcdam.models.checkpoint import CheckpointError
from ctcdam.targets import TARGETS, VIEWS

EXAMPLES = """\
examples:
  python pipelines/evaluate.py                                   # newest outputs/train/*/best.ckpt, every method
  python pipelines/evaluate.py --max-nodules 10 --methods cdam,smooth,attention,random
  python pipelines/evaluate.py --checkpoint outputs/train/lidc-20250101-120000/best.ckpt --targets malignancy,spiculation --device cuda
"""


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint (default: the newest under outputs/train)")
    parser.add_argument("--methods", type=_names, default=DEFAULT_METHODS, help=f"comma-separated (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--targets", type=_names, default=TARGETS, help="comma-separated target names (default: all nine)")
    parser.add_argument("--views", type=_names, default=VIEWS, help=f"comma-separated (default: {','.join(VIEWS)})")
    parser.add_argument("--max-nodules", type=int, help="evaluate only the first N test nodules (default: all)")
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluate"), help="parent of the run folder (default: %(default)s)")
    parser.add_argument("--run", help="run folder name (default: the training run's folder name)")
    parser.add_argument("--batch-nodules", type=int, default=4, help="nodules explained per batch (default: %(default)s)")
    parser.add_argument("--sanity-nodules", type=int, default=2, help="nodules in the re-initialisation test (default: %(default)s)")
    parser.add_argument("--removal", choices=("drop", "baseline"), default="drop",
                        help="deletion removes tokens from the sequence (drop) or pastes air patches (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; exit status 0, or 2 with one sentence on bad input."""
    args = parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        config = EvaluationConfig(
            checkpoint=args.checkpoint or newest_checkpoint(),
            out_dir=args.out, run=args.run, methods=args.methods, targets=args.targets, views=args.views,
            max_nodules=args.max_nodules, nodules_per_batch=args.batch_nodules, sanity_nodules=args.sanity_nodules,
            removal=args.removal, device=args.device, progress=not args.quiet,
        )
        out = evaluate(config)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        return 2
    console.print(f"evaluation written to {out} (summary: {out / 'summary.md'})", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
