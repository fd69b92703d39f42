"""Speed of CDAM, its reference implementation and Captum, as ratios to one plain inference forward.

All figures of one run come from the same process, model and batch, and each ratio is taken against forwards
timed right before and after it, so slow drifts in the load of a shared machine cancel out. Under heavy load
wall time still favours few large operators over many small ones (threads wait for each other at every
operator); ``clock="cpu"`` with one thread measures the work itself (process CPU time).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import timm
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from ctcdam.explain.api import explain
from ctcdam.explain.reference import reference_explain

#: Outputs of the benchmark model by default: as many as the LIDC targets (malignancy and eight biomarkers).
DEFAULT_OUTPUTS = 9

#: Entries that take tens of forwards; they are timed without a warm-up run.
SLOW_ENTRIES = ("oracle_cdam", "oracle_smooth50", "captum_ig50", "captum_smoothgrad50")


@dataclass(frozen=True)
class CdamBenchmark:
    """One benchmark run: median time ratios to a plain forward of the same model and batch."""

    model: str
    img: int
    batch: int
    device: str
    forward_s: float
    ratios: dict[str, float] = field(default_factory=dict)
    threads: int = 0  #: torch CPU threads during the run
    clock: str = "wall"  #: "wall" (perf_counter) or "cpu" (process CPU time)

    def as_dict(self) -> dict[str, object]:
        """The result as plain JSON-ready data."""
        return asdict(self)

    def table(self) -> str:
        """A plain-text table of the ratios."""
        lines = [
            f"{self.model}, {self.img} px, batch {self.batch}, {self.device} ({self.threads} threads, "
            f"{self.clock} clock): forward {self.forward_s * 1e3:.1f} ms",
            f"{'entry':<22}{'time / forward':>15}",
        ]
        lines += [f"{name:<22}{ratio:>15.3f}" for name, ratio in self.ratios.items()]
        return "\n".join(lines)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    """Time of one call on ``clock``, with the device synchronised before and after."""
    _synchronize(device)
    start = clock()
    fn()
    _synchronize(device)
    return clock() - start


def _captum_entries(model: nn.Module, images: Tensor) -> dict[str, Callable[[], object]]:
    """Captum IG (50 steps) and NoiseTunnel SmoothGrad (50 samples) on target 0, if Captum is installed."""
    try:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    except ImportError:
        return {}
    # Captum runs its 50 steps / samples in internal batches: at least 16 model inputs per pass (batching pays
    # on CPU too), at most one image batch's worth beyond that, so memory stays bounded for ViT-S/8.
    per_pass = max(16, images.shape[0])
    integrated_gradients = IntegratedGradients(model)
    smoothgrad = NoiseTunnel(Saliency(model))
    return {
        "captum_ig50": lambda: integrated_gradients.attribute(
            images, target=0, n_steps=50, internal_batch_size=per_pass
        ),
        "captum_smoothgrad50": lambda: smoothgrad.attribute(
            images, nt_type="smoothgrad", nt_samples=50, nt_samples_batch_size=max(1, per_pass // images.shape[0]),
            target=0, stdevs=0.15,
        ),
    }


def _setup(
    model_name: str,
    img: int,
    batch: int,
    device: str | None,
    include_slow: bool,
    seed: int,
    model_kwargs: dict[str, object] | None,
    n_outputs: int = DEFAULT_OUTPUTS,
) -> tuple[torch.device, Callable[[], None], dict[str, Callable[[], object]]]:
    """The device, a plain forward and the timed entries on a random-weight ViT with ``n_outputs`` outputs."""
    torch.manual_seed(seed)
    run_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = {"pretrained": False, "num_classes": n_outputs, "img_size": img} | dict(model_kwargs or {})
    model = timm.create_model(model_name, **options).to(run_device).eval()
    images = torch.randn(batch, 3, img, img, device=run_device)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    entries: dict[str, Callable[[], object]] = {
        "cdam": lambda: explain(model, images, [0], "cdam"),
        "smooth50": lambda: explain(model, images, [0], "smooth", samples=50),
        "integrated50": lambda: explain(model, images, [0], "integrated", steps=50),
        f"cdam_{n_outputs}_targets": lambda: explain(model, images, list(range(n_outputs)), "cdam"),
    }
    if include_slow:
        entries["oracle_cdam"] = lambda: reference_explain(model, images, [0], "cdam")
        entries["oracle_smooth50"] = lambda: reference_explain(model, images, [0], "smooth", samples=50)
        entries.update(_captum_entries(model, images))
    return run_device, forward, entries


def benchmark_cdam(
    model_name: str = "vit_small_patch8_224",
    img: int = 224,
    batch: int = 1,
    repeats: int = 5,
    slow_repeats: int = 3,
    device: str | None = None,
    include_slow: bool = True,
    seed: int = 0,
    model_kwargs: dict[str, object] | None = None,
    clock: str = "wall",
    n_outputs: int = DEFAULT_OUTPUTS,
) -> CdamBenchmark:
    """Time CDAM variants, the reference and Captum on a random-weight timm ViT (no download).

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``depth=2`` for a quick check); ``clock`` is "wall"
    or "cpu" (process CPU time: use it with one CPU thread); the model has ``n_outputs`` outputs and the
    ``cdam_<n_outputs>_targets`` entry explains all of them in one call.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    run_device, forward, entries = _setup(model_name, img, batch, device, include_slow, seed, model_kwargs, n_outputs)
    if clock == "cpu" and run_device.type != "cpu":
        raise ValueError("the cpu clock measures CPU work only; time a GPU with the wall clock")
    read_clock = CLOCKS[clock]
    forward()  # warm-up: allocator, kernels, thread pool
    forward_times: list[float] = []
    ratios: dict[str, float] = {}
    for name, fn in entries.items():
        slow = name in SLOW_ENTRIES
        if not slow:
            fn()
        entry_ratios = []
        for _ in range(slow_repeats if slow else repeats):
            before = _timed(forward, run_device, read_clock)
            elapsed = _timed(fn, run_device, read_clock)
            after = _timed(forward, run_device, read_clock)
            forward_times += [before, after]
            entry_ratios.append(elapsed / (0.5 * (before + after)))
        ratios[name] = statistics.median(entry_ratios)
    return CdamBenchmark(
        model=model_name,
        img=img,
        batch=batch,
        device=str(run_device),
        forward_s=statistics.median(forward_times),
        ratios=ratios,
        threads=torch.get_num_threads(),
        clock=clock,
    )


def profile_entry(
    entry: str,
    model_name: str = "vit_small_patch8_224",
    img: int = 224,
    batch: int = 1,
    device: str | None = None,
    rows: int = 25,
    model_kwargs: dict[str, object] | None = None,
    n_outputs: int = DEFAULT_OUTPUTS,
) -> str:
    """torch.profiler table (operators by self time) of one benchmark entry, or of "forward", after a warm-up."""
    run_device, forward, entries = _setup(model_name, img, batch, device, True, 0, model_kwargs, n_outputs)
    entries["forward"] = forward
    if entry not in entries:
        raise ValueError(f"unknown benchmark entry {entry!r}; known: {', '.join(entries)}")
    entries[entry]()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run_device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        entries[entry]()
        _synchronize(run_device)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
