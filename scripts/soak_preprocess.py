"""Soak test (not part of `make test`): kill real preprocessing runs at random instants, resume, compare.

One uninterrupted run of the synthetic default (``python pipelines/preprocess.py --workers 2``) is the
reference. Then, ``--kills`` times: a fresh run into an empty folder is SIGKILLed (with its workers) at a
random instant of its expected duration, ``--resume`` finishes it, and the output tree is compared byte
for byte with the reference (manifest, failures, every crop and part file; the records' timings aside) and
checked for stray temporaries. Prints how many kills were survived with identical outputs.

    python scripts/soak_preprocess.py                  # 20 kills, the whole synthetic default, --workers 2
    python scripts/soak_preprocess.py --kills 5 --scans 8 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "pipelines" / "preprocess.py"


def _tree(out: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "scan.json":
                record = json.loads(data)
                record.pop("seconds", None)
                data = json.dumps(record, sort_keys=True).encode()
            files[path.relative_to(out).as_posix()] = data
    return files


def _command(out: Path, scans: list[str], workers: int, resume: bool) -> list[str]:
    command = [sys.executable, str(CLI), "--out", str(out), "--workers", str(workers), "--quiet"]
    if scans:
        command += ["--scans", ",".join(scans)]
    return command + (["--resume"] if resume else [])


def _default_scans(n: int | None) -> list[str]:
    if not n:
        return []
    listing = subprocess.run(
        [sys.executable, "-c", "from ctcdam.synthetic.default import DEFAULT_SCANS; print(' '.join(DEFAULT_SCANS))"],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    return listing.stdout.split()[:n]


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 0 when every kill was survived with identical outputs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="number of killed runs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing workers (default: %(default)s)")
    parser.add_argument("--scans", type=int, help="only the first N scans of the default set (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill instants (default: %(default)s)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="ctcdam-soak-"))
    scans = _default_scans(args.scans)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    start = time.monotonic()
    subprocess.run(_command(reference, scans, args.workers, False), check=True, env=env, cwd=REPO)
    duration = time.monotonic() - start
    expected = _tree(reference)
    print(f"reference run: {duration:.1f} s, {len(expected)} files")

    survived = 0
    for trial in range(1, args.kills + 1):
        out = work / f"trial-{trial}"
        shutil.rmtree(out, ignore_errors=True)
        instant = rng.uniform(0.05, 0.95) * duration
        # Own session, so the kill reaches the spawned workers too, as a scheduler's kill would.
        process = subprocess.Popen(_command(out, scans, args.workers, False), env=env, cwd=REPO,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=instant)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed = True
        units = len(list(out.glob("crops/*/scan.json")))
        resumed = subprocess.run(_command(out, scans, args.workers, True), env=env, cwd=REPO,
                                 capture_output=True, text=True)
        stray = [p.relative_to(out).as_posix() for p in out.rglob(".*") if p.name != ".dicom-index"]
        identical = resumed.returncode == 0 and _tree(out) == expected and not stray
        survived += identical
        print(f"kill {trial:2d} at {instant:5.1f} s ({'killed' if killed else 'had finished'}, {units} unit(s) "
              f"done): {'identical' if identical else 'DIFFERENT'}{' stray: ' + ', '.join(stray) if stray else ''}")
        shutil.rmtree(out, ignore_errors=True)
    print(f"{survived} of {args.kills} kills survived with identical outputs")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
