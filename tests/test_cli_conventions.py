"""Every pipeline follows the conventions of ctcdam/cli/common.py: --help shows examples and exits 0; a bad argument
or input exits 2 with one sentence on stderr (``<prog>: error: ...``) and no traceback.

--help and one bad argument per pipeline run as real subprocesses; further bad arguments and inputs run
in-process through the same entry points (they cost no start-up of their own).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest

from ctcdam.workflows.train import cli_main as train_cli_main

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("preprocess", "train", "explain", "evaluate", "benchmark", "demo")
#: One bad argument per pipeline, run as a subprocess.
BAD_ARGUMENT: dict[str, list[str]] = {
    "preprocess": ["--workers", "0"],
    "train": ["--trainer.max_epochs", "abc"],
    "explain": ["--scan", "X", "--targets", "malignancy,size"],
    "evaluate": ["--device", "tpu"],
    "benchmark": ["--cdam", "--batch", "0"],
    "demo": ["--eval-nodules", "x"],
}
#: More bad arguments, in-process (argparse pipelines: main(argv) raises SystemExit(2)).
MORE_BAD_ARGUMENTS: list[tuple[str, list[str]]] = [
    ("preprocess", ["--no-such-flag"]),
    ("preprocess", ["--scans", ","]),
    ("explain", ["--scan", "X", "--views", "oblique"]),
    ("evaluate", ["--threads", "0"]),
    ("evaluate", ["--targets", "size"]),
    ("benchmark", ["--threads", "1"]),  # none of --cdam / --preprocess / --train
    ("demo", ["--run"]),
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CTCDAM_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """The subprocess commands of this module by (pipeline, *args), two at a time (each pays Python's start-up)."""
    cwd = tmp_path_factory.mktemp("cli")
    commands = [(name, "--help") for name in PIPELINES] + [(name, *bad) for name, bad in BAD_ARGUMENT.items()]

    def run(command: tuple[str, ...]) -> subprocess.CompletedProcess:
        return _run([str(REPO / "pipelines" / f"{command[0]}.py"), *command[1:]], cwd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(commands, pool.map(run, commands)))


def _pipeline(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_one_sentence(returncode: int, stderr: str, prog: str, *, only_line: bool = True) -> None:
    assert returncode == 2, (returncode, stderr[-2000:])
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    # a bad argument is refused before anything runs, so its sentence is all of stderr; a bad input may come
    # after log lines (Lightning's seed line, a warning): its sentence is the last line
    assert lines and lines[-1].startswith(f"{prog}.py: error: "), stderr[-2000:]
    if only_line:
        assert len(lines) == 1, stderr


@pytest.mark.parametrize("name", PIPELINES)
def test_help_exits_0_and_shows_examples(results: dict, name: str):
    done = results[(name, "--help")]
    assert done.returncode == 0, done.stderr[-2000:]
    assert "examples:" in done.stdout and f"python pipelines/{name}.py" in done.stdout.split("examples:", 1)[1]
    for flag in ("-v, --verbose", "-q, --quiet"):
        assert flag in done.stdout, flag
    if name != "preprocess":  # preprocessing uses no torch device or threads (it has --workers)
        assert "--device" in done.stdout and "--threads" in done.stdout
    if name in ("preprocess", "train", "explain", "evaluate", "demo"):
        assert "--out" in done.stdout


@pytest.mark.parametrize("name", PIPELINES)
def test_a_bad_argument_exits_2_with_one_sentence(results: dict, name: str):
    done = results[(name, *BAD_ARGUMENT[name])]
    _assert_one_sentence(done.returncode, done.stderr, name)


@pytest.mark.parametrize("name, bad", MORE_BAD_ARGUMENTS)
def test_more_bad_arguments_in_process(name: str, bad: list[str], capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        _pipeline(name).main(bad)
    _assert_one_sentence(exit_info.value.code, capsys.readouterr().err, name)


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--device", "gpu9"], "unknown device 'gpu9'"),
        (["--threads", "0"], "--threads must be a positive number"),
        (["--ckpt_path", "last"], "--ckpt_path last continues an earlier run: name its folder with --run"),
    ],
)
def test_train_refuses_bad_arguments_before_anything_runs(bad: list[str], says: str, capsys: pytest.CaptureFixture):
    assert train_cli_main(bad) == 2
    err = capsys.readouterr().err
    _assert_one_sentence(2, err, "train")
    assert says in err


def test_bad_inputs_exit_2_with_one_sentence(tmp_path: Path, blob_manifest: Path, capsys: pytest.CaptureFixture):
    # a manifest that is not there: train used to end in a traceback here
    assert train_cli_main([f"--data.manifest={tmp_path / 'none.csv'}", f"--out={tmp_path}", "-q"]) == 2
    err = capsys.readouterr().err
    _assert_one_sentence(2, err, "train", only_line=False)
    assert "none.csv does not exist" in err.splitlines()[-1]
    # a model timm does not know, and a pool of a folder without finished folds
    assert train_cli_main([f"--data.manifest={blob_manifest}", "--model.backbone=no_such_vit", f"--out={tmp_path}"]) == 2
    assert "unknown timm model 'no_such_vit'" in capsys.readouterr().err
    assert train_cli_main(["--pool", str(tmp_path)]) == 2
    assert "no finished fold-<k>/ runs" in capsys.readouterr().err
    for name, args in (
        ("preprocess", ["--lidc-root", str(tmp_path / "no-lidc"), "--out", str(tmp_path / "pp"), "--quiet"]),
        ("evaluate", ["--checkpoint", str(tmp_path / "none.ckpt"), "--quiet"]),
        ("benchmark", ["--preprocess", "--lidc-root", str(tmp_path)]),
    ):
        assert _pipeline(name).main(args) == 2, name
        _assert_one_sentence(2, capsys.readouterr().err, name, only_line=False)


def test_exit_process_keeps_the_exit_code_the_output_and_the_exit_handlers(tmp_path: Path):
    # exit_process skips only the collector's last passes: what a pipeline's exit must still do, it does
    marker = tmp_path / "atexit-ran"
    program = (
        "import atexit, logging, sys\n"
        "from pathlib import Path\n"
        "from ctcdam.cli.common import exit_process\n"
        f"atexit.register(lambda: Path({str(marker)!r}).write_text('ran'))\n"
        "logging.basicConfig(stream=sys.stderr, format='%(message)s')\n"
        "logging.getLogger('x').warning('logged line')\n"
        "sys.stdout.write('unflushed line')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "unflushed line"
    assert "logged line" in done.stderr
    assert marker.read_text() == "ran"
