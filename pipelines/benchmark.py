"""Speed benchmarks, as ratios measured in one run: CDAM vs one inference forward, preprocessing, or training.

--cdam times vanilla, Smooth (50) and Integrated (50) CDAM, CDAM of 9 targets in one call, the reference
implementation and Captum (if installed) against a plain forward of a random-weight timm ViT with 9 outputs.
--preprocess times the preprocessing of a few scans of the synthetic default (or --lidc-root) against a naive
implementation and against just reading the series.
--train times head fine-tuning (frozen random-weight backbone) with and without the embedding cache.
--explain times the cohort command (explain.py --scans) against a loop of single-scan commands on the same scans.
The logic lives in ctcdam.explain.benchmark, ctcdam.preprocess.benchmark, ctcdam.workflows.train and
ctcdam.workflows.explain_benchmark; this file parses and prints.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ctcdam.cli.common import (
    ArgumentParser, add_device, add_threads, add_verbosity, exit_process, name_list, non_negative_int,
    positive_int, report_error, setup_logging, torch_threads,
)

PROG = "benchmark.py"
#: Per mode: (timm model, image size, batch) when --model/--img/--batch are not given.
MODE_DEFAULTS = {"cdam": ("vit_small_patch8_224", 224, 1), "train": ("vit_small_patch16_224.dino", 112, 32)}
EXAMPLES = """\
  python pipelines/benchmark.py --cdam                                        # vit_small_patch8_224, 224 px, batch 1
  python pipelines/benchmark.py --cdam --model vit_small_patch16_224 --batch 8 --json
  python pipelines/benchmark.py --cdam --no-slow                              # skip the reference and Captum
  python pipelines/benchmark.py --cdam --threads 1 --clock cpu                # the work itself, on a busy machine
  python pipelines/benchmark.py --cdam --profile smooth50                     # where the time of one entry goes
  python pipelines/benchmark.py --preprocess --scans LIDC-IDRI-0001,LIDC-IDRI-0003 --json
  python pipelines/benchmark.py --train --epochs 5 --threads 1                # head fine-tuning, cache vs no cache
  python pipelines/benchmark.py --explain --json                              # 5 synthetic scans: cohort vs loop
  python pipelines/benchmark.py --explain --n-scans 20                        # a reader-study-sized cohort
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = ArgumentParser(PROG, __doc__, EXAMPLES)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cdam", action="store_true", help="benchmark CDAM against a plain forward")
    mode.add_argument("--preprocess", action="store_true", help="benchmark the preprocessing of a few scans")
    mode.add_argument("--train", action="store_true", help="benchmark head fine-tuning with and without the embedding cache")
    mode.add_argument("--explain", action="store_true",
                      help="benchmark the cohort explain command against a loop of single-scan commands")
    parser.add_argument("--model", help="timm ViT name (default: --cdam vit_small_patch8_224, --train vit_small_patch16_224.dino)")
    parser.add_argument("--img", type=positive_int, help="image size in pixels (default: --cdam 224, --train 112)")
    parser.add_argument("--batch", type=positive_int, help="images per call / training batch size (default: --cdam 1, --train 32)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions per entry (default: %(default)s)")
    parser.add_argument(
        "--slow-repeats", type=positive_int, default=3, help="repetitions of the reference and Captum (default: %(default)s)"
    )
    parser.add_argument("--no-slow", action="store_true", help="skip the reference implementation and Captum")
    add_device(parser)
    add_threads(parser)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall time, or process CPU time (with --threads 1)"
    )
    parser.add_argument("--lidc-root", type=Path, help="--preprocess: LIDC-IDRI root (default: synthetic default)")
    parser.add_argument("--scans", type=name_list(what="scan id"), metavar="IDS",
                        help="--preprocess/--explain: comma-separated scan ids (default: 3 synthetic ones; --explain: "
                             "5 of the checkpoint's test fold)")
    parser.add_argument("--checkpoint", type=Path,
                        help="--explain: training checkpoint (default: the synthetic demo's model, random weights)")
    parser.add_argument("--n-scans", type=positive_int, default=5, metavar="N",
                        help="--explain without --scans: N scans of the checkpoint, its test fold first "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=1,
                        help="--explain: worker processes of the cohort command (default: %(default)s)")
    parser.add_argument("--no-volume", action="store_true", help="--explain: both commands skip the 3D maps")
    parser.add_argument("--epochs", type=positive_int, default=10, help="--train: epochs per run (default: %(default)s)")
    parser.add_argument("--manifest", type=Path, help="--train: preprocessing manifest (default: the synthetic default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--profile", metavar="ENTRY", help="--cdam: print a torch.profiler table of one entry instead")
    add_verbosity(parser)
    args = parser.parse_args(argv)
    mode = "train" if args.train else "cdam"
    for name, default in zip(("model", "img", "batch"), MODE_DEFAULTS[mode]):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def _run_cdam(args: argparse.Namespace) -> dict:
    from ctcdam.explain.benchmark import benchmark_cdam, profile_entry
    from ctcdam.targets import TARGETS

    if args.profile:
        print(profile_entry(args.profile, args.model, args.img, args.batch, args.device, n_outputs=len(TARGETS)))
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
        n_outputs=len(TARGETS),  # one per LIDC target, as the trained models have
    )
    if not args.json:
        print(result.table())
    return result.as_dict()


def _run_preprocess(args: argparse.Namespace) -> dict:
    from ctcdam.preprocess.benchmark import benchmark_preprocess, with_partial
    from ctcdam.synthetic.default import DEFAULT_SCANS
    from ctcdam.workflows.defaults import default_dicom, full_length_dicom

    if args.lidc_root is not None and not args.scans:
        raise ValueError("--preprocess with --lidc-root needs --scans (the scan ids to time)")
    scan_ids = args.scans or list(DEFAULT_SCANS[:3])
    lidc_root = args.lidc_root if args.lidc_root is not None else full_length_dicom(scan_ids)
    data = benchmark_preprocess(lidc_root, scan_ids)
    if args.lidc_root is None:  # the same scans as the default set's partial series: ours_vs_read_partial
        data = with_partial(data, benchmark_preprocess(default_dicom(progress=False), scan_ids))
    if not args.json:
        print(f"preprocessing of {', '.join(scan_ids)}")
        for name, ratio in data["ratios"].items():
            print(f"{name:<22}{ratio:>10.2f}   target {data.get('targets', {}).get(name, '-')}")
    return data


def _run_explain(args: argparse.Namespace) -> dict:
    from ctcdam.workflows.explain_benchmark import benchmark_explain

    # one torch thread unless --threads says otherwise: on a shared CPU, spinning OpenMP threads cost more than
    # they give to a model this small (the same choice as configs/demo.yaml's training)
    data = benchmark_explain(checkpoint=args.checkpoint, scan_ids=args.scans, n_scans=args.n_scans,
                             workers=args.workers, threads=args.threads or 1,
                             extra_args=("--no-volume",) if args.no_volume else ())
    if not args.json:
        wall = data["wall_seconds"]
        print(f"explain {data['nodules']} nodules of {', '.join(data['scans'])} ({data['workers']} worker(s))")
        print(f"{'cohort command':<26}{wall['cohort']:>8.1f} s  {data['nodules_per_s']:>6.2f} nodules/s")
        print(f"{'loop of single scans':<26}{wall['loop']:>8.1f} s  {data['loop_nodules_per_s']:>6.2f} nodules/s")
        print(f"{'cohort_vs_loop':<26}{data['ratios']['cohort_vs_loop']:>8.2f}   target {data['targets']['cohort_vs_loop']}")
        print("cohort time split (s): " + ", ".join(f"{k} {v:.1f}" for k, v in data["seconds"].items()))
        print(f"cohort CPU {data['cpu_seconds']['cohort']:.1f} s on {data['cores']} core(s), "
              f"{data['cohort_cpu_use']:.0%} used; with every core busy throughout, cohort_vs_loop would be "
              f"{data['bounds']['cohort_vs_loop_at_full_cpu']:.2f}")
    return data


def _run_train(args: argparse.Namespace) -> dict:
    from ctcdam.workflows.train import head_cache_speedup

    data = head_cache_speedup(
        manifest=args.manifest, model=args.model, img_size=args.img, epochs=args.epochs, batch_size=args.batch,
        threads=args.threads, extra_args=() if args.device == "auto" else (f"--device={args.device}",),
    )
    if not args.json:
        print(f"head fine-tuning of {args.model} at {args.img} px, {args.epochs} epochs, batch {args.batch}")
        print(f"{'fit seconds with cache':<26}{data['fit_seconds_cached']:>10.2f}")
        print(f"{'fit seconds without cache':<26}{data['fit_seconds_uncached']:>10.2f}")
        print(f"{'speed-up':<26}{data['speedup'] or float('nan'):>10.2f}   (cache {data['cache']})")
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark and print its table or JSON object; 2 with one sentence on bad input."""
    args = parse_args(argv)
    setup_logging(args, logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with torch_threads(args.threads):
            if args.cdam:
                from ctcdam.models.device import resolve_device

                args.device = resolve_device(args.device)
            run = (_run_cdam if args.cdam else _run_train if args.train else _run_explain if args.explain
                   else _run_preprocess)
            data = run(args)
    except (ValueError, FileNotFoundError) as error:
        return report_error(PROG, error)
    if args.json and data:
        print(json.dumps(data))
    return 0


if __name__ == "__main__":
    exit_process(main())
