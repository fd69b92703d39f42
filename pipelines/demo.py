"""The end-to-end demo behind `make demo`: synthetic default -> preprocess -> train -> evaluate -> explain.

Example:
  python pipelines/demo.py                      # everything, on the embedded synthetic default
  python pipelines/demo.py --eval-nodules 8     # a larger evaluation subset

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

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"


def run_step(title: str, args: list[str]) -> float:
    """Run one pipeline as a subprocess (stops the demo on failure); returns its wall time in seconds."""
    command = [sys.executable, str(PIPELINES / args[0]), *args[1:]]
    print(f"\n=== {title}: {' '.join(shlex.quote(a) for a in ['python', 'pipelines/' + args[0], *args[1:]])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"demo stopped: step '{title}' exited with status {result.returncode}")
    print(f"=== {title}: {seconds:.0f} s", flush=True)
    return seconds


def busiest_test_scan(checkpoint: Path) -> str:
    """The scan of the checkpoint's test fold with the most nodules (the one the demo explains)."""
    from ctcdam.lidc.manifest import read_manifest
    from ctcdam.models.checkpoint import load_for_inference

    data = load_for_inference(checkpoint).data
    manifest = read_manifest(Path(data["manifest"]))
    test = manifest[manifest["nodule_id"].isin(set(data["test_ids"]))]
    counts = Counter(test["scan_id"])
    if not counts:
        sys.exit(f"demo stopped: the test fold of {checkpoint} has no nodules")
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print where its outputs are."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="demo", help="training run folder under outputs/train (default: %(default)s)")
    parser.add_argument("--eval-nodules", type=int, default=4, help="test nodules in the evaluation subset (default: %(default)s)")
    args = parser.parse_args(argv)

    run_dir = REPO / "outputs" / "train" / args.run_name
    if run_dir.exists():
        # a rerun trains afresh; the old run would otherwise shadow the new one's outputs
        import shutil

        shutil.rmtree(run_dir)
    timings = {"train": run_step("train (generates and preprocesses the synthetic default on first use)",
                                 ["train.py", "--run_name", args.run_name])}
    checkpoint = run_dir / "best.ckpt"
    evaluate_dir = REPO / "outputs" / "evaluate"
    timings["evaluate"] = run_step("evaluate (CDAM vs baselines on a test subset)",
                                   ["evaluate.py", "--checkpoint", str(checkpoint), "--max-nodules", str(args.eval_nodules),
                                    "--out", str(evaluate_dir), "--run", args.run_name])
    scan = busiest_test_scan(checkpoint)
    explain_dir = REPO / "outputs" / "explain"
    timings["explain"] = run_step(f"explain {scan}", ["explain.py", "--scan", scan, "--checkpoint", str(checkpoint),
                                                      "--out", str(explain_dir)])

    bundle = explain_dir / scan
    outputs = {
        "training metrics": run_dir / "metrics.json",
        "checkpoint": checkpoint,
        "evaluation summary": evaluate_dir / args.run_name / "summary.md",
        "Slicer bundle": bundle,
        "Slicer scene (.mrb)": bundle / f"{scan}.mrb",
        "review script": bundle / "review.py",
        "report": bundle / "report.png",
        "predictions": bundle / "predictions.json",
    }
    print("\nDemo finished in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".")
    missing = [str(p) for p in outputs.values() if not p.exists()]
    for name, path in outputs.items():
        print(f"  {name:<20} {path.relative_to(REPO)}")
    print(f"Open {outputs['Slicer scene (.mrb)'].relative_to(REPO)} in 3D Slicer (File > Add Data), "
          f"or run: Slicer --python-script {outputs['review script'].relative_to(REPO)}")
    if missing:
        print("missing outputs: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
