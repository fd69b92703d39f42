"""Evaluate CDAM against the baselines on a checkpoint's test fold: correctness, compactness, class sensitivity,
localisation and sanity, per nodule x view x method x target.

Writes outputs/evaluate/<run>/: metrics.csv, class_sensitivity.csv, sanity.csv, curves.csv, summary.md,
deletion_curves.png, metrics.png (and failures.csv when something was skipped). Metric definitions:
ctcdam/explain/metrics.py and docs/evaluation.md. The work lives in ctcdam.evaluate; this file parses arguments.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from ctcdam.cli.common import (
    ArgumentParser,
    add_device,
    add_out,
    add_run,
    add_threads,
    add_verbosity,
    exit_process,
    name_list,
    positive_int,
    report_error,
    setup_logging,
    torch_threads,
)
from ctcdam.data.views import VIEWS
from ctcdam.evaluate import DEFAULT_METHODS, EvaluationConfig, evaluate
from ctcdam.io import OutputError
from ctcdam.models.checkpoint import CheckpointError
from ctcdam.models.runs import newest_checkpoint
from ctcdam.targets import TARGETS

PROG = "evaluate.py"
EXAMPLES = """\
  python pipelines/evaluate.py                                   # newest outputs/train/*/best.ckpt, every method
  python pipelines/evaluate.py --max-nodules 10 --methods cdam,smooth,attention,random
  python pipelines/evaluate.py --checkpoint outputs/train/lidc-20250101-120000/best.ckpt --targets malignancy,spiculation --device cuda
  python pipelines/evaluate.py --benchmark known-cause --json    # painted causes: generates, trains, evaluates
  python pipelines/evaluate.py --benchmark known-cause --depth 8 --max-nodules 40
  python pipelines/evaluate.py --benchmark known-cause --checkpoint <run>/best.ckpt --no-scan-space
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = ArgumentParser(PROG, __doc__, EXAMPLES)
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint (default: the newest under outputs/train)")
    # methods are checked against the registry by EvaluationConfig ('all': every registered method)
    parser.add_argument("--methods", type=name_list(None, "method"), default=DEFAULT_METHODS,
                        help=f"comma-separated or 'all' (default: all = {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--targets", type=name_list(TARGETS, "target"), default=TARGETS,
                        help="comma-separated target names or 'all' (default: all nine)")
    parser.add_argument("--views", type=name_list(VIEWS, "view"), default=VIEWS,
                        help=f"comma-separated or 'all' (default: {','.join(VIEWS)})")
    parser.add_argument("--max-nodules", type=positive_int, help="evaluate only the first N test nodules (default: all)")
    add_out(parser, "outputs/evaluate", "parent of the run folder")
    add_run(parser, "run folder name under --out (default: the training run's folder name)")
    parser.add_argument("--batch-nodules", type=positive_int, default=4, help="nodules explained per batch (default: %(default)s)")
    parser.add_argument("--sanity-nodules", type=int, default=2, help="nodules in the re-initialisation test (default: %(default)s)")
    parser.add_argument("--removal", choices=("drop", "baseline"), default="drop",
                        help="deletion removes tokens from the sequence (drop) or pastes air patches (default: %(default)s)")
    parser.add_argument("--benchmark", choices=("known-cause",),
                        help="the known-cause benchmark: generate the painted set, train (or reuse) its model, evaluate "
                             "every method against the cause masks (writes under OUT/known-cause/)")
    parser.add_argument("--depth", type=positive_int, default=4, help="--benchmark: blocks of its ViT (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=60, help="--benchmark: training epochs (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="--benchmark: print one JSON object last")
    parser.add_argument("--no-scan-space", dest="scan_space", action="store_false",
                        help="--benchmark: skip the scan-space step (explain the test scans with 3D malignancy maps "
                             "and test each map's mass centre against the dilated cause masks; minutes on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="--benchmark: the short version (the default set's 45 scans, 30 epochs, 8 nodules, fast "
                             "methods), as make demo runs it")
    add_device(parser)
    add_threads(parser)
    add_verbosity(parser)
    args = parser.parse_args(argv)
    if (args.json or args.quick or not args.scan_space) and not args.benchmark:
        parser.error("--json, --quick and --no-scan-space go with --benchmark")
    return args


def _run_benchmark(args: argparse.Namespace, console: Console) -> int:
    import json

    from ctcdam.synthetic.default import DEFAULT_SCANS
    from ctcdam.workflows.known_cause import KNOWN_CAUSE_SCANS, QUICK_METHODS, BenchmarkSettings, run_benchmark

    quick = args.quick
    methods = QUICK_METHODS if quick and tuple(args.methods) == DEFAULT_METHODS else tuple(args.methods)
    settings = BenchmarkSettings(
        out_dir=args.out / "known-cause", checkpoint=args.checkpoint, depth=args.depth,
        epochs=30 if quick and args.epochs == 60 else args.epochs, scans=DEFAULT_SCANS if quick else KNOWN_CAUSE_SCANS,
        methods=methods, max_nodules=args.max_nodules or (8 if quick else None),
        sanity_nodules=0 if quick else args.sanity_nodules, device=args.device, threads=args.threads,
        scan_space=args.scan_space,
    )
    run_dir, summary = run_benchmark(settings)
    console.print(f"known-cause benchmark written to {run_dir} (tables: {run_dir / 'ground_truth.csv'}, "
                  f"{run_dir / 'summary.md'}"
                  f"{'; ' + str(run_dir / 'scan_space.csv') if args.scan_space else ''}; picture: "
                  f"{run_dir / 'known_cause.png'})", soft_wrap=True)
    if args.json:
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; exit status 0, or 2 with one sentence on bad input."""
    args = parse_args(argv)
    console = Console(stderr=True)
    setup_logging(args, logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    try:
        if args.benchmark:
            return _run_benchmark(args, console)
        config = EvaluationConfig(
            checkpoint=args.checkpoint or newest_checkpoint(),
            out_dir=args.out, run=args.run, methods=args.methods or DEFAULT_METHODS, targets=args.targets, views=args.views,
            max_nodules=args.max_nodules, nodules_per_batch=args.batch_nodules, sanity_nodules=args.sanity_nodules,
            removal=args.removal, device=args.device, progress=not args.quiet,
        )
        with torch_threads(args.threads):
            out = evaluate(config)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError, OutputError) as error:
        return report_error(PROG, error)
    console.print(f"evaluation written to {out} (summary: {out / 'summary.md'})", soft_wrap=True)
    return 0


if __name__ == "__main__":
    exit_process(main())
