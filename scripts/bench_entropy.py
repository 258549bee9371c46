"""Time torch_nvdla's entropy calibration against modelopt's on the same histograms.

Each histogram is built the way modelopt's ``HistogramCalibrator`` collects one (``|x|``,
``torch.histc`` over ``[0, max]``, 2048 bins, ``linspace`` edges). On each, the script
times ``torch_nvdla.calib.strategies.entropy_amax`` (first call, which builds cached index
tensors, and the median of warm calls) and
``modelopt.torch.quantization.calib.histogram._compute_amax_entropy`` (median of its
calls), and reports both amax values and how many bins apart they are.

Histograms: synthetic activations (Gaussian, Laplacian, Student-t, ReLU of a Gaussian,
a sparse one) and, when the shared data folder is present, real Caffe LeNet activations
on MNIST test images.

Usage::

    python scripts/bench_entropy.py                 # rich table
    python scripts/bench_entropy.py --json          # one JSON object on stdout
    python scripts/bench_entropy.py --threads 1 --repeats 100
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_nvdla.calib import strategies as _strategies  # noqa: E402
from torch_nvdla.calib.strategies import entropy_amax  # noqa: E402

__all__ = ["Row", "main"]


@dataclass
class Row:
    """One histogram's result (times in milliseconds)."""

    case: str
    bins: int
    nonempty_bins: int
    ours_ms: float
    ours_cold_ms: float
    modelopt_ms: float | None
    speedup: float | None
    amax_ours: float
    amax_modelopt: float | None
    delta_bins: int | None


def abs_histogram(x: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``|x|`` histogram as modelopt collects it: histc on ``[0, max]``, linspace edges."""
    x = x.detach().abs().float().reshape(-1)
    top = float(x.max())
    counts = torch.histc(x, bins=bins, min=0.0, max=top).to(torch.int64)
    edges = torch.linspace(0.0, top, bins + 1)
    return counts.numpy(), edges.numpy()


def synthetic_cases(samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Activation-like tensors: light, medium and heavy tails, a ReLU spike, sparse codes."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(samples, generator=g)
    uniform = torch.rand(samples, generator=g).clamp_min(1e-12)
    laplace = -torch.log(uniform) * torch.sign(torch.randn(samples, generator=g))
    chi = torch.randn(3, samples, generator=g).square().sum(0) / 3.0
    student3 = torch.randn(samples, generator=g) / chi.sqrt()
    sparse = laplace * (torch.rand(samples, generator=g) < 0.02)
    return {
        "gaussian": normal,
        "laplacian": laplace,
        "student-t(3)": student3,
        "relu(gaussian)": normal.clamp_min(0.0),
        "sparse laplacian (98% zeros)": sparse,
    }


def lenet_cases(images: int) -> tuple[dict[str, torch.Tensor], str | None]:
    """Caffe LeNet activations on the first ``images`` MNIST test images (or why none)."""
    try:
        from torch_nvdla.models.caffe_lenet import load_caffe_lenet

        from torch_nvdla.zoo.data import load_mnist_test, preprocess_mnist_caffe

        model = load_caffe_lenet()
        pixels, _ = load_mnist_test()
    except (ImportError, FileNotFoundError, OSError, ValueError) as exc:
        return {}, f"real LeNet activations skipped: {exc}"
    x = preprocess_mnist_caffe(pixels[:images])
    taps: dict[str, torch.Tensor] = {"lenet data": x}
    hooks = []
    for name in ("conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2"):
        module = getattr(model, name)
        hooks.append(module.register_forward_hook(lambda m, i, o, n=name: taps.__setitem__(f"lenet {n}", o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return taps, None


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls in ms, and the last result."""
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def load_modelopt() -> tuple[Callable | None, str | None]:
    """modelopt's ``_compute_amax_entropy`` (or the reason it is unavailable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.torch.quantization.calib.histogram import (
                _compute_amax_entropy,
            )
    except Exception as exc:  # noqa: BLE001 - any import failure means "no reference"
        return None, f"modelopt unavailable ({type(exc).__name__}: {exc})"
    return _compute_amax_entropy, None


def bench_one(
    case: str,
    counts: np.ndarray,
    edges: np.ndarray,
    reference: Callable | None,
    repeats: int,
    reference_repeats: int,
) -> Row:
    """Time both implementations on one histogram.

    ``ours_cold_ms`` is a call without the cached index tensors (they depend only on the
    bin count, so a calibration run builds them once).
    """
    _strategies._entropy_index.cache_clear()
    t0 = time.perf_counter()
    amax = entropy_amax(counts, edges)
    cold = (time.perf_counter() - t0) * 1e3
    ours_ms, _ = timed(lambda: entropy_amax(counts, edges), repeats)
    ref_ms = ref_amax = delta = speedup = None
    if reference is not None:
        # modelopt writes bin 0 of the array it gets: give it a fresh copy each call.
        ref_ms, value = timed(lambda: reference(counts.copy(), edges, 8, False, 1, 128), reference_repeats)
        ref_amax = float(value)
        delta = int(np.argmin(np.abs(edges - amax))) - int(np.argmin(np.abs(edges - ref_amax)))
        speedup = ref_ms / ours_ms
    return Row(
        case=case,
        bins=int(counts.size),
        nonempty_bins=int(np.count_nonzero(counts)),
        ours_ms=ours_ms,
        ours_cold_ms=cold,
        modelopt_ms=ref_ms,
        speedup=speedup,
        amax_ours=amax,
        amax_modelopt=ref_amax,
        delta_bins=delta,
    )


def summary(rows: Sequence[Row]) -> dict[str, float | None]:
    """Geometric-mean and smallest speed-up over the rows that have one."""
    ups = [r.speedup for r in rows if r.speedup]
    return {
        "geomean_speedup": math.exp(statistics.fmean(map(math.log, ups))) if ups else None,
        "min_speedup": min(ups) if ups else None,
        "max_abs_delta_bins": max((abs(r.delta_bins) for r in rows if r.delta_bins is not None), default=None),
    }


def print_table(rows: Sequence[Row], notes: Sequence[str], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"entropy amax: torch_nvdla vs modelopt ({meta['bins']} bins, {meta['threads']} threads)")
    for name, justify in [
        ("histogram", "left"),
        ("non-empty", "right"),
        ("ours ms", "right"),
        ("ours cold ms", "right"),
        ("modelopt ms", "right"),
        ("speed-up", "right"),
        ("amax ours", "right"),
        ("amax modelopt", "right"),
        ("Δ bins", "right"),
    ]:
        table.add_column(name, justify=justify)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        table.add_row(
            r.case,
            str(r.nonempty_bins),
            fmt(r.ours_ms, ".3f"),
            fmt(r.ours_cold_ms, ".3f"),
            fmt(r.modelopt_ms, ".1f"),
            fmt(r.speedup, ".0f") + ("×" if r.speedup else ""),
            fmt(r.amax_ours, ".6g"),
            fmt(r.amax_modelopt, ".6g"),
            fmt(r.delta_bins, "d"),
        )
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(table)
    s = meta["summary"]
    if s["geomean_speedup"] is not None:
        console.print(
            f"speed-up: geometric mean {s['geomean_speedup']:.0f}×, smallest {s['min_speedup']:.0f}×; "
            f"largest amax difference {s['max_abs_delta_bins']} bins"
        )
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bins", type=int, default=2048, help="histogram bins (default 2048)")
    parser.add_argument("--samples", type=int, default=1_000_000, help="values per synthetic tensor")
    parser.add_argument("--images", type=int, default=500, help="MNIST images for the LeNet activations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=50, help="warm calls of ours per histogram (median)")
    parser.add_argument("--modelopt-repeats", type=int, default=1, help="calls of modelopt's per histogram")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-real", action="store_true", help="skip the LeNet activations")
    parser.add_argument("--no-modelopt", action="store_true", help="time ours only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.bins < 1 or args.repeats < 1 or args.modelopt_repeats < 1:
        parser.error("--bins, --repeats and --modelopt-repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    notes: list[str] = []
    reference = None
    if not args.no_modelopt:
        reference, why = load_modelopt()
        if why:
            notes.append(why)
    tensors = synthetic_cases(args.samples, args.seed)
    if not args.no_real:
        real, why = lenet_cases(args.images)
        tensors.update(real)
        if why:
            notes.append(why)

    entropy_amax(np.arange(args.bins), np.arange(args.bins + 1.0))  # one-time library warm-up
    rows = []
    for case, x in tensors.items():
        counts, edges = abs_histogram(x, args.bins)
        rows.append(bench_one(case, counts, edges, reference, args.repeats, args.modelopt_repeats))

    meta = {
        "bins": args.bins,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "modelopt_repeats": args.modelopt_repeats,
        "summary": summary(rows),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "notes": notes}, indent=2))
    else:
        print_table(rows, notes, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
