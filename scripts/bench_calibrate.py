#!/usr/bin/env python
"""What calibrating costs next to a plain FP32 forward over the same images.

For each model, in one run and on the same images:

* **time** -- a plain ``model(x)`` pass under ``torch.no_grad()`` and a ``calibrate(model,
  loader)`` pass (hooks, histograms and the final range search included), alternated
  ``--repeats`` times after a warm-up; the best of each is compared (and the median, over
  repeats, of each calibrate pass over the forward just before it). Targets: calibrate
  <= 1.5x the forward on the CPU, <= 1.2x on CUDA.
* **peak memory** -- CPU: each pass runs in a fresh subprocess, which reports its peak
  resident set (Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` just
  before the pass; elsewhere ``ru_maxrss``, which on Linux would also count the RSS of the
  forked parent) and how much the pass added to it; CUDA:
  ``torch.cuda.max_memory_allocated`` around each pass. Target: <= 1.1x. This is measured
  at ``--memory-batch`` (64), where a calibration that kept activations past their layer
  would show at once (the issue's torchvision ResNet-50 at batch 64).

Models: ``cifar-resnet20`` on real CIFAR-10 images when :mod:`torch_nvdla.zoo.registry` and the
shared data are available, and torchvision's ResNet-18 / ResNet-50 (random weights) on
random 224x224 images.

Usage::

    python scripts/bench_calibrate.py                          # CPU, 2 threads, 500 images
    python scripts/bench_calibrate.py --models resnet18 --num-images 100 --json
    python scripts/bench_calibrate.py --device cuda --threads 8
    python scripts/bench_calibrate.py --models resnet50 --profile   # where calibrate's time goes
    python scripts/bench_calibrate.py --models resnet50 --cli --no-memory  # + torch-nvdla export / evaluate

``--cli`` also runs the whole ``torch-nvdla export`` and ``torch-nvdla evaluate`` (entropy,
fake-quant and NVDLA-integer simulation) commands on the model with ``--num-images``
calibration images, each in a fresh process (start-up included), and reports their wall
time next to the in-process forward over the same number of images. Histogram binning
runs in the C kernel when it is built, else in torch operations (the table says which;
``TORCH_NVDLA_KERNELS=torch`` forces the torch paths for a side-by-side run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

# Run against the checkout this script lives in, installed or not.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from torch_nvdla import calibrate  # noqa: E402
from torch_nvdla.calib.native import KERNELS  # noqa: E402

__all__ = ["main"]

MODELS = ("caffe-lenet", "cifar-resnet20", "cifar-resnet56", "resnet18", "resnet50", "mobilenet_v2")
DEFAULT_MODELS = ("caffe-lenet", "cifar-resnet20", "cifar-resnet56", "mobilenet_v2", "resnet50")
TIME_TARGET = {"cpu": 1.5, "cuda": 1.2}
MEMORY_TARGET = 1.1


@dataclass
class Workload:
    """A model and its images, ready to run.

    Attributes:
        name: the model's name.
        model: the model, in eval mode, on the device.
        batches: input batches (on the device).
        source: where the images come from.
    """

    name: str
    model: nn.Module
    batches: list[torch.Tensor]
    source: str

    @property
    def images(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class Result:
    """One model's measurements (seconds, MiB)."""

    model: str
    device: str
    source: str
    images: int
    batch_size: int
    threads: int
    forward_s: float
    calibrate_s: float
    time_ratio: float
    time_target: float
    memory_batch: int
    forward_cpu_s: float = 0.0
    calibrate_cpu_s: float = 0.0
    cpu_ratio: float = 0.0
    paired_ratio: float = 0.0
    forward_peak_mib: float | None = None
    calibrate_peak_mib: float | None = None
    memory_ratio: float | None = None
    forward_added_mib: float | None = None
    calibrate_added_mib: float | None = None
    memory_target: float = MEMORY_TARGET
    taps: int = 0
    binning: str = ""
    peers: dict[str, float] = field(default_factory=dict)
    cli: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- workloads


def _random_images(n: int, batch_size: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, left = [], n
    while left > 0:
        b = min(batch_size, left)
        out.append(torch.randn(b, 3, size, size, generator=g))
        left -= b
    return out


def _zoo_batches(name: str, n: int, batch_size: int) -> tuple[nn.Module, list[torch.Tensor], str] | None:
    """A zoo model and real calibration images of its data set, or None when unavailable."""
    try:
        from torch_nvdla.zoo.registry import default_dataset_for, get_dataset, get_model

        model = get_model(name)
        data = get_dataset(default_dataset_for(name))
        loader = data.loader("calibration", batch_size, limit=n)
        return model, [x for x, _ in loader], f"{data.name} (calibration split)"
    except Exception as e:  # no shared data: say why and go on
        print(f"{name} skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def load_workload(name: str, n: int, batch_size: int, device: torch.device) -> Workload | None:
    """Build model ``name`` with ``n`` images in batches of ``batch_size``; None if unavailable."""
    torch.manual_seed(0)
    if name in ("caffe-lenet", "cifar-resnet20", "cifar-resnet56"):
        got = _zoo_batches(name, n, batch_size)
        if got is None:
            return None
        model, batches, source = got
    elif name in ("resnet18", "resnet50", "mobilenet_v2"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        batches, source = _random_images(n, batch_size, 224), "random 224x224"
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = model.eval().to(device)
    return Workload(name, model, [b.to(device) for b in batches], source)


def random_imagenet_splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A ``--data`` entry point for the CLI timing (``bench_calibrate:random_imagenet_splits``):
    ``$BENCH_CALIB_IMAGES`` calibration and ``$BENCH_EVAL_IMAGES`` evaluation images, random
    224x224 (the torchvision models here have random weights: the accuracies are noise,
    the times are not)."""
    n_cal, n_eval = int(os.environ.get("BENCH_CALIB_IMAGES", "500")), int(os.environ.get("BENCH_EVAL_IMAGES", "100"))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n_cal + n_eval, 3, 224, 224, generator=g)
    labels = torch.randint(0, 1000, (n_cal + n_eval,), generator=g)
    return (images[:n_cal], labels[:n_cal]), (images[n_cal:], labels[n_cal:])


_CLI_MODELS = {"resnet18": "torchvision.models:resnet18", "resnet50": "torchvision.models:resnet50",
               "mobilenet_v2": "torchvision.models:mobilenet_v2"}


def cli_passes(name: str, calib_images: int, eval_images: int, batch_size: int, threads: int) -> dict[str, float]:
    """Wall seconds of ``torch-nvdla export`` and ``torch-nvdla evaluate`` on a torchvision
    model, each a fresh process (Python and torch start-up included)."""
    import tempfile

    model = _CLI_MODELS[name]
    data = "bench_calibrate:random_imagenet_splits"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), str(_ROOT)]),
           "BENCH_CALIB_IMAGES": str(calib_images), "BENCH_EVAL_IMAGES": str(eval_images),
           "OMP_NUM_THREADS": str(threads)}
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "export": ["export", "--model", model, "--data", data, "--num-images", str(calib_images),
                       "--batch-size", str(batch_size), "-o", str(Path(tmp) / "calib.json")],
            "evaluate": ["evaluate", "--model", model, "--data", data, "--calib-images", str(calib_images),
                         "--eval-images", str(eval_images), "--methods", "entropy", "--simulations", "fake,nvdla",
                         "--batch-size", str(batch_size)],
        }
        for what, argv in commands.items():
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", "import sys; from torch_nvdla.cli import main; sys.exit(main())", *argv], env=env, capture_output=True,
                                  text=True)
            out[what] = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"torch-nvdla {what} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    return out


# --------------------------------------------------------------------------- passes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_pass(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """The baseline: FP32 inference over every batch."""
    with torch.no_grad():
        for x in batches:
            model(x)


def calibrate_pass(model: nn.Module, batches: Sequence[torch.Tensor]):
    """The measured pass: a full entropy calibration (ranges included)."""
    return calibrate(model, batches, progress=False)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_passes(w: Workload, repeats: int,
                device: torch.device) -> tuple[tuple[float, float], tuple[float, float], int, float]:
    """Best-of-``repeats`` (wall, CPU) seconds of the forward and the calibrate pass,
    alternated, and the median over repeats of each calibrate pass's wall time over the
    forward's just before it.

    The CPU time (all threads) does not count the time other processes hold the cores; the
    paired median follows a machine whose speed drifts between repeats (both passes of a
    pair see the same state) and ignores a repeat that one pass lost to a stall.
    """
    forward_pass(w.model, w.batches[:1])  # warm-up: allocator, kernels, lazy init
    taps = len(calibrate_pass(w.model, w.batches[:1]))
    fwd, cal = [], []
    for _ in range(repeats):
        fwd.append(_timed(lambda: forward_pass(w.model, w.batches), device))
        cal.append(_timed(lambda: calibrate_pass(w.model, w.batches), device))
        gc.collect()
    best = lambda runs: (min(r[0] for r in runs), min(r[1] for r in runs))  # noqa: E731
    return best(fwd), best(cal), taps, statistics.median(c[0] / f[0] for f, c in zip(fwd, cal))


def _proc_status_mib(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status``, MiB (None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_mib() -> float:
    """Peak resident set of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def _memory_child(name: str, mode: str, batch: int, n_batches: int, threads: int) -> dict:
    """Run one pass in this (fresh) process and report its peak memory."""
    torch.set_num_threads(threads)
    w = load_workload(name, batch * n_batches, batch, torch.device("cpu"))
    if w is None:
        return {"error": f"{name} unavailable"}
    gc.collect()
    exact = _reset_peak_rss() and _proc_status_mib("VmHWM") is not None
    before = _proc_status_mib("VmRSS") if exact else _maxrss_mib()
    if mode == "forward":
        forward_pass(w.model, w.batches)
    else:
        calibrate_pass(w.model, w.batches)
    peak = _proc_status_mib("VmHWM") if exact else _maxrss_mib()
    return {"peak_mib": peak, "added_mib": peak - before, "source": "VmHWM" if exact else "ru_maxrss"}


def memory_cpu(name: str, batch: int, n_batches: int, threads: int) -> dict[str, dict]:
    """Peak RSS of each pass, each in a fresh subprocess."""
    out = {}
    for mode in ("forward", "calibrate"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", name, mode,
               str(batch), str(n_batches), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory subprocess for {name} {mode} failed:\n{proc.stderr[-2000:]}")
        out[mode] = json.loads(lines[-1])
    return out


def memory_cuda(w: Workload, batch: int, device: torch.device) -> dict[str, dict]:
    """``max_memory_allocated`` of each pass at ``batch`` images per batch."""
    batches = [b for b in w.batches if len(b) == batch][:2] or w.batches[:2]
    out = {}
    for mode, fn in (("forward", forward_pass), ("calibrate", calibrate_pass)):
        gc.collect()
        torch.cuda.empty_cache()
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(w.model, batches)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) / (1 << 20)
        out[mode] = {"peak_mib": peak, "added_mib": peak - base / (1 << 20)}
    return out


def _leaf_pass(model: nn.Module, batches: Sequence[torch.Tensor], make: Callable[[], object],
               update: Callable[[object, torch.Tensor], None]) -> int:
    """A forward over ``batches`` streaming every leaf module's output into its own observer."""
    observers: dict[int, object] = {}

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if id(module) not in observers:
                observers[id(module)] = make()
            update(observers[id(module)], out.detach())

    handles = [m.register_forward_hook(hook) for _, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return len(observers)


def _own_collection(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """torch_nvdla's collection alone (no range search), for a like-with-like comparison."""
    from torch_nvdla import calibration_mode

    with calibration_mode(model, progress=False), torch.no_grad():
        for x in batches:
            model(x)


def peer_passes(w: Workload, repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds of histogram *collection* over the same images and leaf outputs: torch_nvdla,
    nvidia-modelopt's ``HistogramCalibrator.collect`` and torch.ao's ``HistogramObserver``
    (each where installed), best of ``repeats``; range searches are not included."""
    passes: dict[str, Callable[[], object]] = {
        "forward": lambda: forward_pass(w.model, w.batches),
        "torch_nvdla": lambda: _own_collection(w.model, w.batches),
    }
    try:
        from modelopt.torch.quantization.calib import HistogramCalibrator

        passes["modelopt"] = lambda: _leaf_pass(w.model, w.batches, lambda: HistogramCalibrator(8, None, False),
                                                lambda o, x: o.collect(x))
    except Exception as e:  # not installed (pip install nvidia-modelopt requests huggingface_hub)
        print(f"modelopt not measured: {type(e).__name__}: {e}", file=sys.stderr)
    from torch.ao.quantization.observer import HistogramObserver

    passes["torch.ao"] = lambda: _leaf_pass(w.model, w.batches, HistogramObserver, lambda o, x: o(x))
    best: dict[str, float] = {}
    for fn in passes.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in passes.items():
            best[name] = min(best.get(name, math.inf), _timed(fn, device)[0])
    return best


def profile_calibrate(w: Workload, batches: int, limit: int = 25) -> str:
    """Operator-level profile of a calibrate pass: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.batches[0].is_cuda else [])
    calibrate_pass(w.model, w.batches[:1])
    with profile(activities=activities) as prof:
        calibrate_pass(w.model, w.batches[:batches])
    key = "self_cuda_time_total" if w.batches[0].is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=limit)


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_results(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="calibrate vs plain FP32 forward (same images; best of repeats)")
    for col in ("model", "device", "images", "forward s", "calibrate s", "time ratio", "paired median",
                "CPU-time ratio",
                "mem batch", "forward peak MiB", "calibrate peak MiB", "mem ratio", "added MiB fwd/cal"):
        t.add_column(col, justify="left" if col in ("model", "device") else "right")
    for r in results:
        ok_t = "green" if r.time_ratio <= r.time_target else "red"
        ok_m = "green" if r.memory_ratio is not None and r.memory_ratio <= r.memory_target else "red"
        t.add_row(
            r.model, f"{r.device} x{r.threads}" if r.device == "cpu" else r.device, str(r.images),
            f"{r.forward_s:.2f}", f"{r.calibrate_s:.2f}",
            f"[{ok_t}]{r.time_ratio:.2f}x[/] (<= {r.time_target}x)", f"{r.paired_ratio:.2f}x",
            f"{r.cpu_ratio:.2f}x ({r.forward_cpu_s:.1f} / {r.calibrate_cpu_s:.1f} s)", str(r.memory_batch),
            _fmt(r.forward_peak_mib, ".0f"), _fmt(r.calibrate_peak_mib, ".0f"),
            "-" if r.memory_ratio is None else f"[{ok_m}]{r.memory_ratio:.3f}x[/] (<= {r.memory_target}x)",
            f"{_fmt(r.forward_added_mib, '.0f')} / {_fmt(r.calibrate_added_mib, '.0f')}",
        )
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console = Console(width=170)
    console.print(t)
    if any(r.peers for r in results):
        names = [k for k in ("torch_nvdla", "modelopt", "torch.ao") if any(k in r.peers for r in results)]
        p = Table(title="histogram collection alone (same images, every leaf output), x the plain forward")
        for col in ("model", "forward s", *names):
            p.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            if r.peers:
                f = r.peers["forward"]
                p.add_row(r.model, f"{f:.2f}", *[f"{r.peers[k] / f:.2f}x" if k in r.peers else "-" for k in names])
        console.print(p)
    if any(r.cli for r in results):
        c = Table(title="whole commands (fresh processes, start-up included), x the in-process forward")
        for col in ("model", "calibration images", "forward s", "export s", "evaluate s"):
            c.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            if r.cli:
                c.add_row(r.model, str(r.images), f"{r.forward_s:.1f}",
                          *[f"{r.cli[k]:.1f} ({r.cli[k] / r.forward_s:.2f}x)" for k in ("export", "evaluate")])
        console.print(c)
    binning = sorted({r.binning for r in results if r.binning})
    if binning:
        console.print(f"[dim]CPU histogram binning: {', '.join(binning)} (torch_nvdla.calib.native.KERNELS)[/]")
    for r in results:
        for note in r.notes:
            console.print(f"[dim]{r.model}: {note}[/]")


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS, metavar="MODEL",
                   help=f"models to run, of {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--peers", action="store_true",
                   help="also time histogram collection alone: torch_nvdla, modelopt, torch.ao (same taps)")
    p.add_argument("--num-images", type=int, default=500, help="images per timed pass (default 500)")
    p.add_argument("--batch-size", type=int, default=50, help="batch size of the timed passes (default 50)")
    p.add_argument("--memory-batch", type=int, default=64, help="batch size of the memory passes (default 64)")
    p.add_argument("--memory-batches", type=int, default=2, help="batches per memory pass (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of each pass; best kept (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--profile", action="store_true", help="print an operator profile of calibrate")
    p.add_argument("--cli", action="store_true",
                   help=f"also time torch-nvdla export and evaluate as commands ({', '.join(_CLI_MODELS)} only)")
    p.add_argument("--eval-images", type=int, default=100, help="evaluation images of --cli's evaluate (default 100)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a target is missed."""
    args = _parser().parse_args(argv)
    if args._memory_child:
        name, mode, batch, n_batches, threads = args._memory_child
        print(json.dumps(_memory_child(name, mode, int(batch), int(n_batches), int(threads))))
        return 0
    for opt in ("num_images", "batch_size", "memory_batch", "memory_batches", "repeats", "threads"):
        if getattr(args, opt) < 1:
            raise SystemExit(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    results: list[Result] = []
    for name in args.models:
        w = load_workload(name, args.num_images, args.batch_size, device)
        if w is None:
            continue
        print(f"{name}: {w.images} images ({w.source}), timing...", file=sys.stderr)
        (fwd, fwd_cpu), (cal, cal_cpu), taps, paired = time_passes(w, args.repeats, device)
        r = Result(name, str(device), w.source, w.images, args.batch_size, args.threads, fwd, cal,
                   cal / fwd, TIME_TARGET.get(device.type, 1.5), args.memory_batch,
                   fwd_cpu, cal_cpu, cal_cpu / fwd_cpu, paired, taps=taps, binning=("C kernels" if KERNELS else "torch") if device.type == "cpu" else "")
        if not args.no_memory:
            print(f"{name}: peak memory at batch {args.memory_batch}...", file=sys.stderr)
            if device.type == "cuda":
                mw = load_workload(name, args.memory_batch * args.memory_batches, args.memory_batch, device)
                mem = memory_cuda(mw, args.memory_batch, device)
                del mw
            else:
                mem = memory_cpu(name, args.memory_batch, args.memory_batches, args.threads)
            r.forward_peak_mib = mem["forward"]["peak_mib"]
            r.calibrate_peak_mib = mem["calibrate"]["peak_mib"]
            r.forward_added_mib = mem["forward"]["added_mib"]
            r.calibrate_added_mib = mem["calibrate"]["added_mib"]
            r.memory_ratio = r.calibrate_peak_mib / r.forward_peak_mib
        if args.peers:
            print(f"{name}: peers (collection only)...", file=sys.stderr)
            r.peers = peer_passes(w, args.repeats, device)
        if args.profile:
            print(profile_calibrate(w, min(2, len(w.batches))), file=sys.stderr)
        if args.cli and name in _CLI_MODELS and device.type == "cpu":
            print(f"{name}: torch-nvdla export / evaluate...", file=sys.stderr)
            r.cli = cli_passes(name, args.num_images, args.eval_images, args.batch_size, args.threads)
        results.append(r)
        del w
        gc.collect()
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_results(results)
    missed = [r for r in results
              if r.time_ratio > r.time_target or (r.memory_ratio is not None and r.memory_ratio > r.memory_target)]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
