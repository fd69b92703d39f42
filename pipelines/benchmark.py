"""Speed benchmarks, as ratios measured in one run: CDAM vs one inference forward, or preprocessing.

--cdam times vanilla, Smooth (50) and Integrated (50) CDAM, CDAM of 9 targets in one call, the reference
implementation and Captum (if installed) against a plain forward of a random-weight timm ViT with 9 outputs.
--preprocess times the preprocessing of a few scans of the synthetic default (or --lidc-root) against a naive
implementation and against just reading the series. The logic lives in ctcdam.explain.benchmark and
ctcdam.lidc.benchmark; this file parses and prints.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  python pipelines/benchmark.py --cdam                                        # vit_small_patch8_224, 224 px, batch 1
  python pipelines/benchmark.py --cdam --model vit_small_patch16_224 --batch 8 --json
  python pipelines/benchmark.py --cdam --no-slow                              # skip the reference and Captum
  python pipelines/benchmark.py --cdam --threads 1 --clock cpu                # the work itself, on a busy machine
  python pipelines/benchmark.py --cdam --profile smooth50                     # where the time of one entry goes
  python pipelines/benchmark.py --preprocess --json
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cdam", action="store_true", help="benchmark CDAM against a plain forward")
    mode.add_argument("--preprocess", action="store_true", help="benchmark the preprocessing of a few scans")
    parser.add_argument("--model", default="vit_small_patch8_224", help="timm ViT name (default: %(default)s)")
    parser.add_argument("--img", type=int, default=224, help="image size in pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per entry (default: %(default)s)")
    parser.add_argument(
        "--slow-repeats", type=int, default=3, help="repetitions of the reference and Captum (default: %(default)s)"
    )
    parser.add_argument("--no-slow", action="store_true", help="skip the reference implementation and Captum")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall time, or process CPU time (with --threads 1)"
    )
    parser.add_argument("--lidc-root", type=Path, help="--preprocess: LIDC-IDRI root (default: synthetic default)")
    parser.add_argument("--scans", nargs="+", metavar="ID", help="--preprocess: scan ids (default: 3 synthetic ones)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--profile", metavar="ENTRY", help="--cdam: print a torch.profiler table of one entry instead")
    return parser.parse_args(argv)


def _run_cdam(args: argparse.Namespace) -> dict:
    from ctcdam.explain.benchmark import benchmark_cdam, profile_entry

    if args.profile:
        print(profile_entry(args.profile, args.model, args.img, args.batch, args.device))
        return {}

    result = benchmark_cdam(
        model_name=args.model,
        img=args.img,
        batch=args.batch,
        repeats=args.repeats,
        slow_repeats=args.slow_repeats,
        device=args.device,
        include_slow=not args.no_slow,
        clock=args.clock,
    )
    if not args.json:
        print(result.table())
    return result.as_dict()


def _run_preprocess(args: argparse.Namespace) -> dict:
    from ctcdam.lidc.benchmark import benchmark_preprocess
    from ctcdam.synthetic import write_synthetic_series
    from ctcdam.synthetic.default import DEFAULT_SCANS, default_cache_dir

    if args.lidc_root is not None and not args.scans:
        raise SystemExit("--preprocess with --lidc-root needs --scans (the scan ids to time)")
    scan_ids = args.scans or list(DEFAULT_SCANS[:3])
    lidc_root = args.lidc_root
    if lidc_root is None:
        # Full-length series, as real LIDC downloads are: the default set's partial series (~33 slices) would time
        # the per-scan annotation work against an unrepresentatively short read.
        lidc_root = default_cache_dir() / "synthetic-lidc-full"
        for scan_id in scan_ids:
            write_synthetic_series(scan_id, lidc_root)
    data = benchmark_preprocess(lidc_root, scan_ids)
    if not args.json:
        print(f"preprocessing of {', '.join(scan_ids)}")
        for name, ratio in data["ratios"].items():
            print(f"{name:<22}{ratio:>10.2f}   target {data.get('targets', {}).get(name, '-')}")
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark and print its table or JSON object."""
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = _run_cdam(args) if args.cdam else _run_preprocess(args)
    if args.json and data:
        print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
