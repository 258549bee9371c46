"""Streaming, mergeable, exact histograms of activations, kept on the activation's device.

The one idea of this module: a histogram whose range is a **power of two**.

A :class:`Histogram` counts signed values on ``[-R, R)`` in ``2 * bins`` equal bins, where
``R = 2**ceil(log2(max|x|))`` is the smallest power of two covering every value seen.
Because ``R`` is a function of the global maximum alone, and because halving a
power-of-two bin grid nests exactly, the histogram is the same whatever the batch size,
the batch order or the number of processes that contributed:

* growing the range from ``R`` to ``R * 2**k`` merges each run of ``2**k`` adjacent bins
  into one (an integer index shift, ``b' = bins + ((b - bins) >> k)``): no data is re-read
  and no count is dropped;
* merging two histograms brings both to the larger range this way and adds the counts.

Counts are int64 (a float32 ``torch.histc`` count stops being exact past ``2**24`` per bin,
so each ``histc`` call sees at most ``2**24`` elements and its counts are converted to
int64 at once). Memory is ``O(bins)`` per histogram, never ``O(activations)``.

The price of the power-of-two range is resolution: the data's largest value lands in the
upper half of the range, so between ``bins/2`` and ``bins`` bins cover the data.

On CUDA nothing here waits for the device: the range is a device tensor and the values
are scaled into a fixed ``[-bins, bins]`` window before ``histc``. On the CPU, where a host
read costs nothing, the range is read back and ``histc`` bins the raw values directly.

The signed layout keeps what a ReLU does computable without touching data:
``relu(x)`` has the positive half of ``x``'s histogram plus every non-positive value in
bin 0 (see :meth:`Histogram.relu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Histogram", "HistogramObserver"]

_CHUNK = 1 << 24  # elements per histc call: float32 counts stay exact
_TINY_EXP = -126  # smallest range exponent: 2**-126 (float32's smallest normal)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``x``'s elements in memory order (no copy for dense layouts)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _pow2_ceil(m: torch.Tensor) -> torch.Tensor:
    """``2**ceil(log2(m))`` in float64, at least ``2**-126`` (device op, no sync)."""
    m = m.to(torch.float64).clamp_min(2.0**_TINY_EXP)
    return torch.exp2(torch.ceil(torch.log2(m)))


@dataclass
class Histogram:
    """Signed histogram on a power-of-two range.

    Attributes:
        counts: int64 tensor of ``2 * bins`` counts; bin ``b`` covers
            ``[-R + b*R/bins, -R + (b+1)*R/bins)``.
        range: 0-dim float64 tensor ``R`` (a power of two), on the counts' device.
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
        h = cls.empty(bins, flat.device)
        if flat.numel() == 0:
            return h
        lo, hi = torch.aminmax(flat)
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        h.min, h.max, h.finite, h.numel = lo, hi, finite, flat.numel()
        amax = torch.maximum(lo.abs(), hi.abs())
        h.range = _pow2_ceil(torch.where(finite, amax, torch.zeros_like(amax)))
        n = 2 * bins
        if flat.device.type == "cpu":
            if not bool(finite):
                return h  # counts are meaningless; the caller reports the tap
            r = float(h.range)
            for chunk in flat.split(_CHUNK):
                if chunk.dtype != torch.float32:
                    chunk = chunk.float()
                h.counts += torch.histc(chunk, n, -r, r).to(torch.int64)
        else:
            step = (bins / h.range).to(torch.float32)  # a power of two: scaling is exact
            for chunk in flat.split(_CHUNK):
                scaled = chunk.float() * step
                scaled = torch.nan_to_num(scaled, nan=0.0, posinf=bins, neginf=-bins)
                h.counts += torch.histc(scaled, n, -bins, bins).to(torch.int64)
        return h

    def rebinned(self, new_range: torch.Tensor) -> torch.Tensor:
        """Counts at a larger power-of-two range ``new_range >= self.range``.

        Each run of ``2**k`` bins (``k = log2(new_range / range)``) merges into one:
        ``b' = bins + ((b - bins) >> k)``; ``>>`` floors, so negative offsets stay on the
        negative side.
        """
        bins = self.bins
        k = torch.round(torch.log2(new_range / self.range)).to(torch.int64)
        k = k.clamp(0, int(math.log2(bins)) + 1)
        offset = torch.arange(-bins, bins, device=self.device, dtype=torch.int64)
        index = bins + torch.bitwise_right_shift(offset, k)
        out = torch.zeros_like(self.counts)
        return out.index_add_(0, index, self.counts)

    def merge_(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts into this histogram in place (the union of the data)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        other = other.to(self.device)
        new_range = torch.maximum(self.range, other.range)
        self.counts = self.rebinned(new_range) + other.rebinned(new_range)
        self.range = new_range
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.finite = self.finite & other.finite
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
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        empty = self.numel == 0
        return Histogram(
            counts,
            self.range.clone(),
            self.min.clone() if empty else torch.maximum(self.min, zero),
            self.max.clone() if empty else torch.maximum(self.max, zero),
            self.finite.clone(),
            self.numel,
        )

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
    the |x| histogram to a pure strategy from :mod:`torch_nvdla._strategies`.

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
        """The tap's ``amax`` by ``method`` (see :func:`torch_nvdla._strategies.compute_amax`)."""
        from ._strategies import compute_amax

        h = self.histogram
        if h.numel == 0:
            return 0.0
        counts, edges = h.abs_histogram()
        amax = compute_amax(method, counts, edges, **options)
        # The histogram knows max|x| only to a bin; the observer knows it exactly.
        return min(float(amax), h.max_abs())
