"""Blob shapes of a Caffe deploy net, inferred from its layer parameters (no weights).

Design notes: ``docs/caffe.md``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .prototxt import CaffeNet, CaffeLayer, is_test_phase

__all__ = ["blob_shapes", "caffe_pool_output_size"]

# Layers whose top has the shape of their (first) bottom.
_SAME_SHAPE = frozenset({
    "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Clip",
    "BatchNorm", "Scale", "Bias", "LRN", "Dropout", "Softmax", "Eltwise", "MVN", "Threshold",
})


def caffe_pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True) -> int:
    """Caffe's pooled output size along one axis.

    ``ceil((size + 2 pad - kernel) / stride) + 1`` (``floor`` for ``round_mode: FLOOR``);
    then, when ``pad > 0`` and the last window would start in the padding
    (``(out - 1) * stride >= size + pad``), that window is dropped. The NVDLA compiler's
    Caffe parser (``CaffeParserPoolingDimsCallback``) uses the same rule.
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pair(p, single: str, h: str, w: str, default: int) -> tuple[int, int]:
    values = [int(v) for v in p.get_all(single)] if single in p else []
    vh = int(p.get(h, values[0] if values else default))
    vw = int(p.get(w, values[-1] if values else default))
    return vh, vw


def _conv_shape(layer: CaffeLayer, shape: tuple[int, ...], transposed: bool) -> tuple[int, ...] | None:
    p = layer.type_params
    if len(shape) != 4 or "num_output" not in p:
        return None
    kh, kw = _pair(p, "kernel_size", "kernel_h", "kernel_w", 0)
    sh, sw = _pair(p, "stride", "stride_h", "stride_w", 1)
    ph, pw = _pair(p, "pad", "pad_h", "pad_w", 0)
    dil = [int(v) for v in p.get_all("dilation")] or [1]
    dh, dw = dil[0], dil[-1]
    if min(kh, kw, sh, sw) < 1:
        return None
    n, _, h, w = shape
    if transposed:
        oh = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph
        ow = sw * (w - 1) + dw * (kw - 1) + 1 - 2 * pw
    else:
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return (n, int(p.get("num_output")), oh, ow)


def _pool_shape(layer: CaffeLayer, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    p = layer.type_params
    if len(shape) != 4:
        return None
    if str(p.get("global_pooling", "false")).lower() in ("true", "1"):
        return (shape[0], shape[1], 1, 1)
    kh, kw = _pair(p, "kernel_size", "kernel_h", "kernel_w", 0)
    sh, sw = _pair(p, "stride", "stride_h", "stride_w", 1)
    ph, pw = _pair(p, "pad", "pad_h", "pad_w", 0)
    if min(kh, kw, sh, sw) < 1:
        return None
    ceil = str(p.get("round_mode", "CEIL")) not in ("FLOOR", "1")
    return (shape[0], shape[1], caffe_pool_output_size(shape[2], kh, sh, ph, ceil),
            caffe_pool_output_size(shape[3], kw, sw, pw, ceil))


def _top_shape(layer: CaffeLayer, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    t, p, first = layer.type, layer.type_params, shapes[0]
    if t in _SAME_SHAPE:
        return first
    if t in ("Convolution", "Deconvolution"):
        return _conv_shape(layer, first, t == "Deconvolution")
    if t == "Pooling":
        return _pool_shape(layer, first)
    if t == "InnerProduct" and "num_output" in p:
        axis = int(p.get("axis", 1)) % max(1, len(first))
        return (*first[:axis], int(p.get("num_output")))
    if t == "Concat":
        axis = int(p.get("axis", 1)) % max(1, len(first))
        return (*first[:axis], sum(s[axis] for s in shapes), *first[axis + 1:])
    if t == "Flatten":
        return (first[0], math.prod(first[1:]))
    return None


def blob_shapes(net: CaffeNet, inputs: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Every blob's ``(N, C, H, W)``-style shape that follows from the net's parameters.

    Args:
        net: a parsed deploy net.
        inputs: input name -> shape, overriding the declared ones.

    Returns:
        blob -> shape, for the inputs with a declared shape and every top whose shape
        follows from them; blobs behind a layer type not modelled here (or a malformed
        one) are left out.
    """
    shapes = {k: tuple(v) for k, v in net.inputs.items() if v}
    shapes.update({k: tuple(int(d) for d in v) for k, v in (inputs or {}).items()})
    for layer in net.layers:
        if is_test_phase(layer) or layer.type == "Input":
            continue
        bottoms = [shapes.get(b) for b in layer.bottoms]
        if not bottoms or any(b is None for b in bottoms):
            continue
        if layer.type == "Split":
            shapes.update({t: bottoms[0] for t in layer.tops})
            continue
        top = _top_shape(layer, bottoms)
        if top is not None and len(layer.tops) == 1 and all(d >= 1 for d in top):
            shapes[layer.tops[0]] = top
    return shapes
