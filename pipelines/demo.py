"""The end-to-end demo behind `make demo`: synthetic default -> preprocess -> train -> evaluate -> explain.

Each step runs the same pipeline a user would run (train.py generates and preprocesses the synthetic
default on first use), so the demo shows the real commands. It ends by printing where the Slicer bundle,
the .mrb, report.png and the metrics are.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ctcdam.cli.common import (
    EXIT_FAILURE, ArgumentParser, add_device, add_out, add_run, add_threads, add_verbosity, exit_process, positive_int,
)

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
PROG = "demo.py"
EXAMPLES = """\
  python pipelines/demo.py                      # everything, on the embedded synthetic default, into outputs/
  python pipelines/demo.py --eval-nodules 8     # a larger evaluation subset
  python pipelines/demo.py --out /tmp/demo --run try1 --device cpu --threads 2 -q
"""


class DemoStopped(Exception):
    """A step of the demo failed (its own output says why)."""


def _shown(path: Path) -> Path:
    """`path` relative to the checkout when it lies inside it (shorter to read and to paste)."""
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path


def run_step(title: str, args: list[str]) -> float:
    """Run one pipeline as a subprocess (stops the demo on failure); returns its wall time in seconds."""
    command = [sys.executable, str(PIPELINES / args[0]), *args[1:]]
    print(f"\n=== {title}: {' '.join(shlex.quote(a) for a in ['python', 'pipelines/' + args[0], *args[1:]])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise DemoStopped(f"step '{title}' exited with status {result.returncode}")
    print(f"=== {title}: {seconds:.0f} s", flush=True)
    return seconds


def busiest_test_scan(checkpoint: Path) -> str:
    """The scan of the checkpoint's test fold with the most nodules (the one the demo explains)."""
    from ctcdam.manifest.schema import read_manifest
    from ctcdam.models.checkpoint import load_for_inference

    data = load_for_inference(checkpoint).data
    manifest = read_manifest(Path(data["manifest"]))
    test = manifest[manifest["nodule_id"].isin(set(data["test_ids"]))]
    counts = Counter(test["scan_id"])
    if not counts:
        raise DemoStopped(f"the test fold of {checkpoint} has no nodules")
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]


def _known_cause_run(evaluate_dir: Path) -> Path:
    """The newest evaluation run of the short known-cause benchmark."""
    runs = sorted((evaluate_dir / "known-cause" / "evaluate").glob("*-45scans"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else evaluate_dir / "known-cause" / "evaluate" / "(missing)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = ArgumentParser(PROG, __doc__, EXAMPLES)
    add_out(parser, REPO / "outputs", "root of the train/, evaluate/ and explain/ outputs")
    add_run(parser, "name of the training and evaluation runs (default: demo)")
    parser.add_argument("--eval-nodules", type=positive_int, default=4,
                        help="test nodules in the evaluation subset (default: %(default)s)")
    add_device(parser)
    add_threads(parser)
    add_verbosity(parser)
    args = parser.parse_args(argv)
    args.run = args.run or "demo"
    args.out = args.out.resolve()  # the steps run from the checkout
    return args


def _shared_flags(args: argparse.Namespace) -> list[str]:
    """The flags every step takes in the same vocabulary (--device, --threads, -v/-q)."""
    flags = ["--device", args.device] if args.device != "auto" else []  # auto: each step's own default
    flags += ["--threads", str(args.threads)] if args.threads else []
    return flags + (["--quiet"] if args.quiet else ["--verbose"] if args.verbose else [])


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print where its outputs are; 1 when a step fails (its output says why)."""
    args = parse_args(argv)
    try:
        return _demo(args)
    except DemoStopped as stopped:
        print(f"{PROG}: demo stopped: {stopped}", file=sys.stderr)
        return EXIT_FAILURE


def _demo(args: argparse.Namespace) -> int:
    shared = _shared_flags(args)
    run_dir = args.out / "train" / args.run
    if run_dir.exists():
        # a rerun trains afresh; the old run would otherwise shadow the new one's outputs
        import shutil

        shutil.rmtree(run_dir)
    timings = {"train": run_step("train (generates and preprocesses the synthetic default on first use)",
                                 ["train.py", "--out", str(args.out / "train"), "--run", args.run, *shared])}
    checkpoint = run_dir / "best.ckpt"
    evaluate_dir = args.out / "evaluate"
    timings["evaluate"] = run_step("evaluate (CDAM vs baselines on a test subset)",
                                   ["evaluate.py", "--checkpoint", str(checkpoint), "--max-nodules", str(args.eval_nodules),
                                    "--out", str(evaluate_dir), "--run", args.run, *shared])
    timings["known-cause"] = run_step(
        "known-cause benchmark, short version (painted causes; generates, trains, evaluates)",
        ["evaluate.py", "--benchmark", "known-cause", "--quick", "--out", str(evaluate_dir), *shared])
    scan = busiest_test_scan(checkpoint)
    explain_dir = args.out / "explain"
    timings["explain"] = run_step(f"explain {scan}", ["explain.py", "--scan", scan, "--checkpoint", str(checkpoint),
                                                      "--out", str(explain_dir), *shared])

    bundle = explain_dir / scan
    outputs = {
        "training metrics": run_dir / "metrics.json",
        "checkpoint": checkpoint,
        "evaluation summary": evaluate_dir / args.run / "summary.md",
        "known-cause table": _known_cause_run(evaluate_dir) / "ground_truth.csv",
        "known-cause picture": _known_cause_run(evaluate_dir) / "known_cause.png",
        "Slicer bundle": bundle,
        "Slicer scene (.mrb)": bundle / f"{scan}.mrb",
        "review script": bundle / "review.py",
        "report": bundle / "report.png",
        "predictions": bundle / "predictions.json",
    }
    print("\nDemo finished in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".")
    missing = [str(p) for p in outputs.values() if not p.exists()]
    for name, path in outputs.items():
        print(f"  {name:<20} {_shown(path)}")
    print(f"Open {_shown(outputs['Slicer scene (.mrb)'])} in 3D Slicer (File > Add Data), "
          f"or run: Slicer --python-script {_shown(outputs['review script'])}")
    if missing:
        print("missing outputs: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())
