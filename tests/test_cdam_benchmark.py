"""The CDAM benchmark runs end to end on a tiny model and reports every entry (no timing assertions)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from ctcdam.explain.benchmark import benchmark_cdam, profile_entry

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
FAST_ENTRIES = {"cdam", "smooth50", "integrated50", "cdam_9_targets"}
SLOW_ENTRIES = {"oracle_cdam", "oracle_smooth50"}
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def _cli() -> ModuleType:
    """pipelines/benchmark.py as a module (pipelines/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPO / "pipelines" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_entry_as_a_positive_ratio() -> None:
    pytest.importorskip("captum")
    result = benchmark_cdam(
        "vit_tiny_patch16_224", img=32, batch=2, repeats=1, slow_repeats=1, device="cpu", model_kwargs=TINY
    )
    assert set(result.ratios) == FAST_ENTRIES | SLOW_ENTRIES | {"captum_ig50", "captum_smoothgrad50"}
    assert all(ratio > 0 for ratio in result.ratios.values())
    assert result.forward_s > 0
    assert "cdam_9_targets" in result.table()


def test_cli_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--cdam", "--model", "vit_tiny_patch16_224", "--img", "32", "--repeats", "1", "--no-slow"]
    assert _cli().main([*argv, "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "vit_tiny_patch16_224" and data["img"] == 32 and data["batch"] == 1
    assert data["device"] == "cpu" and data["forward_s"] > 0
    assert set(data["ratios"]) == FAST_ENTRIES


def test_cpu_clock_is_for_cpu_runs() -> None:
    result = benchmark_cdam("vit_tiny_patch16_224", img=32, repeats=1, include_slow=False, clock="cpu",
                            device="cpu", model_kwargs=TINY)
    assert result.clock == "cpu" and all(ratio > 0 for ratio in result.ratios.values())
    with pytest.raises(ValueError, match="clock must be one of"):
        benchmark_cdam("vit_tiny_patch16_224", img=32, clock="gpu", device="cpu", model_kwargs=TINY)


def test_cli_needs_a_mode() -> None:
    with pytest.raises(SystemExit):
        _cli().parse_args(["--json"])


def test_profile_names_the_operators_of_an_entry() -> None:
    table = profile_entry("cdam", "vit_tiny_patch16_224", img=32, device="cpu", model_kwargs=TINY)
    assert "aten::" in table
    with pytest.raises(ValueError, match="unknown benchmark entry 'fast'"):
        profile_entry("fast", "vit_tiny_patch16_224", img=32, device="cpu", model_kwargs=TINY)
