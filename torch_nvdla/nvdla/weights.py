"""Weight and bias quantization exactly as the NVDLA compiler does it, plus BatchNorm folding.

Design notes and the facts behind them: ``docs/nvdla.md``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ..utils.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "AMAX_NEGLIGIBLE",
    "BIAS_LEFT_SHIFT_MAX",
    "QUANT_MODES",
    "QuantizedWeight",
    "bias_int16_shift",
    "fold_batchnorm",
    "quantize_bias",
    "quantize_weight",
    "save_quantized_weights",
]

#: The two weight quantization modes of the compiler (``nvdla::QuantizationMode``).
QUANT_MODES = ("per-kernel", "per-filter")
#: A filter whose ``max|W|`` is below this (2^-100) is treated as all-zero (see quantize_weight).
AMAX_NEGLIGIBLE = 2.0**-100
#: ``SDP_LEFT_SHIFT_MAX_PLACES`` of the nvdla/sw compiler.
BIAS_LEFT_SHIFT_MAX = 16

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

ScaleLike = Union[float, torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight tensor quantized the compiler's way.

    Attributes:
        q: ``torch.int8`` tensor, the weight's shape, ``W ~= q * scale`` (per output
            channel along dim 0 in per-filter mode).
        scale: ``torch.float32`` weight scale ``S_w = amax / 127``: a 0-d tensor
            (per-kernel) or shape ``(K,)`` (per-filter, ``K = W.shape[0]``).
        max_abs_error: ``max |W - q * S_w|`` over the tensor (float64 of the float32
            weights), a Python float.
        mode: ``"per-kernel"`` or ``"per-filter"``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    max_abs_error: float
    mode: str


def _norm_mode(mode: str) -> str:
    """Canonicalise a mode name (``per_kernel`` / ``PER-FILTER`` are accepted)."""
    m = str(mode).strip().lower().replace("_", "-")
    if m not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is not one of {QUANT_MODES}")
    return m


def _who(name: str | None) -> str:
    """A message prefix naming the layer when known."""
    return f"layer {name!r}: " if name else ""


def quantize_weight(w: torch.Tensor, weights: str = "per-kernel", *, name: str | None = None) -> QuantizedWeight:
    """Quantize a conv / FC weight to int8 with the NVDLA compiler's formula.

    Bit-exact emulation of ``WeightTrns::perKernelQuantizeWts`` /
    ``perFilterQuantizeWts`` (nvdla/sw), all in IEEE float32 like the compiler's
    ``NvF32``:

        ``amax = max |W|`` (whole tensor, or per output channel ``k = W[k]``),
        ``S_w = amax / 127``,   ``inv = 1 / S_w``,
        ``q = clamp(floor(W * inv + 0.5), -128, 127)``.

    Note ``floor(x + 0.5)`` — ties go **up**, not away from zero: ``W / S_w = -2.5``
    gives ``-2`` and ``2.5`` gives ``3`` (unlike the data path's round-half-away); and
    ``W`` is multiplied by the float32 reciprocal, not divided by ``S_w``, which the
    compiler does and which can move a value sitting on a tie by one ulp.

    Zero filters (decision; the compiler would divide by zero, ``0 * inf = NaN``, and
    cast NaN to int8): a filter with ``amax < 2^-100`` (:data:`AMAX_NEGLIGIBLE`) takes
    the **layer's** ``amax`` instead, so its weights quantize to 0 (or nearly) and its
    scale stays in the layer's range (the per-filter requantization multiplier and bias
    stay representable); if the whole layer is below that floor, ``amax = 1`` is used
    (``S_w = 1/127``). The scale is therefore always positive and finite.

    Args:
        w: weight ``(K, ...)`` (conv ``(K, C/g, kh, kw)``, FC ``(K, C)``), any float
            dtype and device; it is rounded to float32 first (the compiler reads
            float32 blobs).
        weights: ``"per-kernel"`` (one scale for the layer, the compiler's default) or
            ``"per-filter"`` (one scale per output channel, dim 0).
        name: the layer name, used in error messages.

    Returns:
        A :class:`QuantizedWeight` on ``w``'s device.

    Raises:
        ValueError: unknown granularity, empty or 0-d weight, or non-finite weights (the
            message names the layer and counts the bad values).
    """
    mode = _norm_mode(weights)
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(np.asarray(w))
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(
            f"{_who(name)}weight must be a non-empty tensor with an output-channel dim, "
            f"got shape {tuple(w.shape)}"
        )
    w32 = w.detach().to(torch.float32)
    bad = int((~torch.isfinite(w32)).sum())
    if bad:
        raise ValueError(f"{_who(name)}weight has {bad} non-finite value(s) (NaN/inf); cannot quantize")
    absw = w32.abs()
    layer_amax = absw.max()
    layer_amax = torch.where(layer_amax < AMAX_NEGLIGIBLE, torch.ones_like(layer_amax), layer_amax)
    if mode == "per-kernel":
        amax = layer_amax
        view = amax
    else:
        amax = absw.reshape(w32.shape[0], -1).amax(dim=1)
        amax = torch.where(amax < AMAX_NEGLIGIBLE, layer_amax.expand_as(amax), amax)
        view = amax.reshape([-1] + [1] * (w32.dim() - 1))
    scale = amax / torch.tensor(127.0, dtype=torch.float32, device=amax.device)
    view_scale = view / torch.tensor(127.0, dtype=torch.float32, device=amax.device)
    inv = torch.tensor(1.0, dtype=torch.float32, device=amax.device) / view_scale
    prod = w32 * inv  # float32 product, rounded
    q = torch.floor(prod + torch.tensor(0.5, dtype=torch.float32, device=prod.device))
    q = torch.clamp(q, -128, 127)
    err = (w32.to(torch.float64) - q.to(torch.float64) * view_scale.to(torch.float64)).abs().max()
    return QuantizedWeight(q=q.to(torch.int8), scale=scale, max_abs_error=float(err), mode=mode)


def _positive_scale(s: Any, what: str, name: str | None) -> torch.Tensor:
    """A float32 tensor of positive finite scale(s)."""
    if isinstance(s, torch.Tensor):
        t = s.detach().to(torch.float32)
    else:
        t = torch.as_tensor(np.asarray(s, dtype=np.float32))
    if t.numel() == 0:
        raise ValueError(f"{_who(name)}{what} is empty")
    if not bool(torch.all(torch.isfinite(t) & (t > 0))):
        raise ValueError(f"{_who(name)}{what} must be finite and > 0, got {t.cpu().reshape(-1).tolist()[:8]}")
    return t


def quantize_bias(
    b: torch.Tensor, s_in: ScaleLike, s_w: ScaleLike, *, name: str | None = None
) -> torch.Tensor:
    """Quantize a bias to int32 accumulator units with the compiler's formula.

    The accumulator ``sum(q_in * q_w)`` has real value ``acc * S_in * S_w[k]``, so the
    bias joins it as

        ``b_q[k] = sat32(floor(b[k] / (S_in * S_w[k]) + 0.5))``

    evaluated in float32 like ``SDPBiasOpNode::scaleBiasToInt16`` (nvdla/sw):
    ``S_in * S_w[k]`` and the division are float32 operations and ties go up
    (``floor(x + 0.5)``). Saturation to int32 replaces the compiler's undefined
    float-to-int cast on overflow. The SDP stores the result as int16 plus a left
    shift; see :func:`bias_int16_shift` for that step.

    Args:
        b: bias ``(K,)``, any float dtype / device.
        s_in: input tensor scale (positive float).
        s_w: weight scale: a float / 0-d tensor (per-kernel) or ``(K,)`` (per-filter),
            e.g. ``quantize_weight(...).scale``.
        name: the layer name, used in error messages.

    Returns:
        ``torch.int32`` tensor ``(K,)`` on ``b``'s device.

    Raises:
        ValueError: non-finite bias, non-positive / non-finite scales, a per-filter
            ``s_w`` whose length differs from the bias, or ``S_in * S_w`` underflowing
            float32 to 0.
    """
    if not isinstance(b, torch.Tensor):
        b = torch.as_tensor(np.asarray(b))
    b32 = b.detach().to(torch.float32).reshape(-1)
    bad = int((~torch.isfinite(b32)).sum())
    if bad:
        raise ValueError(f"{_who(name)}bias has {bad} non-finite value(s) (NaN/inf); cannot quantize")
    si = _positive_scale(s_in, "input scale s_in", name)
    if si.numel() != 1:
        raise ValueError(
            f"{_who(name)}input scale s_in must be a scalar (per-tensor), got {si.numel()} values"
        )
    sw = _positive_scale(s_w, "weight scale s_w", name).reshape(-1)
    if sw.numel() not in (1, b32.numel()):
        raise ValueError(
            f"{_who(name)}per-filter weight scale has {sw.numel()} entries "
            f"but the bias has {b32.numel()}"
        )
    denom = si.reshape(()).to(b32.device) * sw.to(b32.device)  # float32 product
    if not bool(torch.all(denom > 0)):
        raise ValueError(f"{_who(name)}S_in * S_w underflows float32 to 0; the bias cannot be expressed")
    x = b32 / denom
    y = torch.floor(x + torch.tensor(0.5, dtype=torch.float32, device=x.device))
    y = torch.clamp(y.to(torch.float64), _INT32_MIN, _INT32_MAX)
    return y.to(torch.int32)


def bias_int16_shift(bias_q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Split an int32 bias into the SDP's int16 values and one common left shift.

    The compiler (``SDPBiasOpNode::scaleBiasToInt16``) stores the bias as int16 and
    programs a left shift so that the SDP adds ``b16 << shift`` (precision.rst,
    "Shifter"): ``shift`` is the smallest value in ``[0, 16]`` for which every
    ``b16[k] = b_q[k] >> shift`` (arithmetic shift = floor division, *not* rounding)
    fits int16. The effective bias is ``b16 * 2^shift = floor(b_q / 2^shift) * 2^shift``.

    This equals the compiler's ``max(0, ceil(log2 |b_max|) + 1 - 16)`` except when the
    largest positive bias is an exact power of two ``>= 2^15``, where the compiler's
    value is one too small and its int16 cast wraps to -32768; here the shift is bumped.
    An all-zero bias gets the compiler's shift for it, the largest (its ``log2(0)``).

    Args:
        bias_q: integer bias (int32 range), e.g. from :func:`quantize_bias`.

    Returns:
        ``(b16, shift)``: a ``torch.int16`` tensor on the input's device and an int.
    """
    b = bias_q.to(torch.int64)
    if b.numel() == 0:
        return b.to(torch.int16), 0
    lo, hi = int(b.min()), int(b.max())
    if lo < _INT32_MIN or hi > _INT32_MAX:
        raise ValueError("bias_q values must lie in the int32 range")
    if lo == hi == 0:
        # log2(0) = -inf in the compiler's formula ends at the largest shift: zeros either way.
        return b.to(torch.int16), BIAS_LEFT_SHIFT_MAX
    shift = 0
    while shift < BIAS_LEFT_SHIFT_MAX and ((hi >> shift) > 32767 or (lo >> shift) < -32768):
        shift += 1
    return (b >> shift).to(torch.int16), shift


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference BatchNorm (and an optional Scale / affine) into the preceding conv / FC.

    With ``a[k] = gamma[k] / sqrt(var[k] + eps)``:

        ``W'[k] = W[k] * a[k]``,   ``b'[k] = (b[k] - mean[k]) * a[k] + beta[k]``,

    so that ``conv(x, W') + b' == gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta``
    exactly in real arithmetic. This is what the compiler's fast-math profile does
    (``ConvCoreNode::tryToMergeWithBatchNormOp`` / ``tryToMergeWithScaleOp`` in nvdla/sw
    merge the BN/Scale factors into the kernel weights and a bias), so the weight scale
    ``max|W'| / 127`` must be taken **after** folding. Caffe's ``BatchNorm`` stores
    mean/var multiplied by a moving-average factor (its third blob): divide by it before
    calling. Computed in float64; returned in ``weight``'s dtype.

    Args:
        weight: ``(K, ...)`` conv or FC weight.
        bias: ``(K,)`` or ``None`` (zero).
        bn_mean, bn_var: ``(K,)`` running statistics.
        bn_eps: the BatchNorm epsilon (>= 0).
        gamma: ``(K,)`` scale (Caffe ``Scale`` layer / PyTorch ``weight``); ``None`` = 1.
        beta: ``(K,)`` shift (Caffe ``Scale`` bias / PyTorch ``bias``); ``None`` = 0.

    Returns:
        ``(W', b')``.

    Raises:
        ValueError: shape mismatch, non-finite inputs, or ``var + eps <= 0``.
    """
    if weight.dim() < 1:
        raise ValueError("fold_batchnorm: weight must have an output-channel dimension")
    k = weight.shape[0]
    dev = weight.device

    def vec(v: torch.Tensor | None, what: str, default: float) -> torch.Tensor:
        """A float64 ``(K,)`` copy of ``v`` (or ``default`` everywhere when ``v`` is None)."""
        if v is None:
            return torch.full((k,), default, dtype=torch.float64, device=dev)
        t = torch.as_tensor(v).detach().to(device=dev, dtype=torch.float64).reshape(-1)
        if t.numel() != k:
            raise ValueError(f"fold_batchnorm: {what} has {t.numel()} entries, expected {k}")
        if not bool(torch.all(torch.isfinite(t))):
            raise ValueError(f"fold_batchnorm: {what} has non-finite values")
        return t

    mean = vec(bn_mean, "bn_mean", 0.0)
    var = vec(bn_var, "bn_var", 0.0)
    g = vec(gamma, "gamma", 1.0)
    bt = vec(beta, "beta", 0.0)
    b = vec(bias, "bias", 0.0)
    eps = float(bn_eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"fold_batchnorm: bn_eps={bn_eps!r} must be finite and >= 0")
    denom = var + eps
    if not bool(torch.all(denom > 0)):
        bad = torch.nonzero(denom <= 0).reshape(-1)[:8].tolist()
        raise ValueError(f"fold_batchnorm: var + eps <= 0 for channel(s) {bad}")
    a = g / torch.sqrt(denom)
    w64 = weight.detach().to(torch.float64)
    w_f = w64 * a.reshape([-1] + [1] * (weight.dim() - 1))
    b_f = (b - mean) * a + bt
    out_dtype = weight.dtype if torch.is_floating_point(weight) else torch.float32
    return w_f.to(out_dtype), b_f.to(out_dtype)


def save_quantized_weights(
    path_npz: str | os.PathLike,
    summary_json_path: str | os.PathLike,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor | None, float]],
    weights: str = "per-kernel",
) -> list[dict[str, Any]]:
    """Quantize every layer and write the int8 weights, scales and int32 biases.

    For each ``name -> (weight, bias, s_in)``: ``quantize_weight(weight, weights)`` and
    ``quantize_bias(bias, s_in, S_w)``. The ``.npz`` holds, per layer,
    ``<name>.weight_q`` (int8, the weight's shape), ``<name>.weight_scale`` (float32,
    0-d for per-kernel or ``(K,)`` for per-filter) and ``<name>.bias_q`` (int32 ``(K,)``;
    zeros when the layer has no bias). The JSON summary is a list with one object per
    layer: ``layer``, ``mode``, ``shape``, ``s_in``, ``scales`` (a number for per-kernel,
    a list for per-filter), ``max_abs_error``, ``has_bias``. Both files are written
    atomically (``torch_nvdla.utils.io``), the ``.npz`` first.

    Args:
        path_npz: output ``.npz`` path (written exactly there; no suffix is added).
        summary_json_path: output JSON path.
        layers: ordered mapping of layer name to ``(weight, bias or None, s_in)``.
        weights: ``"per-kernel"`` or ``"per-filter"``.

    Returns:
        The summary list that was written.

    Raises:
        ValueError: no layers, a bad entry, or a layer that cannot be quantized; the
            message names the layer.
    """
    mode = _norm_mode(weights)
    if not layers:
        raise ValueError("save_quantized_weights: no layers given")
    arrays: dict[str, np.ndarray] = {}
    summary: list[dict[str, Any]] = []
    for name, entry in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layer name {name!r} must be a non-empty string")
        try:
            weight, bias, s_in = entry
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"layer {name!r}: expected (weight, bias, s_in), got {type(entry).__name__}"
            ) from exc
        try:
            s_in_f = float(s_in)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"layer {name!r}: input scale s_in={s_in!r} is not a number") from exc
        if not (math.isfinite(s_in_f) and s_in_f > 0):
            raise ValueError(f"layer {name!r}: input scale s_in={s_in!r} must be finite and > 0")
        qw = quantize_weight(weight, mode, name=name)
        k = qw.q.shape[0]
        if bias is not None:
            bq = quantize_bias(bias, s_in_f, qw.scale, name=name)
            if bq.numel() != k:
                raise ValueError(
                    f"layer {name!r}: bias has {bq.numel()} entries, weight has {k} output channels"
                )
        else:
            bq = torch.zeros(k, dtype=torch.int32)
        scale_np = qw.scale.detach().cpu().numpy().astype(np.float32)
        arrays[f"{name}.weight_q"] = qw.q.detach().cpu().numpy().astype(np.int8)
        arrays[f"{name}.weight_scale"] = scale_np
        arrays[f"{name}.bias_q"] = bq.detach().cpu().numpy().astype(np.int32)
        summary.append(
            {
                "layer": name,
                "mode": mode,
                "shape": list(qw.q.shape),
                "s_in": s_in_f,
                "scales": float(scale_np) if scale_np.ndim == 0 else [float(v) for v in scale_np],
                "max_abs_error": qw.max_abs_error,
                "has_bias": bias is not None,
            }
        )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path_npz, buf.getvalue())
    atomic_write_json(summary_json_path, summary)
    return summary
