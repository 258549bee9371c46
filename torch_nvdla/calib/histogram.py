"""Streaming, mergeable, exact histograms of activations, kept on the activation's device.

Design notes and the facts behind them: ``docs/calib.md``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

try:  # the optional C kernel (setup.py builds it where a C compiler is present)
    from . import _binning as _native
except ImportError:  # pragma: no cover - depends on the install
    _native = None

__all__ = ["BINNING", "Histogram", "HistogramObserver"]

#: How CPU tensors are binned: ``"native"`` (the C kernel, one pass) or ``"torch"`` (a
#: few vectorised torch operations and ``bincount`` per chunk). The same bins either way;
#: ``TORCH_NVDLA_BINNING=torch`` forces the torch path.
BINNING = "native" if _native is not None and os.environ.get("TORCH_NVDLA_BINNING", "") != "torch" else "torch"


_OPENMP_LIBRARY = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[^/]*$")


def _openmp_runtimes(maps_lines) -> set[str]:
    """The OpenMP runtime libraries (libgomp, libiomp5, libomp) among ``/proc/<pid>/maps``
    lines: each distinct file once."""
    return {line.split()[-1] for line in maps_lines if _OPENMP_LIBRARY.search(line.rstrip())}


def _one_openmp_runtime() -> bool:
    """The C kernel was built with OpenMP and exactly one OpenMP runtime is loaded (Linux):
    then its threads are torch's own, already running, and splitting a tensor over them
    oversubscribes nothing. Anywhere else the kernel runs on the calling thread."""
    if _native is None or not _native.openmp():
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return len(_openmp_runtimes(maps)) == 1
    except OSError:
        return False


_SHARED_OPENMP = _one_openmp_runtime()


def _native_threads() -> int:
    """Threads the C kernel may split one tensor over: torch's intra-op threads when it
    shares their OpenMP runtime, else 1."""
    return torch.get_num_threads() if _SHARED_OPENMP else 1


# Elements binned per step on the CPU: large enough that per-operation overhead does not
# dominate small layers, small enough that the scratch (12 bytes an element) stays modest.
_CPU_CHUNK = 1 << 19
_DEVICE_CHUNK = 1 << 22  # elements binned per step on an accelerator: 32 MiB float64 scratch
_TINY_EXP = -126  # smallest range exponent: 2**-126 (float32's smallest normal)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``x``'s elements in memory order (no copy for dense layouts)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _scaling(bins: int, r: float) -> tuple[float, float]:
    """``(pre, step)`` with ``pre * step = bins / r``, each a float32-representable power of
    two: ``step`` alone unless ``bins / r`` exceeds ``2**100`` (ranges below ~``2**-90``)."""
    step = bins / r
    return (2.0**100, step / 2.0**100) if step > 2.0**100 else (1.0, step)


def _count_cpu(flat: torch.Tensor, bins: int, r: float) -> torch.Tensor:
    """Exact signed counts of finite CPU values on ``(-r, r)`` (``r`` a power of two > max|x|).

    Bin ``bins + trunc(x * bins / r) - [x < 0]``, in ``[0, 2 * bins)`` because ``|x| < r``.
    ``x * bins / r`` is a power-of-two scaling, exact in float32 for float32/fp16/bf16 values
    (float64 for float64 ones) unless it underflows -- and then ``|y| < 1`` truncates to 0
    anyway, the sign coming from ``x`` itself (``-0.0`` is not negative). Counted by the C
    kernel when it is built (:data:`BINNING`), else by :func:`_count_cpu_torch`.
    """
    if BINNING == "native":
        return _count_cpu_native(flat, bins, r)
    return _count_cpu_torch(flat, bins, r)


def _count_cpu_native(flat: torch.Tensor, bins: int, r: float) -> torch.Tensor:
    """:func:`_count_cpu` by the C kernel: one pass, no scratch (fp16/bf16 are first
    widened to float32, which is exact)."""
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    flat = flat.contiguous()
    counts = torch.zeros(2 * bins, dtype=torch.int64)
    pre, step = _scaling(bins, r)
    _native.count(flat.data_ptr(), flat.numel(), flat.dtype == torch.float64, bins, pre, step, counts.data_ptr(),
                  _native_threads())
    return counts


def _count_cpu_torch(flat: torch.Tensor, bins: int, r: float) -> torch.Tensor:
    """:func:`_count_cpu` with torch operations: a few passes over each chunk, int32
    indices throughout (``bincount`` reads them fastest)."""
    n = 2 * bins
    pre, step = _scaling(bins, r)
    wide = flat.dtype == torch.float64
    size = min(flat.numel(), _CPU_CHUNK)
    scaled = torch.empty(size, dtype=torch.float64 if wide else torch.float32)
    index = torch.empty(size, dtype=torch.int32)
    negative = torch.empty(size, dtype=torch.int32)
    counts = torch.zeros(n, dtype=torch.int64)
    for chunk in flat.split(_CPU_CHUNK):
        k = chunk.numel()
        y, i, neg = scaled[:k], index[:k], negative[:k]
        if chunk.dtype == y.dtype and pre == 1.0:
            torch.mul(chunk, step, out=y)
        else:
            y.copy_(chunk).mul_(pre).mul_(step)  # fp16/bf16 -> float32 is exact
        i.copy_(y)  # float -> int truncates toward zero
        torch.lt(chunk, 0, out=neg)
        i.sub_(neg).add_(bins)
        counts += torch.bincount(i, minlength=n)
    return counts


def _count_device(flat: torch.Tensor, bins: int, r: torch.Tensor) -> torch.Tensor:
    """Exact signed counts on an accelerator, without reading anything back to the host.

    Same bins as :func:`_count_cpu`; the integer-valued offsets are counted by a float64
    ``histc`` on ``[-bins, bins]``, where ``(offset + bins) * 2bins / 2bins`` is exact.
    ``histc`` skips NaN and out-of-range values (the histogram is then marked non-finite and
    its counts are not used).
    """
    n = 2 * bins
    step = bins / r  # float64 0-dim tensor, a power of two
    counts = torch.zeros(n, dtype=torch.float64, device=flat.device)
    for chunk in flat.split(_DEVICE_CHUNK):
        s = chunk.to(torch.float64).mul_(step).trunc_().sub_(chunk.lt(0).to(torch.uint8))
        counts += torch.histc(s, n, -bins, bins)
    return counts.to(torch.int64)


def _pow2_above(m: torch.Tensor) -> torch.Tensor:
    """``2**(floor(log2(m)) + 1)``, the smallest power of two > ``m``, in float64, at least
    ``2**-126`` (device op, no sync).

    ``frexp`` gives it exactly: ``m = mantissa * 2**e`` with ``0.5 <= mantissa < 1``, so
    ``2**(e - 1) <= m < 2**e``.
    """
    m = m.to(torch.float64).clamp_min(2.0 ** (_TINY_EXP - 1))
    _, exponent = torch.frexp(m)
    return torch.exp2(exponent.to(torch.float64))


def _pow2_above_float(m: float) -> float:
    """:func:`_pow2_above` of a Python float (``inf`` past float64's largest power of two)."""
    _, exponent = math.frexp(max(m, 2.0 ** (_TINY_EXP - 1)))
    return math.ldexp(1.0, exponent) if exponent < 1024 else math.inf


@dataclass
class Histogram:
    """Signed histogram on a power-of-two range.

    Attributes:
        counts: int64 tensor of ``2 * bins`` counts; with ``w = R / bins``, bin ``bins + j``
            covers ``[j*w, (j+1)*w)`` and bin ``bins - 1 - j`` covers ``(-(j+1)*w, -j*w]``.
        range: 0-dim float64 tensor ``R`` (a power of two above every |x| seen), on the
            counts' device.
        min: 0-dim tensor, the smallest value seen (``+inf`` when empty).
        max: 0-dim tensor, the largest value seen (``-inf`` when empty).
        finite: 0-dim bool tensor, False once a NaN or Inf was seen.
        numel: number of values seen (a Python int; known without a device read).
    """

    counts: torch.Tensor
    range: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    finite: torch.Tensor
    numel: int = 0

    @property
    def bins(self) -> int:
        """Number of bins of the |x| histogram (half the signed bins)."""
        return self.counts.numel() // 2

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @classmethod
    def empty(cls, bins: int = 2048, device: torch.device | str | None = None) -> "Histogram":
        """A histogram that has seen nothing."""
        if bins < 1 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 1, got {bins}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(
            counts=torch.zeros(2 * bins, dtype=torch.int64, device=dev),
            range=torch.tensor(2.0**_TINY_EXP, dtype=torch.float64, device=dev),
            min=torch.tensor(math.inf, dtype=torch.float64, device=dev),
            max=torch.tensor(-math.inf, dtype=torch.float64, device=dev),
            finite=torch.tensor(True, device=dev),
            numel=0,
        )

    @classmethod
    def of(cls, x: torch.Tensor, bins: int = 2048) -> "Histogram":
        """The histogram of one tensor's values, on its device.

        Args:
            x: any floating tensor (fp16/bf16 are binned in float32).
            bins: bins of the |x| histogram (a power of two).
        """
        flat = _flat(x.detach())
        if flat.device.type == "cpu" and flat.numel():
            return cls._of_cpu(flat, bins)
        h = cls.empty(bins, flat.device)
        if flat.numel() == 0:
            return h
        lo, hi = torch.aminmax(flat)
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        h.min, h.max, h.finite, h.numel = lo, hi, finite, flat.numel()
        amax = torch.maximum(lo.abs(), hi.abs())
        h.range = _pow2_above(torch.where(finite, amax, torch.zeros_like(amax)))
        h.counts = _count_device(flat, bins, h.range)
        return h

    @classmethod
    def _of_cpu(cls, flat: torch.Tensor, bins: int) -> "Histogram":
        """:meth:`of` for a non-empty CPU tensor: the extremes are read once, as Python
        floats, and the range follows from them without further tensor operations."""
        if bins < 1 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 1, got {bins}")
        lo, hi = (float(v) for v in torch.aminmax(flat))
        finite = math.isfinite(lo) and math.isfinite(hi)
        r = _pow2_above_float(max(-lo, hi) if finite else 0.0)
        # Counts of a non-finite tensor are meaningless (the caller reports the tap).
        counts = _count_cpu(flat, bins, r) if finite else torch.zeros(2 * bins, dtype=torch.int64)
        f64 = torch.float64
        return cls(counts, torch.scalar_tensor(r, dtype=f64), torch.scalar_tensor(lo, dtype=f64),
                   torch.scalar_tensor(hi, dtype=f64), torch.scalar_tensor(finite, dtype=torch.bool), flat.numel())

    def rebinned(self, new_range: torch.Tensor) -> torch.Tensor:
        """Counts at a larger power-of-two range ``new_range >= self.range``.

        Each run of ``2**k`` bins (``k = log2(new_range / range)``) merges into one:
        ``b' = bins + ((b - bins) >> k)``; ``>>`` floors, so negative offsets stay on the
        negative side. At the same range (on the CPU) this is ``counts`` itself: read only.
        """
        bins = self.bins
        if self.device.type == "cpu":
            return self._rebinned_cpu(float(new_range))
        k = torch.round(torch.log2(new_range / self.range)).to(torch.int64)
        k = k.clamp(0, int(math.log2(bins)) + 1)
        offset = torch.arange(-bins, bins, device=self.device, dtype=torch.int64)
        index = bins + torch.bitwise_right_shift(offset, k)
        out = torch.zeros_like(self.counts)
        return out.index_add_(0, index, self.counts)

    def _rebinned_cpu(self, new_range: float) -> torch.Tensor:
        """:meth:`rebinned` on the CPU. With ``g = 2**k`` bins merging (``k`` at most
        ``log2(bins)``, where every offset already maps to -1 or 0), the ``2 bins / g``
        aligned runs of ``g`` bins are the new bins ``bins - bins/g .. bins + bins/g - 1``."""
        bins, old = self.bins, float(self.range)
        if new_range == old:
            return self.counts  # same grid (the usual case once the range settled)
        ratio = new_range / old
        top = bins.bit_length() - 1
        k = min(max(round(math.log2(ratio)), 0), top) if math.isfinite(ratio) else top
        runs = 2 * bins >> k
        out = torch.zeros_like(self.counts)
        out[bins - runs // 2:bins + runs // 2] = self.counts.view(runs, 1 << k).sum(1)
        return out

    def merge_(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts into this histogram in place (the union of the data)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        other = other.to(self.device)
        if self.device.type == "cpu":
            return self._merge_cpu(other)
        new_range = torch.maximum(self.range, other.range)
        self.counts = self.rebinned(new_range) + other.rebinned(new_range)
        self.range = new_range
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.finite = self.finite & other.finite
        self.numel += other.numel
        return self

    def _merge_cpu(self, other: "Histogram") -> "Histogram":
        """:meth:`merge_` on the CPU: the scalars compared as Python floats, the 0-dim
        tensors of the winning side kept (NaN wins, as in ``torch.minimum``)."""
        r_self, r_other = float(self.range), float(other.range)
        if r_self == r_other:
            self.counts = self.counts + other.counts
        elif r_self > r_other:
            self.counts = self.counts + other.rebinned(self.range)
        else:
            self.counts = self.rebinned(other.range) + other.counts
            self.range = other.range
        lo_self, lo_other = float(self.min), float(other.min)
        if lo_other < lo_self or (math.isnan(lo_other) and not math.isnan(lo_self)):
            self.min = other.min
        hi_self, hi_other = float(self.max), float(other.max)
        if hi_other > hi_self or (math.isnan(hi_other) and not math.isnan(hi_self)):
            self.max = other.max
        if not bool(other.finite):
            self.finite = other.finite
        self.numel += other.numel
        return self

    def to(self, device: torch.device | str) -> "Histogram":
        """This histogram on another device (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return Histogram(
            self.counts.to(device), self.range.to(device), self.min.to(device),
            self.max.to(device), self.finite.to(device), self.numel,
        )

    def clone(self) -> "Histogram":
        return Histogram(
            self.counts.clone(), self.range.clone(), self.min.clone(), self.max.clone(),
            self.finite.clone(), self.numel,
        )

    def relu(self) -> "Histogram":
        """The histogram of ``relu(x)`` computed from ``x``'s (no data touched).

        Every non-positive value becomes 0, which falls in the first non-negative bin.
        """
        bins = self.bins
        counts = self.counts.clone()
        counts[bins] += counts[:bins].sum()
        counts[:bins] = 0
        empty = self.numel == 0
        if self.device.type == "cpu":  # the extremes as Python floats: no tensor scalar ops
            lo, hi = (v if empty else max(v, 0.0) for v in (float(self.min), float(self.max)))
            f64 = torch.float64
            return Histogram(counts, self.range.clone(), torch.scalar_tensor(lo, dtype=f64),
                             torch.scalar_tensor(hi, dtype=f64), self.finite.clone(), self.numel)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return Histogram(
            counts,
            self.range.clone(),
            self.min.clone() if empty else torch.maximum(self.min, zero),
            self.max.clone() if empty else torch.maximum(self.max, zero),
            self.finite.clone(),
            self.numel,
        )

    def relu_is_exact(self) -> bool:
        """Whether :meth:`relu` equals the histogram of ``relu(x)`` computed from the data.

        True when the largest positive value sets the range. When the negative side alone
        does (``-min`` above the power of two covering ``max``), ``relu(x)`` has a smaller
        range, whose finer bins cannot be recovered from these counts. Reads the device.
        """
        if self.numel == 0:
            return True
        if self.device.type == "cpu":
            return _pow2_above_float(max(float(self.max), 0.0)) == float(self.range)
        return bool(_pow2_above(self.max.clamp_min(0.0)) == self.range)

    def abs_histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The histogram of ``|x|``: ``bins`` int64 counts and ``bins + 1`` float64 edges.

        ``counts_abs[j] = counts[bins + j] + counts[bins - 1 - j]``; edges ``j * R / bins``.
        """
        bins = self.bins
        counts = self.counts[bins:] + self.counts[:bins].flip(0)
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=self.device)
        return counts, edges * self.range

    def max_abs(self) -> float:
        """The exact largest |x| seen (0.0 when empty)."""
        if self.numel == 0:
            return 0.0
        return float(torch.maximum(self.min.abs(), self.max.abs()))

    def state_dict(self) -> dict:
        """Plain CPU state (counts as a list-friendly tensor) for saving or sending."""
        return {
            "bins": self.bins,
            "counts": self.counts.cpu(),
            "range": float(self.range),
            "min": float(self.min),
            "max": float(self.max),
            "finite": bool(self.finite),
            "numel": int(self.numel),
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> "Histogram":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        f64 = dict(dtype=torch.float64, device=dev)
        counts = torch.as_tensor(state["counts"], dtype=torch.int64).to(dev)
        if counts.numel() != 2 * int(state["bins"]):
            raise ValueError(f"histogram state has {counts.numel()} counts for {state['bins']} bins")
        return cls(
            counts=counts,
            range=torch.tensor(float(state["range"]), **f64),
            min=torch.tensor(float(state["min"]), **f64),
            max=torch.tensor(float(state["max"]), **f64),
            finite=torch.tensor(bool(state["finite"]), device=dev),
            numel=int(state["numel"]),
        )


class HistogramObserver:
    """The observer of one tap: ``update(x)``, ``compute()``, ``reset()``, ``merge(other)``.

    Collecting (this class) is kept apart from range picking: ``compute(method)`` hands
    the |x| histogram to a pure strategy from :mod:`torch_nvdla.calib.strategies`.

    Args:
        bins: bins of the |x| histogram (a power of two; default 2048).
        device: where the counts live; by default the device of the first tensor seen.
    """

    def __init__(self, bins: int = 2048, device: torch.device | str | None = None) -> None:
        self.bins = bins
        self._device = torch.device(device) if device is not None else None
        self.hist: Histogram | None = None
        self.last: Histogram | None = None  # the latest batch's histogram, O(bins)

    def reset(self) -> None:
        """Forget everything seen."""
        self.hist = None
        self.last = None

    def update(self, x: torch.Tensor) -> None:
        """Add one tensor's values."""
        h = Histogram.of(x if self._device is None else x.to(self._device), self.bins)
        self.update_histogram(h)

    def update_histogram(self, h: Histogram) -> None:
        """Add an already computed histogram (a derived tap, another process's counts)."""
        self.last = h
        if self.hist is None:
            self.hist = h.clone()
        else:
            self.hist.merge_(h)

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        """Add another observer's state into this one (batches or processes combine)."""
        if other.hist is not None:
            if self.hist is None:
                self.hist = other.hist.clone().to(self._device or other.hist.device)
            else:
                self.hist.merge_(other.hist)
        return self

    @property
    def histogram(self) -> Histogram:
        """The accumulated histogram (an empty one when nothing was seen)."""
        if self.hist is None:
            return Histogram.empty(self.bins, self._device)
        return self.hist

    def compute(self, method: str = "entropy", **options) -> float:
        """The tap's ``amax`` by ``method`` (see :func:`torch_nvdla.calib.strategies.compute_amax`)."""
        from .strategies import compute_amax

        h = self.histogram
        if h.numel == 0:
            return 0.0
        counts, edges = h.abs_histogram()
        amax = compute_amax(method, counts, edges, **options)
        # The histogram knows max|x| only to a bin; the observer knows it exactly.
        return min(float(amax), h.max_abs())
