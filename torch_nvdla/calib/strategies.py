"""Calibration strategies: pick ``amax`` from a histogram of ``|x|``.

Design notes and the facts behind them: ``docs/calib.md``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Union

import numpy as np
import torch

from ..errors import CalibrationError
from .native import KERNELS, kernels, threads

__all__ = [
    "STRATEGIES",
    "compute_amax",
    "entropy_amax",
    "entropy_amax_batch",
    "minmax_amax",
    "mse_amax",
    "percentile_amax",
    "threshold_to_percentile",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

# Relative slack when comparing a cumulative count with ``percentile / 100 * total``: covers
# the binary rounding of a decimal percentile (99.99) and of the product (a few ulps).
_PERCENTILE_RTOL = 4 * 2.0**-52

_TINY = torch.finfo(torch.float64).tiny

# Divergences (nats) closer than this to the minimum tie: the prefix-sum evaluation carries
# ~1e-14 of rounding, so structurally equal candidates (same P and Q up to empty bins)
# differ by noise; counting them as ties gives modelopt's "last minimum" on them.
_KL_TIE = 1e-12

# Elements per block of a (candidates, width) computation on the CPU: just under ATen's
# parallel grain size (32768), so each block's operations run inline on the calling thread
# (handing ~1e4-element operations to other threads costs more than it saves, and far
# more on a loaded machine).
_CPU_BLOCK_ELEMENTS = 32000

# Histograms searched together on the CPU: enough to share each operation's overhead, few
# enough that the (pair table x histograms) temporaries stay in cache.
_CPU_ENTROPY_GROUP = 8
_CPU_ENTROPY_GROUP_KERNELS = 64  # with the C level sums: bounds the (pairs x histograms) tables

# Elements per block off the CPU (bounds the memory of mse_amax's bin-by-bin path).
_DEVICE_BLOCK_ELEMENTS = 1 << 22

# log and searchsorted of CPU tensors through numpy (single-threaded); see _log_.
_CPU_VIA_NUMPY = True


# ---------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------


def _compute_device(*values: Any) -> torch.device:
    """The device of the first torch tensor among ``values`` (CPU when none, or MPS)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return torch.device("cpu") if v.device.type == "mps" else v.device
    return torch.device("cpu")


def _as_float64(value: ArrayLike, device: torch.device, what: str) -> torch.Tensor:
    """``value`` as a 1-D float64 tensor on ``device``.

    A numpy array or sequence is copied; a float64 tensor already on ``device`` is
    returned as is, so callers must not write to the result.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.from_numpy(np.array(value, dtype=np.float64, copy=True))
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{what} must be numeric, got {type(value).__name__}: {exc}") from exc
    if t.dim() != 1:
        raise CalibrationError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise CalibrationError(f"{what} must be real, got dtype {t.dtype}")
    return t.to(device).to(torch.float64)  # device first: MPS has no float64


def _histogram(counts: ArrayLike, edges: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and return ``(counts, edges)`` as float64 tensors on one device.

    Only shapes are checked: checking values (non-negative counts, increasing edges)
    would read a device tensor back to the host.
    """
    device = _compute_device(counts, edges)
    c = _as_float64(counts, device, "counts")
    e = _as_float64(edges, device, "edges")
    if c.numel() < 1:
        raise CalibrationError("counts is empty: a histogram needs at least one bin")
    if e.numel() != c.numel() + 1:
        raise CalibrationError(
            f"edges must have len(counts) + 1 = {c.numel() + 1} entries, got {e.numel()}"
        )
    return c, e


def _positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, else a :class:`CalibrationError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CalibrationError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _last_argmin(values: torch.Tensor, tie: float = 0.0) -> torch.Tensor:
    """Index of the last value within ``tie`` of the minimum (0-dim int64, no host read).

    ``values`` holds no NaN; ``+inf`` entries never win unless all are ``+inf``.
    """
    position = torch.arange(values.numel(), device=values.device)
    return torch.where(values <= values.min() + tie, position, -1).max()


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x * log(y)`` with ``0 * log(0) = 0`` (``y`` is floored at the smallest normal float).

    ``torch.special.xlogy`` is not vectorised on the CPU and costs ~10x more; the floor
    only matters for ``0 < y < 2.2e-308``, which no histogram produces.
    """
    return _log_(y.clamp_min(_TINY)).mul_(x)


def _log_(t: torch.Tensor) -> torch.Tensor:
    """Natural log in place (``log 0 = -inf``, no warning).

    On the CPU through numpy: ATen's vectorised log splits its work over threads from
    2048 elements on, and on a loaded machine waiting for the other thread costs ~50x
    the log itself.
    """
    if t.device.type == "cpu" and _CPU_VIA_NUMPY:
        array = t.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log(array, out=array)
        return t
    return t.log_()


def _row_blocks(rows: int, width: int, device: torch.device) -> int:
    """Rows per block of a ``(rows, width)`` computation.

    CPU: just under ATen's parallel grain size, so each block runs inline. Elsewhere: all
    rows, capped at ``2**22`` elements.
    """
    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, min(rows, budget // max(1, width)))


def _searchsorted(sequence: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(sequence, values)`` (left side); numpy on the CPU (single thread)."""
    if values.device.type == "cpu" and _CPU_VIA_NUMPY:
        return torch.from_numpy(np.searchsorted(sequence.numpy(), values.numpy(), side="left"))
    return torch.searchsorted(sequence, values)


def _at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for a 0-dim index tensor, as a 0-dim tensor without a host read.

    (``t[index]`` itself may turn a 0-dim index into a Python int, which reads the device.)
    """
    return t.index_select(0, index.reshape(1)).reshape(())


def _scalar(value: torch.Tensor) -> float:
    """The single host read of a strategy: a 0-dim tensor as a Python float."""
    return float(value.item())


def _minmax_tensor(c: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Upper edge of the last non-empty bin, 0 when every bin is empty (0-dim tensor)."""
    position = torch.arange(1, c.numel() + 1, device=c.device)
    last = torch.where(c > 0, position, torch.zeros_like(position)).max()
    return torch.where(last > 0, _at(e, last), torch.zeros_like(e[0]))


# ---------------------------------------------------------------------------------------
# minmax
# ---------------------------------------------------------------------------------------


def minmax_amax(counts: ArrayLike, edges: ArrayLike) -> float:
    """The upper edge of the last non-empty bin: ``amax = edges[k + 1]``, ``k = max{j : c_j > 0}``.

    Nothing is clipped (up to the histogram's resolution).

    Args:
        counts: ``N`` bin counts of ``|x|``.
        edges: ``N + 1`` increasing edges, ``edges[0] == 0``.

    Returns:
        ``amax``; ``0.0`` when every count is zero.

    Raises:
        CalibrationError: (a ``ValueError``) on malformed shapes.
    """
    c, e = _histogram(counts, edges)
    return _scalar(_minmax_tensor(c, e))


# ---------------------------------------------------------------------------------------
# percentile
# ---------------------------------------------------------------------------------------


def _check_percentile(percentile: Any) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise CalibrationError(f"percentile must be a number in (0, 100], got {percentile!r}")
    p = float(percentile)
    if not 0.0 < p <= 100.0:  # also rejects NaN
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile!r}")
    return p


def percentile_amax(
    counts: ArrayLike,
    edges: ArrayLike,
    percentile: float = 99.99,
    *,
    side: Literal["upper", "lower"] = "upper",
) -> float:
    """The edge of the bin where the cumulative distribution reaches ``percentile / 100``.

    With ``C_k = sum_{j <= k} c_j`` and ``T = C_{N-1}``, let
    ``k* = min{k : 100 * C_k >= percentile * T}`` (compared with a relative slack of four
    ulps so that decimal percentiles such as 99.99 are not lost to binary rounding).
    ``k*`` is always a non-empty bin, and then

    * ``side="upper"`` (default): ``amax = edges[k* + 1]``. At least ``percentile`` % of
      the samples satisfy ``|x| <= amax``; ``percentile=100`` equals :func:`minmax_amax`.
    * ``side="lower"``: ``amax = edges[k*]``, the choice of modelopt's
      ``_compute_amax_percentile`` (``edges[searchsorted(cumsum(c / T), p / 100)]``),
      which clips the whole bin ``k*``. modelopt compares a float CDF, so where its last
      value rounds below 1.0 it returns ``edges[N]`` instead; this function does not.

    Args:
        counts: ``N`` bin counts of ``|x|``.
        edges: ``N + 1`` increasing edges, ``edges[0] == 0``.
        percentile: in ``(0, 100]``.
        side: which edge of bin ``k*`` to return.

    Returns:
        ``amax``; ``0.0`` when every count is zero.

    Raises:
        CalibrationError: (a ``ValueError``) when ``percentile`` is outside ``(0, 100]``,
            ``side`` is unknown, or shapes are malformed.
    """
    p = _check_percentile(percentile)
    if side not in ("upper", "lower"):
        raise CalibrationError(f"side must be 'upper' or 'lower', got {side!r}")
    c, e = _histogram(counts, edges)
    n = c.numel()
    cum100 = torch.cumsum(c, 0) * 100.0
    total = cum100[-1:] / 100.0
    target = total * (p * (1.0 - _PERCENTILE_RTOL))
    k = torch.searchsorted(cum100, target, side="left").clamp(max=n - 1)[0]
    amax = _at(e, k + 1) if side == "upper" else _at(e, k)
    return _scalar(torch.where(total[0] > 0, amax, torch.zeros_like(amax)))


def threshold_to_percentile(threshold: float) -> float:
    """The NVDLA Caffe calibrator's ``threshold`` spelled as a percentile.

    ``threshold`` is the fraction of the histogram kept: ``0.9`` ignores the part above
    the 90th percentile, i.e. ``percentile = 100 * threshold = 90.0``. The product is
    rounded to 12 decimals to drop binary artefacts of the decimal spelling
    (``0.29 -> 29.0``, not ``28.999999999999996``).

    Args:
        threshold: a fraction in ``(0, 1]``.

    Returns:
        The percentile in ``(0, 100]`` for :func:`percentile_amax`.

    Raises:
        CalibrationError: (a ``ValueError``) when ``threshold`` is outside ``(0, 1]``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise CalibrationError(f"threshold must be a number in (0, 1], got {threshold!r}")
    t = float(threshold)
    if not 0.0 < t <= 1.0:
        raise CalibrationError(
            f"threshold must be a fraction in (0, 1] (0.9 keeps 90 % of the histogram), got {threshold!r}"
        )
    rounded = round(t * 100.0, 12)
    return rounded if rounded > 0.0 else t * 100.0


# ---------------------------------------------------------------------------------------
# entropy (KL divergence)
# ---------------------------------------------------------------------------------------


class _EntropyIndex(NamedTuple):
    """Index tensors of the entropy search; they depend on the shape only, not the counts."""

    candidates: torch.Tensor  # (K,) candidate thresholds i
    pair_lo: torch.Tensor  # (P,) first bin of every distinct level bin range [lo, hi)
    pair_hi: torch.Tensor  # (P,) one past its last bin
    levels: torch.Tensor  # (K * L,) each level's entry in the pair table, row-major
    last_lo: torch.Tensor  # (K,) first bin of the level holding bin i - 1
    last_hi: torch.Tensor  # (K,) one past its last bin (= i)
    last_bin: torch.Tensor  # (K,) i - 1


@functools.lru_cache(maxsize=32)
def _entropy_index(n_bins: int, start: int, step: int, levels: int, device: torch.device) -> _EntropyIndex:
    """Candidates ``i``, their levels' bin ranges, and the pair table they index (cached).

    Bin ``j < i`` lies in level ``floor(j * L / i)``, so level ``l`` is the bin range
    ``[ceil(l i / L), ceil((l + 1) i / L))``; bin ``i - 1`` lies in level
    ``floor((i - 1) L / i)``. A level is at most ``W = ceil(N / L)`` bins wide, so every
    level of every candidate is one of the ``(N + 1)(W + 1)`` ranges ``[lo, lo + w)``,
    entry ``lo * (W + 1) + w`` of the pair table. Integer arithmetic throughout: exact.
    """
    # Built with numpy (single-threaded, ~1 ms for 2048 bins) and moved to the device once.
    cand = np.arange(start, n_bins + 1, step, dtype=np.int64)
    lvl = np.arange(levels + 1, dtype=np.int64)
    bounds = (lvl[None, :] * cand[:, None] + (levels - 1)) // levels
    width = -(-n_bins // levels)
    keys = bounds[:, :-1] * (width + 1) + (bounds[:, 1:] - bounds[:, :-1])
    pairs, entries = np.unique(keys.reshape(-1), return_inverse=True)  # the ranges in use
    lo = pairs // (width + 1)
    hi = lo + pairs % (width + 1)
    last = ((cand - 1) * levels) // cand
    last_lo = (last * cand + (levels - 1)) // levels
    last_hi = ((last + 1) * cand + (levels - 1)) // levels
    arrays = (cand, lo, hi, entries, last_lo, last_hi, cand - 1)
    return _EntropyIndex(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays))


def entropy_amax(
    counts: ArrayLike,
    edges: ArrayLike,
    *,
    num_levels: int = 128,
    start_bin: int = 128,
    stride: int = 1,
    copy_first_bin: bool = True,
) -> float:
    """The threshold of minimum KL divergence (TensorRT EntropyCalibrator2 style).

    Reproduces modelopt's ``_compute_amax_entropy(counts, edges, num_bits=8,
    unsigned=False, stride, start_bin)`` (pytorch-quantization's is the same code), but
    costs ``O(num_levels)`` per candidate instead of ``O(N)`` Python steps.

    **Zero bin.** With ``copy_first_bin`` (as modelopt) the histogram used below is ``c``
    with ``c_0 := c_1``: the spike of exact zeros (ReLU outputs, padding) does not weigh
    on the search. ``T = sum_j c_j`` after that replacement.

    **Candidates.** ``i = start_bin, start_bin + stride, ... <= N``; candidate ``i``
    means ``amax = edges[i]``.

    **Reference** ``P`` (length ``i``): ``P_j = c_j`` for ``j < i - 1`` and
    ``P_{i-1} = c_{i-1} + R_i`` with ``R_i = sum_{j >= i} c_j`` (the clipped outliers
    fold into the last kept bin); ``sum_j P_j = T``.

    **Quantized** ``Q`` (length ``i``): the ``i`` bins merge into ``L = num_levels``
    levels, bin ``j`` going to level ``floor(j * L / i)`` (what modelopt's
    ``np.digitize(range(i), np.linspace(0, i, L + 1)) - 1`` computes: ``linspace`` steps
    by ``i / L``, exact for a power-of-two ``L``), so level ``l`` holds bins
    ``[ceil(l i / L), ceil((l + 1) i / L))``. Level ``l``'s mass ``M_l`` (of the
    *unfolded* ``c``) spreads evenly over its ``n_l`` non-empty bins:
    ``Q_j = M_l / n_l`` if ``c_j > 0``, else ``Q_j = 0``; ``sum_j Q_j = S_i = sum_{j<i} c_j``.

    **Divergence** (natural log, both normalised; ``0 log 0 = 0``)::

        KL_i = sum_j (P_j / T) log((P_j / T) / (Q_j / S_i))
             = (1 / T) sum_j P_j log(P_j / Q_j) + log(S_i / T)

    and, with ``H_k = sum_{j<k} c_j log c_j``, ``g_l = M_l log(M_l / n_l)``, ``c = c_{i-1}``,
    ``R = R_i``, ``q = M_last / n_last`` (``last`` = the level of bin ``i - 1``)::

        sum_j P_j log(P_j / Q_j) = H_i - sum_l g_l + (c + R) log(c + R) - c log c - R log q

    Prefix sums of ``c``, of ``[c_j > 0]`` and of ``c log c`` give every ``M_l``, ``n_l``
    and ``H_i`` by two look-ups, so all candidates are one ``(K, L + 1)`` gather.
    ``KL_i = +inf`` where ``Q`` cannot represent ``P``: ``P_{i-1} > 0 = Q_{i-1}``
    (``c_{i-1} = 0 < R_i``, scipy's ``rel_entr`` is ``inf`` there too) or ``S_i = 0``.

    **Choice.** The *last* minimum (largest ``i``), as modelopt
    (``len - 1 - argmin(divergences[::-1])``), counting divergences within ``1e-12`` nats
    of the minimum as equal: candidates with the same ``P`` and ``Q`` up to empty bins
    tie exactly in modelopt's per-candidate arithmetic but differ by ~1e-15 of rounding
    in the prefix sums here. ``amax = edges[i*]``.

    **Where this differs from modelopt** (which crashes or misbehaves there):

    * ``N < start_bin``: no candidate (modelopt raises on ``argmin`` of nothing); returns
      ``edges[N]``, the no-clipping threshold.
    * ``S_i = 0`` (no kept mass, e.g. the first ``start_bin`` bins empty): modelopt gets a
      NaN divergence, and ``np.argmin`` *prefers* NaN, so it returns ``edges[i]`` of the
      last such ``i`` and clips all data; here such candidates are ``+inf``.
    * ``T = 0`` after the zero-bin replacement (all mass in bin 0): modelopt returns
      ``edges[N]`` through the same NaN path; here :func:`minmax_amax` of the original
      counts (``edges[1]``).
    * modelopt replaces bin 0 *in the caller's array* (``calib_hist[:]`` is a numpy view);
      this function never writes to its inputs.

    Args:
        counts: ``N`` bin counts of ``|x|`` (float64 math: exact up to ``2**53``).
        edges: ``N + 1`` increasing edges, ``edges[0] == 0``.
        num_levels: quantized levels ``L`` (128 = 8-bit signed: modelopt's
            ``1 << (num_bits - 1 + unsigned)``).
        start_bin: first candidate ``i`` (>= 1).
        stride: step between candidates.
        copy_first_bin: apply ``c_0 := c_1`` first (modelopt always does).

    Returns:
        ``amax``; ``0.0`` when every count is zero.

    Raises:
        CalibrationError: (a ``ValueError``) on malformed shapes or options.
    """
    c_raw, e = _histogram(counts, edges)
    options = _entropy_options(num_levels, start_bin, stride)
    return _scalar(_entropy_rows(c_raw[None], e[None], *options, copy_first_bin)[0])


def entropy_amax_batch(
    counts: torch.Tensor,
    edges: torch.Tensor,
    *,
    num_levels: int = 128,
    start_bin: int = 128,
    stride: int = 1,
    copy_first_bin: bool = True,
) -> list[float]:
    """:func:`entropy_amax` of every row of ``counts`` (``T x N``) and ``edges``
    (``T x (N + 1)``) at once: the same picks, bit for bit, with one set of operations for
    all ``T`` histograms (a calibration's taps) instead of one per histogram.

    Raises:
        CalibrationError: (a ``ValueError``) on malformed shapes or options.
    """
    options = _entropy_options(num_levels, start_bin, stride)
    if not isinstance(counts, torch.Tensor) or not isinstance(edges, torch.Tensor) or counts.dim() != 2 \
            or edges.dim() != 2 or edges.shape != (counts.shape[0], counts.shape[1] + 1) or counts.shape[1] < 1:
        raise CalibrationError(f"counts (T, N >= 1) and edges (T, N + 1) tensors expected, got "
                               f"{tuple(getattr(counts, 'shape', ()))} and {tuple(getattr(edges, 'shape', ()))}")
    if counts.shape[0] == 0:
        return []
    device = _compute_device(counts)
    c_raw = counts.detach().to(device).to(torch.float64)
    e = edges.detach().to(device).to(torch.float64)
    rows = c_raw.shape[0]
    group = rows if device.type != "cpu" else _CPU_ENTROPY_GROUP_KERNELS if KERNELS else _CPU_ENTROPY_GROUP
    group = -(-rows // -(-rows // group))  # as many groups, of even sizes (no small last one)
    picks = [_entropy_rows(c, g, *options, copy_first_bin) for c, g in zip(c_raw.split(group), e.split(group))]
    return torch.cat(picks).tolist()


def _entropy_options(num_levels: Any, start_bin: Any, stride: Any) -> tuple[int, int, int]:
    return (_positive_int(num_levels, "num_levels"), _positive_int(start_bin, "start_bin"),
            _positive_int(stride, "stride"))


def _entropy_rows(c_raw: torch.Tensor, e: torch.Tensor, levels: int, start: int, step: int,
                  copy_first_bin: bool) -> torch.Tensor:
    """The entropy pick of every row of ``c_raw`` (``T x N`` float64) with edges ``e``
    (``T x (N + 1)``): a ``(T,)`` float64 tensor (see :func:`entropy_amax`; no host read).

    The work runs on columns (``N x T``: a gather of bins takes whole rows of ``T``
    values), the pair table too (``P x T``); each candidate's sum over its levels is a
    binary tree in a fixed order (the same bits for one histogram or many, with or
    without the C kernels).
    """
    n_bins, rows = c_raw.shape[1], c_raw.shape[0]
    zero = torch.zeros((), dtype=torch.float64, device=e.device)
    raw_total = c_raw.sum(1)
    if n_bins < start:
        return torch.where(raw_total > 0, e[:, -1], zero)

    c = torch.cat([c_raw[:, 1:2], c_raw[:, 1:]], 1) if (copy_first_bin and n_bins >= 2) else c_raw
    c = c.t().contiguous()  # (N, T)
    dev = c.device
    index = _entropy_index(n_bins, start, step, levels, dev)
    # Prefix sums, entry k = sum over bins j < k.
    pad = torch.zeros(1, rows, dtype=torch.float64, device=dev)
    mass = torch.cat([pad, torch.cumsum(c, 0)])  # S_k
    nonempty = torch.cat([pad, torch.cumsum((c > 0).to(torch.float64), 0)])  # exact ints
    clogc = torch.cat([pad, torch.cumsum(_xlogy(c, c), 0)])  # H_k
    total = mass[-1]

    def take(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, i)

    # g = M log(M / n) of every distinct level bin range (the pair table), then
    # sum_l g_l of every candidate: one (K, L) gather of that table per histogram (in
    # blocks of candidates, see _row_blocks). Each g is computed once however many
    # candidates share its range.
    level_mass, ratio = _pair_ratios(mass, nonempty, index)
    pair_g = _log_(ratio).mul_(level_mass)  # (P, T)
    g = _level_sums(pair_g, index.levels, index.candidates.numel(), levels)

    cand = index.candidates
    q_last = (take(mass, index.last_hi) - take(mass, index.last_lo)) / (
        take(nonempty, index.last_hi) - take(nonempty, index.last_lo)
    ).clamp_min_(1.0)
    kept = take(mass, cand)  # S_i, (K, T)
    outliers = total - kept  # R_i
    c_last = take(c, index.last_bin)
    folded = c_last + outliers
    t_kl = (
        take(clogc, cand)
        - g
        + _xlogy(folded, folded)
        - _xlogy(c_last, c_last)
        - _xlogy(outliers, q_last)
        + total * _log_(kept / total)
    )
    kl = t_kl / total
    unrepresentable = (kept <= 0) | ((c_last <= 0) & (outliers > 0)) | torch.isnan(kl)
    kl = torch.where(unrepresentable, torch.full_like(kl, math.inf), kl)

    best = _last_argmin_columns(kl, _KL_TIE)
    amax = e.gather(1, (start + best * step)[:, None])[:, 0]
    amax = torch.where(total > 0, amax, _minmax_rows(c_raw, e))
    return torch.where(raw_total > 0, amax, zero)


def _pair_ratios(mass: torch.Tensor, nonempty: torch.Tensor, index: _EntropyIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, max(M / n, tiny))`` of every pair-table bin range and histogram (``P x T``):
    ``M`` its mass, ``n`` its non-empty bins (at least 1; ``n = 0`` only if ``M = 0``), from
    the prefix sums (``(N + 1) x T``). The C kernel when it runs (one pass), else gathers;
    the same operations in the same order either way."""
    if mass.device.type == "cpu" and KERNELS:
        pairs, rows = index.pair_lo.numel(), mass.shape[1]
        level_mass = torch.empty(pairs, rows, dtype=torch.float64)
        ratio = torch.empty(pairs, rows, dtype=torch.float64)
        kernels.pair_ratios(mass.data_ptr(), nonempty.data_ptr(), mass.shape[0], rows, index.pair_lo.data_ptr(),
                            index.pair_hi.data_ptr(), pairs, _TINY, level_mass.data_ptr(), ratio.data_ptr(), threads())
        return level_mass, ratio
    level_mass = mass.index_select(0, index.pair_hi) - mass.index_select(0, index.pair_lo)  # M (exact)
    level_nonempty = (nonempty.index_select(0, index.pair_hi) - nonempty.index_select(0, index.pair_lo)).clamp_min_(1.0)
    return level_mass, level_nonempty.reciprocal_().mul_(level_mass).clamp_min_(_TINY)


def _level_sums(pair_g: torch.Tensor, level_index: torch.Tensor, candidates: int, levels: int) -> torch.Tensor:
    """``(K, T)``: for every candidate ``k`` and histogram ``t``, the sum of the ``L``
    pair-table entries ``pair_g[level_index[k * L + l], t]`` (``pair_g`` is ``P x T``),
    added as a binary tree (:func:`_tree_sum`). The C kernel when it runs, else gathers in
    blocks of candidates; the same bits either way."""
    rows = pair_g.shape[1]
    if pair_g.device.type == "cpu" and KERNELS:
        out = torch.empty(candidates, rows, dtype=torch.float64)
        kernels.level_sums(pair_g.data_ptr(), rows, pair_g.shape[0], level_index.data_ptr(), candidates, levels,
                           out.data_ptr(), threads())
        return out
    blocks = level_index.split(_row_blocks(candidates, levels * rows, pair_g.device) * levels)
    return torch.cat([_tree_sum(pair_g.index_select(0, b).view(-1, levels, rows)) for b in blocks])


def _tree_sum(v: torch.Tensor) -> torch.Tensor:
    """The sum over dimension 1 of ``v`` as a binary tree: ``v[:, j] += v[:, j + h]`` for
    ``j < h = n // 2`` (an odd last entry carried) until one is left. A fixed order, so
    that the C kernel and torch give the same bits."""
    while v.shape[1] > 1:
        n, h = v.shape[1], v.shape[1] // 2
        head = v[:, :h] + v[:, h:2 * h]
        v = torch.cat([head, v[:, 2 * h:]], 1) if n & 1 else head
    return v[:, 0]


def _last_argmin_columns(values: torch.Tensor, tie: float) -> torch.Tensor:
    """:func:`_last_argmin` of every column of a 2-D tensor: ``(T,)`` int64."""
    position = torch.arange(values.shape[0], device=values.device)[:, None]
    return torch.where(values <= values.min(0).values + tie, position, -1).max(0).values


def _minmax_rows(c: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """:func:`_minmax_tensor` of every row: ``(T,)``."""
    position = torch.arange(1, c.shape[1] + 1, device=c.device)
    last = torch.where(c > 0, position, torch.zeros_like(position)).max(1).values
    return torch.where(last > 0, e.gather(1, last[:, None])[:, 0], torch.zeros_like(e[:, 0]))


# ---------------------------------------------------------------------------------------
# mse
# ---------------------------------------------------------------------------------------


def _sse_by_cells(c: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """Summed squared QDQ error per scale, ``O(Qmax log N)`` per scale.

    Grid point ``k`` (``v_k = k s``) takes the bins whose centre satisfies
    ``x_j >= (k - 1/2) s`` up to the next threshold, the last one (``k = Qmax``) everything
    above: ``b_k = searchsorted(x, (k - 1/2) s)``, cell ``k = [b_k, b_{k+1})``,
    ``b_{Qmax+1} = N``. With prefix sums ``W0, W1, W2`` of ``c, c x, c x^2`` and cell sums
    ``w0_k, w1_k``::

        sum_j c_j (q(x_j) - x_j)^2 = W2_total - sum_{k>=1} v_k (2 w1_k - v_k w0_k)

    (cell 0 maps to 0 and contributes its ``sum c x^2``, part of ``W2_total``).
    """
    dev = c.device
    pad = torch.zeros(1, dtype=torch.float64, device=dev)
    cx = c * x
    w0 = torch.cat([pad, torch.cumsum(c, 0)])
    w1 = torch.cat([pad, torch.cumsum(cx, 0)])
    w2_total = (cx * x).sum()
    half = torch.arange(1, qmax + 1, dtype=torch.float64, device=dev) - 0.5
    grid = torch.arange(1, qmax + 1, dtype=torch.float64, device=dev)
    tail = torch.full((1,), c.numel(), dtype=torch.int64, device=dev)
    parts = []
    for s in scales.split(_row_blocks(scales.numel(), qmax + 1, dev)):
        rows = s.numel()
        starts = _searchsorted(x, half[None, :] * s[:, None])  # (rows, Qmax): b_1 .. b_Qmax
        bounds = torch.cat([starts, tail.expand(rows, 1)], 1).reshape(-1)
        m0 = w0.index_select(0, bounds).view(rows, qmax + 1)
        m1 = w1.index_select(0, bounds).view(rows, qmax + 1)
        cell0 = m0[:, 1:] - m0[:, :-1]
        cell1 = m1[:, 1:] - m1[:, :-1]
        v = grid[None, :] * s[:, None]
        parts.append(w2_total - (cell1.mul_(2.0).sub_(cell0.mul_(v)).mul_(v)).sum(1))
    return torch.cat(parts).clamp_min_(0.0)


def _sse_by_bins(c: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """Summed squared QDQ error per scale, bin by bin (``O(N)`` per scale; for ``Qmax >= N``).

    ``k_j = min(floor(x_j / s + 1/2), Qmax)`` (``x >= 0``: truncation is the floor) and
    ``sum_j c_j (k_j s - x_j)^2``.
    """
    parts = []
    for s in scales.split(_row_blocks(scales.numel(), x.numel(), c.device)):
        s = s[:, None]
        k = (x[None, :] / s).add_(0.5).clamp_(max=qmax).to(torch.int64)  # clamp, then cast
        parts.append((k.to(torch.float64).mul_(s).sub_(x[None, :]).square_().mul_(c[None, :])).sum(1))
    return torch.cat(parts)


def mse_amax(
    counts: ArrayLike,
    edges: ArrayLike,
    *,
    num_bits: int = 8,
    candidates: ArrayLike | None = None,
    start_bin: int = 128,
    stride: int = 1,
) -> float:
    """The ``amax`` of least expected squared quantize-dequantize error.

    Each bin's samples stand at its centre ``x_j = (edges[j] + edges[j + 1]) / 2``. For a
    candidate ``a > 0`` with ``Qmax = 2**(num_bits - 1) - 1`` (127) and ``s = a / Qmax``,
    symmetric quantization with round-half-away-from-zero and saturation at ``+-Qmax * s``
    maps ``x >= 0`` to ``q_a(x) = s * min(floor(x / s + 1/2), Qmax)``, and::

        MSE(a) = sum_j c_j (q_a(x_j) - x_j)**2 / sum_j c_j

    ``amax = argmin_a MSE(a)``; ties go to the later candidate (the larger ``a`` on the
    default grid). Small ``a`` pays the clipping error ``(x - Qmax s)**2`` of the tail,
    large ``a`` the rounding error (about ``s**2 / 12`` per sample).

    All candidates are evaluated together. With ``Qmax < N`` each costs ``O(Qmax log N)``:
    the bins that round to grid point ``k`` form a run found by binary search, and
    prefix sums of ``c``, ``c x`` give every run's error in closed form (see
    ``_sse_by_cells``); otherwise bin by bin, ``O(N)``.

    Args:
        counts: ``N`` bin counts of ``|x|``.
        edges: ``N + 1`` increasing edges, ``edges[0] == 0``.
        num_bits: signed integer width (>= 2).
        candidates: the ``a`` to try (1-D). ``None``: the edges ``edges[i]`` for
            ``i = start_bin, start_bin + stride, ... <= N`` (just ``edges[N]`` when
            ``N < start_bin``). Non-positive or non-finite candidates are skipped (an
            array or sequence holding only such raises; a tensor gives NaN).
        start_bin: first edge index of the default grid (>= 1).
        stride: step of the default grid.

    Returns:
        ``amax``; ``0.0`` when every count is zero.

    Raises:
        CalibrationError: (a ``ValueError``) on malformed shapes or options.
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, numbers.Integral) or num_bits < 2:
        raise CalibrationError(f"num_bits must be an integer >= 2, got {num_bits!r}")
    start = _positive_int(start_bin, "start_bin")
    step = _positive_int(stride, "stride")
    c, e = _histogram(counts, edges)
    n_bins = c.numel()
    dev = c.device
    if candidates is None:
        first = start if n_bins >= start else n_bins
        amaxes = e[first::step]  # edges[N] is tried only when the stride lands on it
    else:
        if not isinstance(candidates, torch.Tensor):
            host = np.asarray(candidates, dtype=np.float64).reshape(-1)
            if host.size == 0 or not np.any(np.isfinite(host) & (host > 0)):
                raise CalibrationError(
                    f"candidates must hold at least one positive finite amax, got {candidates!r}"
                )
        amaxes = _as_float64(candidates, dev, "candidates")
        if amaxes.numel() == 0:
            raise CalibrationError("candidates is empty")
    qmax = 2 ** (int(num_bits) - 1) - 1
    # Squared errors of values near 1e200 overflow float64: work in units of a power of
    # two near the histogram's range (exact scaling), and scale the answer back.
    top = e[-1]
    unit = torch.where(top > 0, torch.exp2(torch.ceil(torch.log2(torch.where(top > 0, top, torch.ones_like(top))))),
                       torch.ones_like(top))
    e = e / unit
    amaxes = amaxes / unit
    centres = 0.5 * (e[:-1] + e[1:])
    valid = torch.isfinite(amaxes) & (amaxes > 0)
    scales = torch.where(valid, amaxes, torch.ones_like(amaxes)) / qmax
    if qmax < n_bins:
        err = _sse_by_cells(c, centres, scales, qmax)
    else:
        err = _sse_by_bins(c, centres, scales, qmax)
    err = torch.where(valid, err, torch.full_like(err, math.inf))
    best = _last_argmin(err)
    chosen = _at(amaxes, best)
    amax = torch.where(valid.any(), chosen * unit, torch.full_like(chosen, math.nan))
    return _scalar(torch.where(c.sum() > 0, amax, torch.zeros_like(amax)))


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

STRATEGIES: Mapping[str, Callable[..., float]] = MappingProxyType(
    {
        "entropy": entropy_amax,
        "minmax": minmax_amax,
        "percentile": percentile_amax,
        "mse": mse_amax,
    }
)
"""Method name -> strategy function (read-only)."""


def compute_amax(method: str, counts: ArrayLike, edges: ArrayLike, **options: Any) -> float:
    """``STRATEGIES[method](counts, edges, **options)``.

    Args:
        method: one of ``"entropy"``, ``"minmax"``, ``"percentile"``, ``"mse"``
            (case-insensitive).
        counts: ``N`` bin counts of ``|x|``.
        edges: ``N + 1`` increasing edges.
        **options: keyword options of that strategy (e.g. ``percentile=99.99``).

    Returns:
        ``amax`` as a Python float.

    Raises:
        CalibrationError: (a ``ValueError``) for an unknown method (the message lists the
            known ones) or an option the strategy does not take.
    """
    key = method.lower() if isinstance(method, str) else method
    try:
        strategy = STRATEGIES[key]
    except (KeyError, TypeError):
        known = ", ".join(sorted(STRATEGIES))
        raise CalibrationError(f"unknown calibration method {method!r}; known methods: {known}") from None
    try:
        inspect.signature(strategy).bind(counts, edges, **options)
    except TypeError as exc:
        raise CalibrationError(f"bad options for method {key!r}: {exc}") from None
    return strategy(counts, edges, **options)
