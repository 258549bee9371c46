"""The integer arithmetic of NVDLA INT8 inference, as exact torch operations.

Design notes and the facts behind them: ``docs/nvdla.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INT8_MAX",
    "INT8_MIN",
    "INT32_MAX",
    "INT32_MIN",
    "MULTIPLIER_MAX",
    "MULTIPLIER_MIN",
    "PDP_RECIP_BITS",
    "SHIFT_MAX",
    "avgpool_q16",
    "emulator_softmax",
    "fake_quant",
    "half_round_away",
    "int8_conv2d",
    "int8_linear",
    "multiplier_shift",
    "multiplier_shift_per_channel",
    "pdp_reciprocal",
    "quantize",
    "requantize",
    "rescale_ratio",
    "round_half_away",
    "saturate",
    "saturate_int8",
    "saturate_int32",
    "shift_right_round",
]

INT8_MIN = -128
INT8_MAX = 127
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
#: The SDP converter multiplier is normalised into [2^14, 2^15) (15 significant bits of an NvS16).
MULTIPLIER_MIN = 2**14
MULTIPLIER_MAX = 2**15 - 1
#: The compiler accepts truncates in [0, 63] ("Truncate value ... out of range [0,63]").
SHIFT_MAX = 63
#: The PDP reciprocal registers hold 1/k in Q16 (``RECIP_KERNEL_WIDTH`` is 17 bits wide).
PDP_RECIP_BITS = 16
#: Kernel sizes the PDP can be programmed with (``KERNEL_WIDTH_1`` ... ``KERNEL_WIDTH_8``).
_PDP_KERNEL_MAX = 8
#: Padding the PDP can be programmed with (3-bit ``PAD_LEFT`` ... fields).
_PDP_PAD_MAX = 7
#: float64 holds every integer of magnitude <= 2^53 exactly.
_F64_EXACT = 2**53

ScaleLike = Union[float, int, Sequence[float], np.ndarray, torch.Tensor]
IntOrTensor = Union[int, Sequence[int], np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------
# Multiplier / shift
# ----------------------------------------------------------------------------------------


def _check_ratio(r: float, what: str = "r") -> float:
    """Return ``r`` as a float after checking it is finite and positive."""
    try:
        r = float(r)
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ValueError(f"rescale factor {what}={r!r} is not a number") from exc
    if not math.isfinite(r):
        raise ValueError(
            f"rescale factor {what}={r!r} is not finite: the NVDLA compiler cannot represent it "
            "(\"Couldn't converge on `2^(x) * y`\")"
        )
    if r <= 0.0:
        raise ValueError(
            f"rescale factor {what}={r!r} must be > 0: a zero or negative scale makes the NVDLA "
            "compiler fail (zero: EngineEdge.cpp error) or silently flip signs (negative)"
        )
    return r


def _as_float32(r: float) -> float:
    """Round a Python float to the nearest IEEE float32 (as the compiler's ``NvF32`` holds it)."""
    with np.errstate(over="ignore"):
        return float(np.float32(r))


def rescale_ratio(s_in: float, s_w: float, s_out: float, *, float32: bool = False) -> float:
    """The requantization ratio ``r = S_in * S_w / S_out`` of a conv / FC layer.

    A layer computes ``acc = sum(q_in * q_w)`` (int32); its real output is
    ``acc * S_in * S_w`` and its int8 output is that divided by ``S_out``, hence
    ``q_out = acc * r`` with ``r = S_in * S_w / S_out``.

    Args:
        s_in: input tensor scale (``amax_in / 127``).
        s_w: weight scale of the layer (per-kernel) or of one output channel.
        s_out: output tensor scale. In the fast-math profile a conv/FC followed by ReLU
            writes at the ReLU's scale (``COMPILER_FACTS.md``).
        float32: emulate the compiler bit for bit: every operand is an ``NvF32`` and the
            product is evaluated as ``(S_in / S_out) * S_w`` in float32
            (``SDPBiasOpNode::performPerKernelRescaling``). Default: full float64
            precision.

    Returns:
        ``r`` as a Python float.

    Raises:
        ValueError: a scale is not finite and positive.
    """
    s_in = _check_ratio(s_in, "s_in")
    s_w = _check_ratio(s_w, "s_w")
    s_out = _check_ratio(s_out, "s_out")
    if not float32:
        return s_in * s_w / s_out
    with np.errstate(over="ignore", under="ignore"):
        f = np.float32
        return float(f(f(f(s_in) / f(s_out)) * f(s_w)))


def multiplier_shift(r: float, *, float32: bool = False) -> tuple[int, int]:
    """The SDP output converter's int16 multiplier and right shift for a ratio ``r``.

    NVDLA applies a real factor ``r`` to an integer ``x`` as ``x * m >> t``
    (precision.rst, "Convertor"). The compiler normalises ``m`` to 15 significant bits:
    with ``r = f * 2^e``, ``f in [0.5, 1)`` (so ``e = floor(log2 r) + 1``, the
    compiler's ``numBits``),

        ``t = 15 - e``,   ``m = trunc(r * 2^t)``,   hence ``m in [2^14, 2^15)``.

    ``r * 2^t`` is an exact float64 product (a power-of-two scaling), so ``m`` is exact.

    Error bound: ``m <= r * 2^t < m + 1`` gives ``0 <= r - m / 2^t < 2^-t`` (the
    represented factor never exceeds ``r``), and since ``r * 2^t >= 2^14`` the relative
    error is ``(r - m / 2^t) / r < 1 / (r * 2^t) <= 2^-14``.

    Representable range: ``0 <= t <= 63`` means ``2^-49 <= r < 2^15``.

    Golden vector (``COMPILER_FACTS.md``, LeNet, per-kernel): ``r = 6.3397e-4`` gives
    ``(21272, 25)``, ``9.5563e-4`` gives ``(32065, 25)``, ``9.7107e-4`` gives
    ``(32583, 25)``, ``1.04883e-3`` gives ``(17596, 24)``.

    Differences from ``scaleAndShiftFromScalarImpl2`` (nvdla/sw): the compiler computes
    ``numBits`` with a floating ``log(r)/log(2)``, which can misround when ``r`` is an
    exact power of two and then fail with an ``m = 2^15`` overflow; here ``e`` comes from
    the exact ``math.frexp``. The compiler only *warns* for ``t`` in [32, 63] ("Truncate
    too high"); this function accepts them.

    Args:
        r: the positive rescale factor (see :func:`rescale_ratio`).
        float32: round ``r`` to float32 first, as the compiler stores it (``NvF32``).

    Returns:
        ``(m, t)`` with ``m`` in ``[2^14, 2^15)`` and ``t`` in ``[0, 63]``.

    Raises:
        ValueError: ``r`` is not finite, not positive, or needs ``t`` outside
            ``[0, 63]`` (the compiler fails with "Truncate value ... out of range
            [0,63]" or "Couldn't converge on `2^(x) * y`"). The message names ``r``.
    """
    r = _check_ratio(r)
    if float32:
        r = _check_ratio(_as_float32(r))
    _, e = math.frexp(r)  # r = f * 2**e, 0.5 <= f < 1
    t = 15 - e
    if t < 0:
        raise ValueError(
            f"rescale factor r={r!r} is too large for the NVDLA int16 multiplier: it needs a "
            f"right shift t={t} < 0 (r must be < 2^15; the compiler says \"Scale value ... is "
            "beyond dynamic range of NvS16\" / \"Couldn't converge on `2^(x) * y`\")"
        )
    if t > SHIFT_MAX:
        raise ValueError(
            f"rescale factor r={r!r} is too small for the NVDLA converter: it needs a right "
            f"shift t={t} outside [0, {SHIFT_MAX}] (r must be >= 2^-49; the compiler says "
            f"\"Truncate value {t} is out of range [0,63]\")"
        )
    m = math.trunc(math.ldexp(r, t))
    assert MULTIPLIER_MIN <= m <= MULTIPLIER_MAX, (r, m, t)
    return m, t


def multiplier_shift_per_channel(
    r: ScaleLike, *, float32: bool = False
) -> tuple[torch.Tensor, int]:
    """Per-filter requantization: one int16 multiplier per output channel, one shared shift.

    This is the compiler's per-filter scheme (``SDPBiasOpNode::performPerChannelRescaling``
    and ``factorizeScalars`` in nvdla/sw): the shift ``t`` is the one
    :func:`multiplier_shift` gives for the **largest** ``r_k``, and every channel uses
    that same ``t`` (the X1 MUL stage has a single truncate):

        ``t = multiplier_shift(max_k r_k)[1]``,   ``m_k = trunc(r_k * 2^t)``.

    So ``m_max in [2^14, 2^15)`` and the other ``m_k <= m_max`` are smaller; channel
    ``k`` has ``0 <= r_k - m_k / 2^t < 2^-t`` and relative error ``< 1 / m_k``
    (``< 2^-14`` only for channels within a factor 2 of the largest).

    A channel whose ``r_k * 2^t < 1`` would get ``m_k = 0`` (the compiler only reports
    "Scale value is 0" and carries on, zeroing the channel); this function raises
    instead, naming the channel.

    Args:
        r: the per-channel positive rescale factors ``S_in * S_w[k] / S_out``.
        float32: round each ``r_k`` to float32 first (the compiler's ``NvF32``).

    Returns:
        ``(m, t)``: ``m`` an ``int64`` CPU tensor of shape ``(K,)`` with values in
        ``[1, 2^15)``, and the shared shift ``t`` in ``[0, 63]``.

    Raises:
        ValueError: ``r`` is empty or not 1-D, some ``r_k`` is not finite and positive,
            the largest needs a shift outside ``[0, 63]``, or some ``m_k`` underflows to
            0. The message names the channel index and its ``r_k``.
    """
    if isinstance(r, torch.Tensor):
        values = r.detach().to("cpu", torch.float64).reshape(-1).tolist()
        if r.dim() > 1:
            raise ValueError(f"per-channel rescale factors must be 1-D, got shape {tuple(r.shape)}")
    else:
        arr = np.asarray(r, dtype=np.float64)
        if arr.ndim > 1:
            raise ValueError(f"per-channel rescale factors must be 1-D, got shape {arr.shape}")
        values = arr.reshape(-1).tolist()
    if not values:
        raise ValueError("per-channel rescale factors are empty")
    checked = []
    for k, rk in enumerate(values):
        rk = _check_ratio(rk, f"r[{k}]")
        if float32:
            rk = _check_ratio(_as_float32(rk), f"r[{k}]")
        checked.append(rk)
    k_max = max(range(len(checked)), key=checked.__getitem__)
    try:
        _, t = multiplier_shift(checked[k_max])
    except ValueError as exc:
        raise ValueError(f"channel {k_max} (the largest rescale factor): {exc}") from exc
    ms = []
    for k, rk in enumerate(checked):
        mk = math.trunc(math.ldexp(rk, t))
        if mk < 1:
            raise ValueError(
                f"channel {k}: rescale factor r[{k}]={rk!r} underflows to a zero multiplier with "
                f"the shared shift t={t} set by the largest factor r[{k_max}]={checked[k_max]!r} "
                f"(ratio {checked[k_max] / rk:.3g} > 2^15); the channel would be zeroed"
            )
        ms.append(mk)
    return torch.tensor(ms, dtype=torch.int64), t


# ----------------------------------------------------------------------------------------
# Rounding and saturation
# ----------------------------------------------------------------------------------------


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (NVDLA's rounding, precision.rst).

    ``round_half_away(x) = sign(x) * floor(|x| + 1/2)``, evaluated without the
    ``|x| + 0.5`` rounding trap: with ``i = trunc(x)`` and ``f = x - i`` (an exact
    floating subtraction), the result is ``i + sign(x) * [|f| >= 1/2]``.
    Examples: 0.5 -> 1, -0.5 -> -1, 1.5 -> 2, -1.5 -> -2, 2.5 -> 3.

    Args:
        x: any tensor; integer tensors are returned unchanged.

    Returns:
        A tensor of ``x``'s dtype holding integers (NaN and inf pass through).
    """
    if not torch.is_floating_point(x):
        return x
    i = torch.trunc(x)
    frac = x - i
    bump = (frac.abs() >= 0.5).to(x.dtype) * torch.sign(x)
    return i + bump


def saturate(x: torch.Tensor, lo: int | float, hi: int | float) -> torch.Tensor:
    """Clamp ``x`` to ``[lo, hi]`` keeping its dtype (NVDLA's saturation, precision.rst)."""
    if lo > hi:
        raise ValueError(f"saturate: empty range [{lo}, {hi}]")
    return torch.clamp(x, min=lo, max=hi)


def saturate_int8(x: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` to ``[-128, 127]`` keeping its dtype (cast with ``.to(torch.int8)`` after)."""
    return saturate(x, INT8_MIN, INT8_MAX)


def saturate_int32(x: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` to ``[-2^31, 2^31 - 1]`` keeping its dtype (the CACC -> SDP INT32 truncate)."""
    return saturate(x, INT32_MIN, INT32_MAX)


def _to_int64_tensor(v: IntOrTensor, device: torch.device, what: str) -> torch.Tensor:
    """Convert an int / sequence / array / tensor of integers to an int64 tensor on ``device``."""
    if isinstance(v, torch.Tensor):
        if torch.is_floating_point(v) or torch.is_complex(v):
            if not bool(torch.all(v == torch.round(v))):
                raise ValueError(f"{what} must hold integers, got non-integer values")
        return v.to(device=device, dtype=torch.int64)
    arr = np.asarray(v)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must hold integers, got {v!r}")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integers, got {v!r}")
    return torch.as_tensor(arr.astype(np.int64), device=device)


def shift_right_round(v: torch.Tensor, t: IntOrTensor) -> torch.Tensor:
    """Exact ``round_half_away(v / 2^t)`` for integer ``v`` (NVDLA's rounding right shift).

    Rounding the magnitude half up and restoring the sign rounds ties away from zero
    (precision.rst: "the rounding method used after the shift is to round half away
    from zero"): ``sign(v) * floor((|v| + 2^(t-1)) / 2^t)``. Computed in int64 without
    the addition, as ``(|v| >> t) + bit_{t-1}(|v|)`` (the dropped part is >= 1/2 exactly
    when its top bit is set), so it cannot overflow for any ``|v| < 2^63``; ``t = 0``
    returns ``v``.

    Args:
        v: integer tensor (converted to int64).
        t: non-negative shift, an int or an integer tensor broadcastable to ``v``.

    Returns:
        int64 tensor.
    """
    v = v.to(torch.int64)
    if isinstance(t, int):
        if t < 0 or t > SHIFT_MAX:
            raise ValueError(f"shift t={t} outside [0, {SHIFT_MAX}]")
        if t == 0:
            return v.clone()
        a = v.abs()
        mag = (a >> t) + ((a >> (t - 1)) & 1)
        return torch.where(v < 0, -mag, mag)
    tt = _to_int64_tensor(t, v.device, "shift t")
    if tt.numel() and (int(tt.min()) < 0 or int(tt.max()) > SHIFT_MAX):
        raise ValueError(f"shift t outside [0, {SHIFT_MAX}]")
    a = v.abs()
    bit = torch.where(tt > 0, (a >> (tt - 1).clamp(min=0)) & 1, torch.zeros_like(tt))
    mag = (a >> tt) + bit
    return torch.where(v < 0, -mag, mag)


def _channel_view(p: torch.Tensor, ndim: int, channel_dim: int, what: str, size: int) -> torch.Tensor:
    """Reshape a 1-D per-channel parameter so it broadcasts along ``channel_dim`` of an ``ndim`` tensor."""
    if p.dim() == 0:
        return p
    if p.dim() != 1:
        raise ValueError(f"{what} must be a scalar or 1-D per-channel, got shape {tuple(p.shape)}")
    if ndim == 0:
        raise ValueError(f"per-channel {what} needs a tensor with a channel dimension")
    cd = channel_dim if channel_dim >= 0 else channel_dim + ndim
    if not 0 <= cd < ndim:
        raise ValueError(f"channel_dim={channel_dim} out of range for a {ndim}-D tensor")
    if p.numel() != size and p.numel() != 1:
        raise ValueError(
            f"per-channel {what} has {p.numel()} entries but dimension {cd} has {size} channels"
        )
    return p.reshape([-1] + [1] * (ndim - cd - 1))


def requantize(
    acc: torch.Tensor,
    m: IntOrTensor,
    t: IntOrTensor,
    *,
    channel_dim: int = 1,
    offset: IntOrTensor = 0,
) -> torch.Tensor:
    """The SDP output converter: int32 accumulator -> int8, exactly.

    ``y = saturate_int8(round_half_away((sat32(acc) - offset) * m / 2^t))``
    (precision.rst, "Convertor": ``y = saturation_round((x - offset) * scaling >>
    shifter)``). The accumulator reaching the SDP is INT32-saturated (``cc_out_trunc``),
    so it is saturated to int32 here first; then with ``|acc - offset| <= 2^32`` and
    ``|m| <= 2^15`` the product is at most ``2^47`` and every step is exact int64
    arithmetic (rounding as in :func:`shift_right_round`).

    Per-kernel: scalar ``m``/``t`` from :func:`multiplier_shift`. Per-filter: a 1-D
    ``m`` (and optionally ``t``) of length ``C`` broadcast along ``channel_dim`` (the
    compiler's X1 MUL per-channel multiplier with shared truncate followed by an output
    converter with scale 1 / shift 0 gives the same int8 result, because both rounding
    and saturation are monotone).

    Args:
        acc: integer accumulator tensor (e.g. from :func:`int8_conv2d`), any device.
        m: int16 multiplier: int or 1-D per-channel integers in ``[-2^15, 2^15)``.
        t: right shift in ``[0, 63]``: int or 1-D per-channel integers.
        channel_dim: the channel dimension for per-channel ``m``/``t``/``offset``
            (1 for NCHW and (N, C); use 0 for a (C,) or (C, H, W) tensor).
        offset: converter offset (int32); the compiler programs 0.

    Returns:
        ``torch.int8`` tensor of ``acc``'s shape.

    Raises:
        ValueError: ``m`` outside the int16 range, ``t`` outside ``[0, 63]``, or a
            per-channel parameter of the wrong length.
    """
    if torch.is_floating_point(acc):
        raise ValueError("requantize expects an integer accumulator tensor, got a floating tensor")
    a = saturate_int32(acc.to(torch.int64))
    size = a.shape[channel_dim] if a.dim() else 1
    mm = _to_int64_tensor(m, a.device, "multiplier m")
    if mm.numel() and (int(mm.min()) < -(2**15) or int(mm.max()) > MULTIPLIER_MAX):
        raise ValueError("multiplier m outside the int16 range [-32768, 32767]")
    mm = _channel_view(mm, a.dim(), channel_dim, "multiplier m", size)
    oo = _channel_view(_to_int64_tensor(offset, a.device, "offset"), a.dim(), channel_dim, "offset", size)
    if isinstance(t, int):
        tt: IntOrTensor = t
    else:
        tt = _channel_view(_to_int64_tensor(t, a.device, "shift t"), a.dim(), channel_dim, "shift t", size)
        if tt.dim() == 0:
            tt = int(tt)
    y = shift_right_round((a - oo) * mm, tt)
    return saturate_int8(y).to(torch.int8)


# ----------------------------------------------------------------------------------------
# Exact integer convolution / linear
# ----------------------------------------------------------------------------------------


def _int_operand(x: torch.Tensor, what: str, lo: int, hi: int) -> torch.Tensor:
    """Check ``x`` holds integers in ``[lo, hi]`` and return it as float64 (exact)."""
    if torch.is_complex(x):
        raise ValueError(f"{what} must be real")
    x64 = x.to(torch.float64)
    if x64.numel():
        if torch.is_floating_point(x) and not bool(torch.all(x64 == torch.trunc(x64))):
            raise ValueError(f"{what} must hold integer values (int8-quantized), got fractions or NaN")
        mn, mx = float(x64.min()), float(x64.max())
        if mn < lo or mx > hi:
            raise ValueError(f"{what} values must lie in [{lo}, {hi}], got [{mn:g}, {mx:g}]")
    return x64


def _finish_accumulator(acc64: torch.Tensor, bias_i32: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """Add an int32 bias along ``channel_dim`` to a float64 exact sum, saturate to int32, return int64."""
    acc = acc64.to(torch.int64)
    if bias_i32 is not None:
        b = bias_i32
        if torch.is_floating_point(b):
            b = _int_operand(b, "bias_i32", INT32_MIN, INT32_MAX)
        b = b.to(device=acc.device, dtype=torch.int64)
        if b.numel() and (int(b.min()) < INT32_MIN or int(b.max()) > INT32_MAX):
            raise ValueError("bias_i32 values must lie in the int32 range")
        if b.dim() != 1 or b.numel() != acc.shape[channel_dim]:
            raise ValueError(
                f"bias_i32 must be 1-D with {acc.shape[channel_dim]} entries, got shape {tuple(b.shape)}"
            )
        acc = acc + b.reshape([-1] + [1] * (acc.dim() - channel_dim - 1))
    return saturate_int32(acc)


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    """Normalise an int or a pair of ints."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


def int8_conv2d(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    bias_i32: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Exact int8 x int8 2-D convolution with int32 bias and INT32 saturation.

    ``acc[n,k,y,x] = sat32(sum_{c,i,j} x_q[n,c,...] * w_q[k,c,i,j] + bias_i32[k])``,
    zero padding (NVDLA CC with ``PADDING_VALUE = 0`` for symmetric data).

    Exactness: the sum is evaluated as a float64 convolution of the integer-valued
    operands. Every product satisfies ``|x * w| <= 128 * 128 = 2^14``, so any partial
    sum of the ``K = C/groups * kh * kw`` products of one output is an integer of
    magnitude ``<= K * 2^14``. For ``K < 2^39`` this is below ``2^53``, every such
    integer is a float64, and every floating addition of two of them is exact — whatever
    order or blocking the backend uses (a plain GEMM/direct algorithm; on CUDA cuDNN is
    disabled for the call so no FFT/Winograd transform, which would be inexact, can be
    chosen). The bias is added in int64 afterwards and the result saturated to int32
    (the compiler adds the bias in the SDP after the CACC's INT32 truncate; the two
    orders differ only when the bare sum already overflows int32).

    Args:
        x_q: input ``(N, C, H, W)`` of int8 values (any dtype holding integers in
            [-128, 127]).
        w_q: weights ``(K, C/groups, kh, kw)`` of int8 values.
        bias_i32: optional ``(K,)`` int32 bias in accumulator units
            (``b / (S_in * S_w)``, see ``_weights.quantize_bias``).
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d``.

    Returns:
        ``int64`` tensor ``(N, K, H', W')`` with values in the int32 range.

    Raises:
        ValueError: operands outside the int8 range or not integer, or ``K >= 2^39``.
    """
    if x_q.dim() != 4 or w_q.dim() != 4:
        raise ValueError(
            f"int8_conv2d expects 4-D x_q and w_q, got {tuple(x_q.shape)} and {tuple(w_q.shape)}"
        )
    k_terms = w_q.shape[1] * w_q.shape[2] * w_q.shape[3]
    if k_terms * 2**14 >= _F64_EXACT:
        raise ValueError(f"reduction length {k_terms} too long for an exact float64 sum (needs < 2^39)")
    x64 = _int_operand(x_q, "x_q", INT8_MIN, INT8_MAX)
    w64 = _int_operand(w_q, "w_q", INT8_MIN, INT8_MAX).to(x64.device)
    args = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups)
    if x64.is_cuda:
        # Only the cuDNN switch is touched (not torch.backends.cudnn.flags(), which also resets
        # TF32/benchmark/determinism settings for the duration).
        prev = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            acc = F.conv2d(x64, w64, None, *args)
        finally:
            torch.backends.cudnn.enabled = prev
    else:
        acc = F.conv2d(x64, w64, None, *args)
    return _finish_accumulator(acc, bias_i32, channel_dim=1)


def int8_linear(x_q: torch.Tensor, w_q: torch.Tensor, bias_i32: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int8 x int8 fully-connected layer with int32 bias and INT32 saturation.

    ``acc[..., k] = sat32(sum_c x_q[..., c] * w_q[k, c] + bias_i32[k])``. NVDLA runs an
    InnerProduct as a convolution whose kernel covers the whole input, so this is the
    same arithmetic as :func:`int8_conv2d`; exact by the same float64 argument
    (``K = in_features < 2^39``).

    Args:
        x_q: input ``(..., in_features)`` of int8 values.
        w_q: weights ``(out_features, in_features)`` of int8 values.
        bias_i32: optional ``(out_features,)`` int32 bias in accumulator units.

    Returns:
        ``int64`` tensor ``(..., out_features)`` with values in the int32 range.
    """
    if w_q.dim() != 2:
        raise ValueError(f"int8_linear expects 2-D w_q, got shape {tuple(w_q.shape)}")
    if w_q.shape[1] * 2**14 >= _F64_EXACT:
        raise ValueError(f"reduction length {w_q.shape[1]} too long for an exact float64 sum")
    x64 = _int_operand(x_q, "x_q", INT8_MIN, INT8_MAX)
    w64 = _int_operand(w_q, "w_q", INT8_MIN, INT8_MAX).to(x64.device)
    acc = F.linear(x64, w64)
    return _finish_accumulator(acc, bias_i32, channel_dim=acc.dim() - 1)


# ----------------------------------------------------------------------------------------
# Average pooling (PDP)
# ----------------------------------------------------------------------------------------


def pdp_reciprocal(k: int) -> int:
    """The PDP's Q16 reciprocal of a kernel size: ``floor(2^16 / k)``.

    These are the values the NVDLA firmware programs into ``D_RECIP_KERNEL_WIDTH`` /
    ``D_RECIP_KERNEL_HEIGHT`` for INT8/INT16 (``recip_kernel_size`` in nvdla/sw
    ``kmd/firmware/pdp.c``: 0x10000, 0x8000, 0x5555, 0x4000, 0x3333, 0x2aaa, 0x2492,
    0x2000 for k = 1..8 — truncated, e.g. 2^16/6 = 10922.67 -> 0x2aaa = 10922).

    Raises:
        ValueError: ``k`` outside ``[1, 8]`` (the PDP kernel size range).
    """
    if not isinstance(k, int) or not 1 <= k <= _PDP_KERNEL_MAX:
        raise ValueError(f"PDP kernel size {k!r} outside [1, {_PDP_KERNEL_MAX}]")
    return (1 << PDP_RECIP_BITS) // k


def avgpool_q16(
    x_q: torch.Tensor,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """INT8 average pooling exactly as the NVDLA PDP computes it; no rescale.

    With ``S`` the window sum (padded positions contribute 0, i.e. zero
    ``PADDING_VALUE_*`` registers; an offset-free symmetric encoding has its zero at 0)
    and ``R_w = floor(2^16 / kw)``, ``R_h = floor(2^16 / kh)`` (:func:`pdp_reciprocal`),
    the cmod (``NV_NVDLA_pdp::PoolingStage1Calc``) computes two
    roundings, width first:

        ``u = round_half_away(S * R_w / 2^16)``,   ``y = round_half_away(u * R_h / 2^16)``,

    then saturates to int8 (never active: ``R_w / 2^16 <= 1 / kw`` keeps ``u`` within
    ``kh`` times the int8 range and ``y`` within ``[-128, 127]``). The divisor is always
    the full kernel area, also for windows that cover padding (the reciprocal registers
    are fixed per layer). The output keeps the input's scale: the PDP has no rescaler,
    so the next layer must read it at the producer's scale (``COMPILER_FACTS.md``).

    Because of the double rounding (and the truncated reciprocals for k = 3, 5, 6, 7),
    the result can differ from ``round_half_away(S / (kh*kw))``: a 2x2 window with
    ``S = -509`` (mean -127.25) gives ``u = round(-254.5) = -255`` and
    ``y = round(-127.5) = -128``, not -127. That is the hardware's behaviour.

    Args:
        x_q: ``(N, C, H, W)`` or ``(C, H, W)`` int8 values.
        kernel: ``k`` or ``(kh, kw)``, each in ``[1, 8]``.
        stride: ``s`` or ``(sh, sw)``; default the kernel.
        padding: ``p`` or ``(ph, pw)``, each in ``[0, 7]``, applied on both sides.
        ceil_mode: Caffe-style output size ``ceil((H + 2p - k) / s) + 1``.

    Returns:
        ``torch.int8`` tensor.
    """
    kh, kw = _pair(kernel, "kernel")
    rh, rw = pdp_reciprocal(kh), pdp_reciprocal(kw)
    sh, sw = _pair(stride, "stride") if stride is not None else (kh, kw)
    ph, pw = _pair(padding, "padding")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    if not (0 <= ph <= _PDP_PAD_MAX and 0 <= pw <= _PDP_PAD_MAX):
        raise ValueError(f"PDP padding {(ph, pw)} outside [0, {_PDP_PAD_MAX}]")
    squeeze = x_q.dim() == 3
    if x_q.dim() not in (3, 4):
        raise ValueError(f"avgpool_q16 expects (N, C, H, W) or (C, H, W), got {tuple(x_q.shape)}")
    x64 = _int_operand(x_q, "x_q", INT8_MIN, INT8_MAX)
    if squeeze:
        x64 = x64.unsqueeze(0)
    if ph or pw:
        x64 = F.pad(x64, (pw, pw, ph, ph))
    # Sum of at most 64 int8 values: exact in float64 in any order.
    s = F.avg_pool2d(
        x64, (kh, kw), (sh, sw), 0, ceil_mode=ceil_mode, count_include_pad=True, divisor_override=1
    )
    s = s.to(torch.int64)
    u = shift_right_round(s * rw, PDP_RECIP_BITS)
    y = shift_right_round(u * rh, PDP_RECIP_BITS)
    y = saturate_int8(y).to(torch.int8)
    return y.squeeze(0) if squeeze else y


# ----------------------------------------------------------------------------------------
# Quantize / fake-quantize
# ----------------------------------------------------------------------------------------


def _scale_tensor(scale: ScaleLike, x: torch.Tensor, axis: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Validate ``scale`` (positive, finite) and shape it to broadcast against ``x`` along ``axis``."""
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to(device=x.device, dtype=dtype)
    else:
        s = torch.as_tensor(np.asarray(scale, dtype=np.float64), dtype=dtype, device=x.device)
    if s.numel() == 0:
        raise ValueError("scale is empty")
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError(f"scale must be finite and > 0, got {s.detach().cpu().tolist()}")
    if s.numel() == 1:
        return s.reshape(())
    if s.dim() != 1:
        raise ValueError(f"per-channel scale must be 1-D, got shape {tuple(s.shape)}")
    if axis is None:
        raise ValueError(f"a per-channel scale of {s.numel()} entries needs axis=")
    ax = axis if axis >= 0 else axis + x.dim()
    if not 0 <= ax < x.dim():
        raise ValueError(f"axis={axis} out of range for a {x.dim()}-D tensor")
    if x.shape[ax] != s.numel():
        raise ValueError(f"per-channel scale has {s.numel()} entries but axis {ax} has {x.shape[ax]}")
    return s.reshape([-1] + [1] * (x.dim() - ax - 1))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (half, bfloat16, float32, ints) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _quantize_float(x: torch.Tensor, scale: ScaleLike, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``clamp(round_half_away(x / scale), -128, 127)`` in the compute dtype, plus the shaped scale."""
    cd = _compute_dtype(x)
    xc = x.to(cd)
    s = _scale_tensor(scale, xc, axis, cd)
    q = saturate_int8(round_half_away(xc / s))
    return q, s


def quantize(x: torch.Tensor, scale: ScaleLike, *, axis: int | None = None) -> torch.Tensor:
    """Symmetric int8 quantization: ``q = clamp(round_half_away(x / scale), -128, 127)``.

    The rounding is NVDLA's "round half away from zero" (precision.rst, the converter
    that turns an image into INT8). The saturation range is the full two's-complement
    ``[-128, 127]``: NVDLA's saturation "depends on the number of output bits", so every
    converter output, the requantized data included, may be -128; only the *scale*
    is symmetric (``amax / 127``). Values beyond ``±amax`` saturate; ``±inf`` saturate too.

    Computed in float32 for float16 / bfloat16 / float32 inputs (float64 stays float64),
    as ``x / scale`` (a true division, not a multiplication by ``1/scale``).

    Args:
        x: real tensor, any device.
        scale: positive finite scale: a float, or a 1-D per-channel tensor/sequence
            broadcast along ``axis``.
        axis: the channel axis of a per-channel ``scale``.

    Returns:
        ``torch.int8`` tensor of ``x``'s shape.

    Raises:
        ValueError: ``x`` holds NaN, or ``scale`` is not finite and positive or does not
            match ``x`` along ``axis``.
    """
    q, _ = _quantize_float(x, scale, axis)
    if bool(torch.isnan(q).any()):
        raise ValueError("quantize: the input contains NaN, which has no int8 representation")
    return q.to(torch.int8)


def fake_quant(x: torch.Tensor, scale: ScaleLike, *, axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize: ``clamp(round_half_away(x / scale), -128, 127) * scale``.

    The real value an NVDLA int8 tensor actually carries. Inside the range
    (``|x| <= 127.5 * scale``) the error is at most ``scale / 2`` (up to float rounding
    of the compute dtype). Computed in float32 for float16 / bfloat16 / float32 inputs
    (float64 stays float64), returned in ``x``'s dtype; NaN propagates. No gradient
    rule is defined (rounding has zero gradient almost everywhere).

    Args:
        x: real tensor, any device.
        scale: positive finite scale, scalar or 1-D per-channel along ``axis``.
        axis: the channel axis of a per-channel ``scale``.

    Returns:
        Tensor of ``x``'s dtype and shape.
    """
    q, s = _quantize_float(x, scale, axis)
    return (q * s).to(x.dtype)


def half_round_away(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to IEEE half precision as the NVDLA runtime's ``half.h`` does:
    to nearest, ties *away from zero* (``HALF_ROUND_TIES_TO_EVEN 0``); returned as float32.

    ``Tensor.half()`` breaks ties to even; where ``x`` lies exactly halfway between two
    halves and that choice went toward zero, the result steps one half-ulp away from zero
    (the spacing above ``|h|``: ``2**(floor(log2 |h|) - 10)``, ``2**-24`` among subnormals).
    """
    x = x.to(torch.float32)
    h = x.half().float()
    mag = h.abs()
    exponent = torch.floor(torch.log2(torch.where(mag > 0, mag, torch.full_like(mag, 2.0**-24))))
    ulp = torch.exp2(torch.clamp(exponent, min=-14.0) - 10.0)
    tie = ((x - h).abs() == ulp / 2) & (mag < x.abs()) & torch.isfinite(h)
    return torch.where(tie, h + torch.sign(x) * ulp, h)


def emulator_softmax(q: torch.Tensor, s_in: float, s_out: float) -> torch.Tensor:
    """The INT8 softmax of the NVDLA runtime's CPU emulator (``Emulator.cpp``), per row.

    For each row of ``q`` (``N x C`` int8 values): ``h_i = half(q_i * S_in)`` (a float32
    product, :func:`half_round_away`); ``m = max_i h_i``; ``e_i = expf(h_i - m)`` in
    float32, summed in channel order into a float32 ``sum``; ``p_i = half(e_i / sum)``; the
    output ``int8(clamp(p_i / S_out, -128, 127))`` truncates toward zero. ``expf`` is taken
    as correctly rounded (a float64 ``exp`` rounded to float32). ``S_in`` / ``S_out`` are
    the float32 scales of the input and output tensors.

    Returns:
        The output integers, as float32.
    """
    s_in32 = torch.tensor(s_in, dtype=torch.float32, device=q.device)
    s_out32 = torch.tensor(s_out, dtype=torch.float32, device=q.device)
    h = half_round_away(q.to(torch.float32) * s_in32)
    e = torch.exp((h - h.amax(dim=1, keepdim=True)).double()).float()
    total = torch.zeros_like(e[:, 0])
    for i in range(e.shape[1]):  # float32 additions in channel order, as the emulator's loop
        total = total + e[:, i]
    p = half_round_away(e / total[:, None])
    return torch.trunc(torch.clamp(p / s_out32, float(INT8_MIN), float(INT8_MAX)))
