"""Streaming, mergeable, exact histograms of activations, kept on the activation's device.

Design notes and the facts behind them: ``docs/calib.md``.
"""

from __future__ import annotations

import math

import torch

from .native import KERNELS, kernels, threads

__all__ = ["Histogram", "HistogramObserver"]


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
    kernel when it runs (:data:`torch_nvdla.calib.native.KERNELS`), else by :func:`_count_cpu_torch`.
    """
    if KERNELS:
        return _count_cpu_native(flat, bins, r)
    return _count_cpu_torch(flat, bins, r)


_NATIVE_DTYPES = (torch.float32, torch.float64)  # what the C kernels read


def _check_bins(bins: int) -> None:
    if bins < 1 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two >= 1, got {bins}")


def _native_ready(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` as the C kernel reads it: contiguous float32 or float64 (fp16/bf16 are
    widened to float32, which is exact)."""
    if flat.dtype not in _NATIVE_DTYPES:
        flat = flat.float()
    return flat.contiguous()


def _count_cpu_native(flat: torch.Tensor, bins: int, r: float) -> torch.Tensor:
    """:func:`_count_cpu` by the C kernel: one pass, no scratch."""
    flat = _native_ready(flat)
    counts = torch.empty(2 * bins, dtype=torch.int64)  # (the kernel writes every bin)
    pre, step = _scaling(bins, r)
    kernels.count(flat.data_ptr(), flat.numel(), flat.dtype == torch.float64, bins, pre, step, counts.data_ptr(),
                  threads())
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


_F64 = torch.float64


def _settled(total: "Histogram | None") -> bool:
    """``total`` is a CPU running total a batch can be binned at: it has seen finite values."""
    return total is not None and total._host and total.numel > 0 and total._finite


class Histogram:
    """Signed histogram on a power-of-two range.

    Attributes:
        counts: int64 tensor of ``2 * bins`` counts; with ``w = R / bins``, bin ``bins + j``
            covers ``[j*w, (j+1)*w)`` and bin ``bins - 1 - j`` covers ``(-(j+1)*w, -j*w]``.
        range: 0-dim float64 tensor ``R`` (a power of two above every |x| seen), on the
            counts' device.
        min: 0-dim float64 tensor, the smallest value seen (``+inf`` when empty).
        max: 0-dim float64 tensor, the largest value seen (``-inf`` when empty).
        finite: 0-dim bool tensor, False once a NaN or Inf was seen.
        numel: number of values seen (a Python int; known without a device read).

    On the CPU the four scalars are held as Python numbers (a calibration merges thousands
    of histograms, and a 0-dim tensor costs a tensor operation per read); the attributes
    give them as 0-dim tensors on every device all the same.
    """

    __slots__ = ("counts", "numel", "_range", "_min", "_max", "_finite")

    def __init__(self, counts: torch.Tensor, range: torch.Tensor | float, min: torch.Tensor | float,
                 max: torch.Tensor | float, finite: torch.Tensor | bool, numel: int = 0) -> None:
        self.counts = counts
        self.numel = int(numel)
        if counts.device.type == "cpu":
            self._range, self._min, self._max, self._finite = float(range), float(min), float(max), bool(finite)
        else:
            self._set_tensor_scalars(range, min, max, finite)

    def _set_tensor_scalars(self, range, min, max, finite) -> None:
        dev = self.counts.device
        self._range, self._min, self._max = (torch.as_tensor(v, dtype=_F64, device=dev) for v in (range, min, max))
        self._finite = torch.as_tensor(finite, dtype=torch.bool, device=dev)

    @property
    def _host(self) -> bool:
        """The scalars are Python numbers (a CPU histogram), not 0-dim tensors (any other
        device, or the accelerator path run on the CPU by the tests)."""
        return not isinstance(self._range, torch.Tensor)

    @classmethod
    def _of_floats(cls, counts: torch.Tensor, r: float, lo: float, hi: float, finite: bool,
                   numel: int) -> "Histogram":
        """A CPU histogram from Python numbers, without conversions (the hot path)."""
        h = cls.__new__(cls)
        h.counts, h.numel, h._range, h._min, h._max, h._finite = counts, numel, r, lo, hi, finite
        return h

    def _scalar(self, value, dtype: torch.dtype = _F64) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)

    @property
    def range(self) -> torch.Tensor:
        return self._scalar(self._range)

    @property
    def min(self) -> torch.Tensor:
        return self._scalar(self._min)

    @property
    def max(self) -> torch.Tensor:
        return self._scalar(self._max)

    @property
    def finite(self) -> torch.Tensor:
        return self._scalar(self._finite, torch.bool)

    @property
    def bins(self) -> int:
        """Number of bins of the |x| histogram (half the signed bins)."""
        return self.counts.numel() // 2

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def __repr__(self) -> str:
        return (f"Histogram(bins={self.bins}, range={float(self._range)!r}, min={float(self._min)!r}, "
                f"max={float(self._max)!r}, finite={bool(self._finite)}, numel={self.numel}, device={self.device})")

    @classmethod
    def empty(cls, bins: int = 2048, device: torch.device | str | None = None) -> "Histogram":
        """A histogram that has seen nothing."""
        _check_bins(bins)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(torch.zeros(2 * bins, dtype=torch.int64, device=dev), 2.0**_TINY_EXP, math.inf, -math.inf,
                   True, 0)

    @classmethod
    def of(cls, x: torch.Tensor, bins: int = 2048) -> "Histogram":
        """The histogram of one tensor's values, on its device.

        Args:
            x: any floating tensor (fp16/bf16 are binned in float32).
            bins: bins of the |x| histogram (a power of two).
        """
        flat = _flat(x.detach())
        if flat.numel() == 0:
            return cls.empty(bins, flat.device)
        if flat.device.type == "cpu":
            return cls._of_cpu(flat, bins)
        return cls._of_device(flat, bins)

    @classmethod
    def _of_device(cls, flat: torch.Tensor, bins: int) -> "Histogram":
        """:meth:`of` on an accelerator: 0-dim tensor scalars, ``histc`` counts, nothing read
        back to the host. Runs on CPU tensors too (the tests check it against the CPU path)."""
        _check_bins(bins)
        h = cls.__new__(cls)
        h.counts, h.numel = torch.zeros(2 * bins, dtype=torch.int64, device=flat.device), flat.numel()
        if flat.numel() == 0:
            h._set_tensor_scalars(2.0**_TINY_EXP, math.inf, -math.inf, True)
            return h
        lo, hi = torch.aminmax(flat)
        lo, hi = lo.to(_F64), hi.to(_F64)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        amax = torch.maximum(lo.abs(), hi.abs())
        r = _pow2_above(torch.where(finite, amax, torch.zeros_like(amax)))
        h.counts = _count_device(flat, bins, r)
        h._set_tensor_scalars(r, lo, hi, finite)
        return h

    @classmethod
    def _of_cpu(cls, flat: torch.Tensor, bins: int, total: "Histogram | None" = None) -> "Histogram":
        """:meth:`of` for a non-empty CPU tensor: the extremes are read once, as Python
        floats, and the range follows from them without further tensor operations.

        With ``total`` (a CPU histogram of ``bins``, the running total of earlier batches),
        the result is also merged into it, and it is binned at the total's range when its
        values fit in it (:meth:`HistogramObserver.update`)."""
        _check_bins(bins)
        if KERNELS:
            return cls._of_native(_native_ready(flat), bins, total)
        lo, hi = (float(v) for v in torch.aminmax(flat))
        finite = math.isfinite(lo) and math.isfinite(hi)
        r = _pow2_above_float(max(-lo, hi) if finite else 0.0)
        if finite and _settled(total) and r <= total._range:
            r = total._range
        # Counts of a non-finite tensor are meaningless (the caller reports the tap).
        counts = _count_cpu(flat, bins, r) if finite else torch.zeros(2 * bins, dtype=torch.int64)
        return cls._of_floats(counts, r, lo, hi, finite, flat.numel())._merged_into(total, counted=False)

    @classmethod
    def _of_native(cls, buf: torch.Tensor, bins: int, total: "Histogram | None" = None,
                   out: torch.Tensor | None = None) -> "Histogram":
        """:meth:`_of_cpu` by the C kernels, of a contiguous float32/float64 CPU tensor of any
        shape. With a settled ``total``, the batch is first counted at the total's range in
        one pass that also finds its extremes and, when every value fits, adds the counts
        into the total (the usual case once a tap's range has settled); otherwise the
        extremes come first and the batch is counted at its own range. ``out``: a contiguous
        int64 CPU tensor of ``2 * bins`` to write the counts to (the result's counts)."""
        ptr, n, wide = buf.data_ptr(), buf.numel(), buf.dtype == _F64
        # (the kernel writes every bin)
        counts = out if out is not None else torch.empty(2 * bins, dtype=torch.int64)
        if _settled(total):
            pre, step = _scaling(bins, total._range)
            lo, hi, added = kernels.count(ptr, n, wide, bins, pre, step, counts.data_ptr(), threads(),
                                          total.counts.data_ptr())
            if added:
                return cls._of_floats(counts, total._range, lo, hi, True, n)._merged_into(total, True)
        else:
            lo, hi = kernels.extremes(ptr, n, wide, threads())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            # Counts of a non-finite tensor are meaningless (the caller reports the tap).
            h = cls._of_floats(counts.zero_(), 2.0**_TINY_EXP, lo, hi, False, n)
            return h._merged_into(total, counted=False)
        r = _pow2_above_float(max(-lo, hi))
        pre, step = _scaling(bins, r)
        into = total is not None and total._range == r
        kernels.count(ptr, n, wide, bins, pre, step, counts.data_ptr(), threads(),
                      total.counts.data_ptr() if into else 0)
        return cls._of_floats(counts, r, lo, hi, True, n)._merged_into(total, into)

    def rebinned(self, new_range: torch.Tensor | float) -> torch.Tensor:
        """Counts at a larger power-of-two range ``new_range >= self.range``.

        Each run of ``2**k`` bins (``k = log2(new_range / range)``) merges into one:
        ``b' = bins + ((b - bins) >> k)``; ``>>`` floors, so negative offsets stay on the
        negative side. At the same range (on the CPU) this is ``counts`` itself: read only.
        """
        bins = self.bins
        if self._host:
            return self._rebinned_cpu(float(new_range))
        k = torch.round(torch.log2(torch.as_tensor(new_range, dtype=_F64, device=self.device) / self._range))
        k = k.to(torch.int64)
        k = k.clamp(0, int(math.log2(bins)) + 1)
        offset = torch.arange(-bins, bins, device=self.device, dtype=torch.int64)
        index = bins + torch.bitwise_right_shift(offset, k)
        out = torch.zeros_like(self.counts)
        return out.index_add_(0, index, self.counts)

    def _rebinned_cpu(self, new_range: float) -> torch.Tensor:
        """:meth:`rebinned` on the CPU. With ``g = 2**k`` bins merging (``k`` at most
        ``log2(bins)``, where every offset already maps to -1 or 0), the ``2 bins / g``
        aligned runs of ``g`` bins are the new bins ``bins - bins/g .. bins + bins/g - 1``."""
        if new_range == self._range:
            return self.counts  # same grid (the usual case once the range settled)
        bins, k = self.bins, self._shift(self._range, new_range)
        runs = 2 * bins >> k
        out = torch.zeros_like(self.counts)
        out[bins - runs // 2:bins + runs // 2] = self.counts.view(runs, 1 << k).sum(1)
        return out

    def _shift(self, fine: float, coarse: float) -> int:
        """``k = log2(coarse / fine)`` for CPU re-binning, at most ``log2(bins)`` (there every
        offset already maps to -1 or 0)."""
        ratio, top = coarse / fine, self.bins.bit_length() - 1
        return min(max(round(math.log2(ratio)), 0), top) if math.isfinite(ratio) else top

    def merge_(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts into this histogram in place (the union of the data)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        if other.counts.device != self.counts.device:
            other = other.to(self.device)
        if self._host and other._host:
            return self._merge_cpu(other)
        if self._host:  # (a CPU histogram merging one made by the accelerator path)
            self._set_tensor_scalars(self._range, self._min, self._max, self._finite)
        new_range = torch.maximum(self._range, other.range)
        self.counts = self.rebinned(new_range) + other.rebinned(new_range)
        self._range = new_range
        self._min = torch.minimum(self._min, other.min)
        self._max = torch.maximum(self._max, other.max)
        self._finite = self._finite & other.finite
        self.numel += other.numel
        return self

    def _merge_cpu(self, other: "Histogram") -> "Histogram":
        """:meth:`merge_` on the CPU: Python-number scalars, the counts added in place at
        the same range."""
        if self._range == other._range:
            self.counts += other.counts
        elif KERNELS and self.counts.is_contiguous() and other.counts.is_contiguous():
            # (the C kernel adds the coarser grid's runs of 2**k bins in one call)
            fine, coarse = (other, self) if self._range > other._range else (self, other)
            k = self._shift(fine._range, coarse._range)
            total = self.counts if coarse is self else other.counts.clone()
            kernels.rebin_add(fine.counts.data_ptr(), self.bins, k, total.data_ptr())
            self.counts, self._range = total, coarse._range
        elif self._range > other._range:
            self.counts += other._rebinned_cpu(self._range)
        else:
            self.counts = self._rebinned_cpu(other._range).add_(other.counts)
            self._range = other._range
        return self._merge_scalars(other)

    def _merge_scalars(self, other: "Histogram") -> "Histogram":
        """The CPU merge of everything but the counts (NaN wins, as in ``torch.minimum``)."""
        lo, hi = other._min, other._max
        if lo < self._min or (lo != lo and self._min == self._min):
            self._min = lo
        if hi > self._max or (hi != hi and self._max == self._max):
            self._max = hi
        self._finite = self._finite and other._finite
        self.numel += other.numel
        return self

    def to(self, device: torch.device | str) -> "Histogram":
        """This histogram on another device (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return Histogram(self.counts.to(device), self.range.to(device), self.min.to(device), self.max.to(device),
                         self.finite.to(device), self.numel)

    def clone(self) -> "Histogram":
        h = Histogram.__new__(Histogram)
        h.counts, h.numel = self.counts.clone(), self.numel
        h._range, h._min, h._max, h._finite = (v.clone() if isinstance(v, torch.Tensor) else v for v in
                                               (self._range, self._min, self._max, self._finite))
        return h

    def relu(self) -> "Histogram":
        """The histogram of ``relu(x)`` computed from ``x``'s (no data touched).

        Every non-positive value becomes 0, which falls in the first non-negative bin.
        """
        return self._relu_into(None)

    def _relu_into(self, total: "Histogram | None", out: torch.Tensor | None = None) -> "Histogram":
        """:meth:`relu`, also merged into ``total`` (a histogram of as many bins) when given:
        by the C kernel itself when both are CPU histograms at the same range. ``out``: a
        buffer like ``counts`` (not it) for the C kernel to write the result's counts to."""
        bins, empty = self.bins, self.numel == 0
        if not self._host:
            zero = torch.zeros((), dtype=_F64, device=self.device)
            lo, hi = (v.clone() if empty else torch.maximum(v, zero) for v in (self._min, self._max))
            h = Histogram(self._relu_counts(), self._range.clone(), lo, hi, self._finite.clone(), self.numel)
            return h._merged_into(total, counted=False)
        lo, hi = (v if empty else max(v, 0.0) for v in (self._min, self._max))
        into = total is not None and total._host and total._range == self._range
        if KERNELS:
            counts = out if out is not None else torch.empty_like(self.counts)  # (the kernel writes every bin)
            kernels.relu_fold(self.counts.data_ptr(), counts.data_ptr(), bins, total.counts.data_ptr() if into else 0)
        else:
            counts = self._relu_counts()
            if into:
                total.counts += counts
        return Histogram._of_floats(counts, self._range, lo, hi, self._finite, self.numel)._merged_into(total, into)

    def _relu_counts(self) -> torch.Tensor:
        """The counts of :meth:`relu` with torch operations: the positive half as it is, every
        non-positive count in bin ``bins`` (the first non-negative one)."""
        bins = self.bins
        counts = torch.zeros_like(self.counts)
        counts[bins:] = self.counts[bins:]
        counts[bins] += self.counts[:bins].sum()
        return counts

    def _merged_into(self, total: "Histogram | None", counted: bool) -> "Histogram":
        """Merge this histogram into ``total`` (if any) and return it; ``counted``: a kernel
        already added the counts into ``total`` at its range, only the scalars are left."""
        if counted:
            total._merge_scalars(self)
        elif total is not None:
            total.merge_(self)
        return self

    def relu_is_exact(self) -> bool:
        """Whether :meth:`relu` equals the histogram of ``relu(x)`` computed from the data.

        True when the largest positive value sets the range. When the negative side alone
        does (``-min`` above the power of two covering ``max``), ``relu(x)`` has a smaller
        range, whose finer bins cannot be recovered from these counts. Reads the device.
        """
        if self.numel == 0:
            return True
        if self._host:
            return self._own_range(relu=True) == self._range
        return bool(_pow2_above(self._max.clamp_min(0.0)) == self._range)

    def _own_range(self, relu: bool = False) -> float:
        """The smallest power-of-two range above the values seen (of ``max(x, 0)`` for
        ``relu``), from the extremes read as Python floats (a device read off the CPU)."""
        lo, hi = float(self._min), float(self._max)
        return _pow2_above_float(max(hi, 0.0) if relu else max(-lo, hi))

    def abs_histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The histogram of ``|x|``: ``bins`` int64 counts and ``bins + 1`` float64 edges.

        ``counts_abs[j] = counts[bins + j] + counts[bins - 1 - j]``; edges ``j * R / bins``.
        """
        counts, edges = Histogram.abs_histograms([self])
        return counts[0], edges[0]

    def scalars(self) -> tuple[float, float, float, bool]:
        """``(range, min, max, finite)`` as Python numbers (off the CPU: one device read)."""
        if self._host:
            return self._range, self._min, self._max, self._finite
        r, lo, hi, ok = torch.stack([self._range, self._min, self._max, self._finite.to(_F64)]).tolist()
        return r, lo, hi, bool(ok)

    @staticmethod
    def abs_histograms(hs: "list[Histogram]") -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`abs_histogram` of histograms of one bin count on one device, stacked:
        ``T x bins`` counts and ``T x (bins + 1)`` edges, in one set of operations."""
        if not hs:
            raise ValueError("abs_histograms needs at least one histogram")
        bins, dev = hs[0].bins, hs[0].device
        signed = torch.stack([h.counts for h in hs])
        counts = signed[:, bins:] + signed[:, :bins].flip(1)
        ranges = torch.tensor([float(h._range) for h in hs], dtype=_F64) if all(h._host for h in hs) \
            else torch.stack([h.range.to(dev) for h in hs])
        edges = torch.linspace(0.0, 1.0, bins + 1, dtype=_F64, device=dev)[None, :] * ranges.to(dev)[:, None]
        return counts, edges

    def max_abs(self) -> float:
        """The exact largest |x| seen (0.0 when empty)."""
        if self.numel == 0:
            return 0.0
        if self._host:
            return max(abs(self._min), abs(self._max))
        return float(torch.maximum(self._min.abs(), self._max.abs()))

    def state_dict(self) -> dict:
        """Plain CPU state (counts as a list-friendly tensor) for saving or sending."""
        return {
            "bins": self.bins,
            "counts": self.counts.cpu(),
            "range": float(self._range),
            "min": float(self._min),
            "max": float(self._max),
            "finite": bool(self._finite),
            "numel": int(self.numel),
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> "Histogram":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        counts = torch.as_tensor(state["counts"], dtype=torch.int64).to(dev)
        if counts.numel() != 2 * int(state["bins"]):
            raise ValueError(f"histogram state has {counts.numel()} counts for {state['bins']} bins")
        return cls(counts, float(state["range"]), float(state["min"]), float(state["max"]), bool(state["finite"]),
                   int(state["numel"]))


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
        # The latest batch's histogram, O(bins). On the CPU its counts live in a buffer the
        # next update() writes again (no allocation per batch): read it before then.
        self.last: Histogram | None = None
        self._counts: torch.Tensor | None = None  # that buffer (this observer's own)

    def reset(self) -> None:
        """Forget everything seen."""
        self.hist = None
        self.last = None
        self._counts = None

    def update(self, x: torch.Tensor) -> None:
        """Add one tensor's values.

        On the CPU a batch whose values fit in the running total's range is binned at that
        range (:attr:`last` is then coarser than :meth:`Histogram.of` of the batch alone);
        the total is the same either way, and :meth:`takes` says where :attr:`last` may
        stand in for another tap's data."""
        hist = self.hist
        if hist is not None and self._device is None and x.is_cpu and hist._host and x.numel():
            # The CPU fast path: counted straight into the running total where it can be.
            if KERNELS and x.dtype in _NATIVE_DTYPES and x.is_contiguous():
                self.last = Histogram._of_native(x, self.bins, hist, self._counts)  # (reads x as it is)
                self._counts = self.last.counts
            else:
                self.last = Histogram._of_cpu(_flat(x.detach()), self.bins, hist)
            return
        h = Histogram.of(x if self._device is None else x.to(self._device), self.bins)
        self.update_histogram(h)

    def takes(self, h: Histogram, relu: bool = False) -> bool:
        """Whether ``update_histogram(h)`` (``relu``: ``update_relu_of(h)``) adds exactly what
        ``update(x)`` would, ``x`` being the tensor ``h`` counts (``relu(x)``).

        ``h`` is binned at a power-of-two range ``R`` at least its values' own range ``r``
        (``2**(floor(log2(max|x|)) + 1)``, of ``max(x, 0)`` for ``relu``), and merging it
        gives counts at ``max(T, R)``, ``T`` the running total's range (none: ``R``), where
        ``x`` itself would give ``max(T, r)``. Re-binning is exact between power-of-two
        ranges, so the two agree when those ranges are equal. (Off the CPU, where this
        would read the device, a batch histogram is at its own range and only the ReLU case
        depends on the data: False for it.)
        """
        total = self.hist
        if total is not None and h._host and total._host and total._range >= h._range:
            return True  # (both merge at the total's range)
        if h.device.type != "cpu" or (total is not None and total.device.type != "cpu"):
            return not relu
        if h.numel == 0 or not bool(h._finite):
            return True  # (nothing to bin; a non-finite tap is reported whichever way)
        top = float(total._range) if total is not None else 0.0
        return max(top, float(h._range)) == max(top, h._own_range(relu))

    def update_relu_of(self, h: Histogram) -> None:
        """Add the histogram of ``relu(x)`` given ``x``'s histogram ``h`` (exact when
        ``takes(h, relu=True)``): ``update_histogram(h.relu())``, in one step on the CPU."""
        if self.hist is None:
            self.update_histogram(h.relu())
        else:
            self.last = h._relu_into(self.hist, self._counts if h._host else None)
            self._counts = self.last.counts if self.last._host else None

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
