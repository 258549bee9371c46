"""``import_caffe(prototxt, caffemodel)``: a Caffe deploy net as an equivalent PyTorch module.

Design notes and the facts behind them: ``docs/caffe.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import TorchNvdlaError
from .prototxt import CaffeLayer, CaffeNet, Message, parse_prototxt, structure_problems
from .shapes import caffe_pool_output_size

__all__ = [
    "SUPPORTED_TYPES",
    "CaffeConcat",
    "CaffeEltwise",
    "CaffeImportError",
    "CaffeNetModule",
    "CaffeReshape",
    "CaffeScale",
    "build_module",
    "import_caffe",
]


class CaffeImportError(TorchNvdlaError, ValueError):
    """A Caffe net that cannot become a PyTorch module; the message names the layer and file."""


# ---------------------------------------------------------------------------------------
# Modules for the Caffe layers PyTorch has no module for
# ---------------------------------------------------------------------------------------


class CaffeEltwise(nn.Module):
    """Caffe ``Eltwise``: element-wise SUM (with optional coefficients), PROD or MAX.

    Args:
        operation: ``"SUM"``, ``"PROD"`` or ``"MAX"``.
        coeffs: one coefficient per input for SUM (empty: all 1).
    """

    def __init__(self, operation: str = "SUM", coeffs: Sequence[float] = ()) -> None:
        super().__init__()
        if operation not in ("SUM", "PROD", "MAX"):
            raise ValueError(f"CaffeEltwise: unknown operation {operation!r}")
        if coeffs and operation != "SUM":
            raise ValueError("CaffeEltwise: coefficients only apply to SUM")
        self.operation = operation
        self.coeffs = tuple(float(c) for c in coeffs)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """Combine the inputs element-wise."""
        if self.coeffs and len(self.coeffs) != len(xs):
            raise ValueError(f"CaffeEltwise: {len(self.coeffs)} coefficients for {len(xs)} inputs")
        if self.operation == "SUM":
            if not self.coeffs or all(c == 1.0 for c in self.coeffs):
                out = xs[0]
                for x in xs[1:]:
                    out = out + x
                return out
            out = xs[0] * self.coeffs[0]
            for c, x in zip(self.coeffs[1:], xs[1:]):
                out = out + x * c
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out * x if self.operation == "PROD" else torch.maximum(out, x)
        return out

    def extra_repr(self) -> str:
        return self.operation + (f", coeffs={self.coeffs}" if self.coeffs else "")


class CaffeConcat(nn.Module):
    """Caffe ``Concat`` along ``axis`` (default 1, the channels)."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = int(axis)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """Concatenate the inputs."""
        return torch.cat(xs, dim=self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class CaffeScale(nn.Module):
    """Caffe ``Scale`` with a learned blob: ``y = x * weight (+ bias)``, broadcast from ``axis``.

    ``weight`` (and ``bias``) have the shape of the bottom's dimensions
    ``axis .. axis + ndim(weight) - 1`` (a ``(C,)`` blob at axis 1: per channel).

    Args:
        weight: the scale blob.
        bias: the bias blob (same shape) or ``None``.
        axis: the first bottom axis the blob covers (negative counts from the end).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, axis: int = 1) -> None:
        super().__init__()
        self.axis = int(axis)
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        if bias is not None:
            self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone().reshape(self.weight.shape))
        else:
            self.register_parameter("bias", None)

    def _view(self, p: torch.Tensor, ndim: int) -> torch.Tensor:
        axis = self.axis if self.axis >= 0 else self.axis + ndim
        return p.reshape([1] * axis + list(p.shape) + [1] * (ndim - axis - p.dim()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply by the blob (and add the bias) broadcast along ``axis``."""
        y = x * self._view(self.weight, x.dim())
        if self.bias is not None:
            y = y + self._view(self.bias, x.dim())
        return y

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, axis={self.axis}, bias={self.bias is not None}"


class CaffeReshape(nn.Module):
    """Caffe ``Reshape`` (``axis: 0``, ``num_axes: -1``): ``0`` copies a dimension, ``-1`` is inferred."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape ``x`` to ``dims``."""
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(self.dims)]
        return x.reshape(shape)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


# ---------------------------------------------------------------------------------------
# The net module
# ---------------------------------------------------------------------------------------


def _fx_tracing() -> bool:
    """Whether torch.fx is symbolically tracing right now (the exporter traces imported nets)."""
    mod = torch.fx._symbolic_trace
    check = getattr(mod, "is_fx_symbolic_tracing", None) or getattr(mod, "is_fx_tracing", None)
    return bool(check()) if check is not None else False


@dataclass(frozen=True)
class _Step:
    """One layer of the forward pass: the module (or None), its bottoms and tops."""

    layer: str
    module: str | None  # attribute name; None: tops alias the bottoms (Split)
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    flatten_axis: int | None = None  # InnerProduct: flatten the bottom from this axis first


class CaffeNetModule(nn.Module):
    """A Caffe deploy net as a PyTorch module (see the module docstring for the layer mapping).

    ``forward(*inputs)`` takes the net's inputs in :attr:`input_names` order and returns
    the output blob (a tuple when the net has several, in :attr:`output_names` order).

    Attributes:
        net_name: the Caffe net name.
        input_names: input blob names.
        input_shapes: input blob name -> shape (as declared or given).
        output_names: output blob names.
        layer_names: the Caffe layers that became modules, in order.
        module_names: Caffe layer name -> submodule name (equal unless sanitized).
        layer_types: Caffe layer name -> Caffe type.
        blob_shapes: blob name (after each layer; in-place tops rebind) -> shape seen
            at import with batch size 1.
    """

    def __init__(self, net_name: str, inputs: Mapping[str, tuple[int, ...]], steps: Sequence[_Step],
                 modules: Mapping[str, nn.Module], outputs: Sequence[str], layer_types: Mapping[str, str]) -> None:
        super().__init__()
        self.net_name = net_name
        self.input_names = tuple(inputs)
        self.input_shapes = {k: tuple(v) for k, v in inputs.items()}
        self.output_names = tuple(outputs)
        self._steps = tuple(steps)
        self.module_names: dict[str, str] = {}
        for step in self._steps:
            if step.module is not None:
                self.add_module(step.module, modules[step.module])
                self.module_names[step.layer] = step.module
        self.layer_names = tuple(self.module_names)
        self.layer_types = dict(layer_types)
        self.blob_shapes: dict[str, tuple[int, ...]] = {}

    def _run(self, inputs: tuple, record: dict | None):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.net_name or 'CaffeNetModule'} takes {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        blobs = dict(zip(self.input_names, inputs))
        for step in self._steps:
            xs = [blobs[b] for b in step.bottoms]
            if step.module is None:
                for top, x in zip(step.tops, xs):
                    blobs[top] = x
                continue
            if step.flatten_axis is not None:
                xs = [torch.flatten(xs[0], step.flatten_axis)]
            y = getattr(self, step.module)(*xs)
            blobs[step.tops[0]] = y
            if record is not None:
                record[step.layer] = y
        return tuple(blobs[name] for name in self.output_names)

    def _inputs(self, x: torch.Tensor, more: tuple) -> tuple:
        if len(self.input_names) == 1:
            # ``more`` is not touched for a single-input net: torch.fx can trace it
            if not _fx_tracing() and more:
                raise TypeError(f"{self.net_name or 'CaffeNetModule'} takes 1 input "
                                f"({self.input_names[0]}), got {1 + len(more)}")
            return (x,)
        return (x, *more)

    def forward(self, x: torch.Tensor, *more: torch.Tensor):
        """Run the layers in prototxt order on the inputs (one per input blob, :attr:`input_names` order)."""
        outs = self._run(self._inputs(x, more), None)
        return outs[0] if len(outs) == 1 else outs

    def layer_outputs(self, x: torch.Tensor, *more: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run like :meth:`forward`; return every layer's top tensor, Caffe layer name -> tensor."""
        record: dict[str, torch.Tensor] = {}
        self._run(self._inputs(x, more), record)
        return record

    def extra_repr(self) -> str:
        return f"net={self.net_name!r}, inputs={self.input_shapes}, outputs={list(self.output_names)}"


# ---------------------------------------------------------------------------------------
# Reading parameters with Caffe's defaults
# ---------------------------------------------------------------------------------------


def _where(layer: CaffeLayer, source: str) -> str:
    line = f":{layer.line}" if layer.line is not None else ""
    return f"{source}{line}: layer {layer.name!r} ({layer.type})"


def _ints(msg: Message, name: str) -> list[int]:
    return [int(v) for v in msg.get_all(name)]


def _hw(msg: Message, repeated: str, h: str, w: str, default: int, what: str, where: str) -> tuple[int, int]:
    """A 2-D spatial parameter: ``h``/``w`` fields, else the repeated field ``[h, w]`` or one value."""
    if h in msg or w in msg:
        if repeated in msg and _ints(msg, repeated):
            raise CaffeImportError(f"{where}: give either {repeated} or {h}/{w}, not both")
        return int(msg.get(h, default)), int(msg.get(w, default))
    values = _ints(msg, repeated)
    if not values:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise CaffeImportError(f"{where}: {what} has {len(values)} values; only 2-D (1 or 2 values) is supported")


_ENUM_NUMBERS = {
    "pool": {0: "MAX", 1: "AVE", 2: "STOCHASTIC"},
    "operation": {0: "PROD", 1: "SUM", 2: "MAX"},
    "round_mode": {0: "CEIL", 1: "FLOOR"},
}


def _enum_name(msg: Message, name: str, default: str) -> str:
    value = msg.get(name, None)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return _ENUM_NUMBERS.get(name, {}).get(value, str(value))
    return str(value)


def _phase_included(layer: CaffeLayer) -> bool:
    """Caffe's NetState rule check for the TEST phase (no level, no stages)."""

    def meets(rule: Any) -> bool:
        if not isinstance(rule, Message):
            return True
        phase = rule.get("phase")
        if phase is not None and str(phase) not in ("TEST", "1"):
            return False
        if rule.get_all("stage"):
            return False
        if rule.get("min_level", 0) > 0 or rule.get("max_level", 0) < 0:
            return False
        return True

    includes = layer.params.get_all("include")
    excludes = layer.params.get_all("exclude")
    if includes:
        return any(meets(r) for r in includes)
    return not any(meets(r) for r in excludes)


def _blob(layer: CaffeLayer, index: int, where: str, what: str) -> np.ndarray:
    if index >= len(layer.blobs):
        raise CaffeImportError(f"{where}: the caffemodel has {len(layer.blobs)} blob(s); {what} (blob {index}) is missing")
    return np.asarray(layer.blobs[index], dtype=np.float32)


def _fit(array: np.ndarray, shape: tuple[int, ...], where: str, what: str) -> torch.Tensor:
    """``array`` as a tensor of ``shape``; legacy 4-D blobs with leading 1s are accepted."""
    if tuple(array.shape) != tuple(shape):
        if array.size != math.prod(shape) or any(d != 1 for d in array.shape[: max(0, array.ndim - len(shape))]):
            raise CaffeImportError(f"{where}: {what} blob has shape {tuple(array.shape)}, expected {tuple(shape)}")
        array = array.reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())


# ---------------------------------------------------------------------------------------
# Layer builders: (layer, bottom shapes, where, blobs?) -> (module, flatten_axis)
# ---------------------------------------------------------------------------------------


def _build_convolution(layer: CaffeLayer, shapes: list[tuple[int, ...]], where: str, with_blobs: bool,
                       transposed: bool = False):
    p = layer.type_params
    what = "deconvolution" if transposed else "convolution"
    if len(shapes[0]) != 4:
        raise CaffeImportError(f"{where}: only 2-D {what} (4-D NCHW bottom) is supported, bottom is {shapes[0]}")
    if int(p.get("axis", 1)) != 1:
        raise CaffeImportError(f"{where}: convolution_param.axis must be 1")
    if "num_output" not in p:
        raise CaffeImportError(f"{where}: convolution_param.num_output is missing")
    num_output = int(p.get("num_output"))
    kernel = _hw(p, "kernel_size", "kernel_h", "kernel_w", 0, "kernel_size", where)
    if min(kernel) < 1:
        raise CaffeImportError(f"{where}: the kernel size is missing or zero")
    stride = _hw(p, "stride", "stride_h", "stride_w", 1, "stride", where)
    pad = _hw(p, "pad", "pad_h", "pad_w", 0, "pad", where)
    dil = _ints(p, "dilation")
    if len(dil) > 2:
        raise CaffeImportError(f"{where}: dilation has {len(dil)} values; only 2-D is supported")
    dilation = (1, 1) if not dil else (dil[0], dil[0]) if len(dil) == 1 else (dil[0], dil[1])
    group = int(p.get("group", 1))
    bias = bool(p.get("bias_term", True))
    channels = shapes[0][1]
    if channels % group or num_output % group:
        raise CaffeImportError(f"{where}: group {group} does not divide {channels} input / {num_output} output channels")
    if transposed:  # Caffe's Deconvolution blob is (C_in, C_out / group, kh, kw), as PyTorch's
        conv = nn.ConvTranspose2d(channels, num_output, kernel, stride, pad, groups=group, bias=bias,
                                  dilation=dilation)
    else:
        conv = nn.Conv2d(channels, num_output, kernel, stride, pad, dilation, group, bias)
    if with_blobs:
        with torch.no_grad():
            conv.weight.copy_(_fit(_blob(layer, 0, where, "weight"), tuple(conv.weight.shape), where, "weight"))
            if bias:
                conv.bias.copy_(_fit(_blob(layer, 1, where, "bias"), (num_output,), where, "bias"))
    return conv, None


def _build_deconvolution(layer: CaffeLayer, shapes: list[tuple[int, ...]], where: str, with_blobs: bool):
    return _build_convolution(layer, shapes, where, with_blobs, transposed=True)


def _build_inner_product(layer: CaffeLayer, shapes: list[tuple[int, ...]], where: str, with_blobs: bool):
    p = layer.type_params
    if "num_output" not in p:
        raise CaffeImportError(f"{where}: inner_product_param.num_output is missing")
    num_output = int(p.get("num_output"))
    shape = shapes[0]
    axis = int(p.get("axis", 1))
    axis = axis if axis >= 0 else axis + len(shape)
    if not 0 <= axis < len(shape):
        raise CaffeImportError(f"{where}: inner_product_param.axis {axis} is out of range for bottom {shape}")
    in_features = math.prod(shape[axis:])
    bias = bool(p.get("bias_term", True))
    transpose = bool(p.get("transpose", False))
    linear = nn.Linear(in_features, num_output, bias=bias)
    if with_blobs:
        with torch.no_grad():
            if transpose:
                w = _fit(_blob(layer, 0, where, "weight"), (in_features, num_output), where, "weight").t()
            else:
                w = _fit(_blob(layer, 0, where, "weight"), (num_output, in_features), where, "weight")
            linear.weight.copy_(w)
            if bias:
                linear.bias.copy_(_fit(_blob(layer, 1, where, "bias"), (num_output,), where, "bias"))
    flatten = None if axis == len(shape) - 1 else axis
    return linear, flatten


def _build_pooling(layer: CaffeLayer, shapes: list[tuple[int, ...]], where: str, with_blobs: bool):
    p = layer.type_params
    shape = shapes[0]
    if len(shape) != 4:
        raise CaffeImportError(f"{where}: only 2-D pooling (4-D NCHW bottom) is supported, bottom is {shape}")
    method = _enum_name(p, "pool", "MAX")
    if method not in ("MAX", "AVE"):
        raise CaffeImportError(f"{where}: pooling method {method} is not supported (MAX or AVE)")
    if bool(p.get("global_pooling", False)):
        if any(f in p for f in ("kernel_size", "kernel_h", "kernel_w")):
            raise CaffeImportError(f"{where}: global_pooling and a kernel size are exclusive")
        module = nn.AdaptiveMaxPool2d(1) if method == "MAX" else nn.AdaptiveAvgPool2d(1)
        return module, None
    if "kernel_size" in p and ("kernel_h" in p or "kernel_w" in p):
        raise CaffeImportError(f"{where}: give either kernel_size or kernel_h/kernel_w")
    kernel = (int(p.get("kernel_h", p.get("kernel_size", 0))), int(p.get("kernel_w", p.get("kernel_size", 0))))
    stride = (int(p.get("stride_h", p.get("stride", 1))), int(p.get("stride_w", p.get("stride", 1))))
    pad = (int(p.get("pad_h", p.get("pad", 0))), int(p.get("pad_w", p.get("pad", 0))))
    if min(kernel) < 1 or min(stride) < 1:
        raise CaffeImportError(f"{where}: kernel size and stride must be >= 1, got {kernel} / {stride}")
    if any(2 * pd > k for pd, k in zip(pad, kernel)):
        raise CaffeImportError(f"{where}: pad {pad} larger than half the kernel {kernel} is not supported")
    ceil = _enum_name(p, "round_mode", "CEIL") == "CEIL"
    if method == "MAX":
        module = nn.MaxPool2d(kernel, stride, pad, ceil_mode=ceil)
    else:
        module = nn.AvgPool2d(kernel, stride, pad, ceil_mode=ceil, count_include_pad=True)
    # PyTorch's ceil mode clips a window starting past the input even without padding;
    # Caffe only does with padding. Refuse the (degenerate) nets where the two differ.
    for axis, (size, k, s, pd) in enumerate(zip(shape[2:], kernel, stride, pad)):
        caffe = caffe_pool_output_size(size, k, s, pd, ceil)
        span = size + 2 * pd - k
        if span < 0:
            raise CaffeImportError(f"{where}: kernel {kernel} larger than the padded input {shape[2:]}")
        torch_out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (torch_out - 1) * s >= size + pd:
            torch_out -= 1
        if caffe != torch_out:
            raise CaffeImportError(
                f"{where}: Caffe pools to {caffe} along {'HW'[axis]} but PyTorch to {torch_out} "
                "(a window starting past the input); not supported"
            )
    return module, None


def _build_batch_norm(layer: CaffeLayer, shapes: list[tuple[int, ...]], where: str, with_blobs: bool):
    p = layer.type_params
    shape = shapes[0]
    if "use_global_stats" in p and not bool(p.get("use_global_stats")):
        raise CaffeImportError(f"{where}: use_global_stats: false (batch statistics) is not supported for inference")
    eps = float(p.get("eps", 1e-5))
    if len(shape) < 2:
        raise CaffeImportError(f"{where}: bottom {shape} has no channel axis")
    channels = shape[1]
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(len(shape))
    if cls is None:
        raise CaffeImportError(f"{where}: BatchNorm on a {len(shape)}-D bottom is not supported")
    bn = cls(channels, eps=eps, affine=False, track_running_stats=True)
    if with_blobs:
        mean = _fit(_blob(layer, 0, where, "mean"), (channels,), where, "mean")
        var = _fit(_blob(layer, 1, where, "variance"), (channels,), where, "variance")
        factor_blob = _blob(layer, 2, where, "moving-average factor")
        if factor_blob.size < 1:
            raise CaffeImportError(f"{where}: the moving-average factor blob is empty")
        factor = float(factor_blob.reshape(-1)[0])
        scale = 0.0 if factor == 0.0 else 1.0 / factor
        with torch.no_grad():
            bn.running_mean.copy_(mean * scale)
            bn.running_var.copy_(var * scale)
    return bn, None


def _build_scale(layer: CaffeLayer, shapes: list[tuple[int, ...]], where: str, with_blobs: bool):
    p = layer.type_params
    if len(shapes) != 1:
        raise CaffeImportError(f"{where}: Scale with {len(shapes)} bottoms (scale from a blob) is not supported")
    shape = shapes[0]
    axis = int(p.get("axis", 1))
    axis_n = axis if axis >= 0 else axis + len(shape)
    num_axes = int(p.get("num_axes", 1))
    end = len(shape) if num_axes == -1 else axis_n + num_axes
    if not (0 <= axis_n <= end <= len(shape)):
        raise CaffeImportError(f"{where}: scale_param axis/num_axes do not fit bottom {shape}")
    blob_shape = tuple(shape[axis_n:end])
    bias_term = bool(p.get("bias_term", False))
    if with_blobs:
        weight = _fit(_blob(layer, 0, where, "scale"), blob_shape, where, "scale")
        bias = _fit(_blob(layer, 1, where, "bias"), blob_shape, where, "bias") if bias_term else None
    else:
        weight = torch.ones(blob_shape)
        bias = torch.zeros(blob_shape) if bias_term else None
    return CaffeScale(weight, bias, axis_n), None


def _build_relu(layer: CaffeLayer, shapes, where, with_blobs):
    slope = float(layer.params.get_message("relu_param").get("negative_slope", 0.0))
    return (nn.ReLU() if slope == 0.0 else nn.LeakyReLU(slope)), None


def _build_eltwise(layer: CaffeLayer, shapes, where, with_blobs):
    p = layer.type_params
    op = _enum_name(p, "operation", "SUM")
    coeffs = [float(c) for c in p.get_all("coeff")]
    if len(shapes) < 2:
        raise CaffeImportError(f"{where}: Eltwise needs at least 2 bottoms")
    if any(s != shapes[0] for s in shapes):
        raise CaffeImportError(f"{where}: Eltwise bottoms differ in shape: {shapes}")
    if coeffs and (op != "SUM" or len(coeffs) != len(shapes)):
        raise CaffeImportError(f"{where}: Eltwise coefficients need SUM and one per bottom")
    return CaffeEltwise(op, coeffs), None


def _build_concat(layer: CaffeLayer, shapes, where, with_blobs):
    p = layer.type_params
    axis = int(p.get("axis", p.get("concat_dim", 1)))
    return CaffeConcat(axis), None


def _build_softmax(layer: CaffeLayer, shapes, where, with_blobs):
    return nn.Softmax(dim=int(layer.type_params.get("axis", 1))), None


def _build_flatten(layer: CaffeLayer, shapes, where, with_blobs):
    p = layer.type_params
    return nn.Flatten(int(p.get("axis", 1)), int(p.get("end_axis", -1))), None


def _build_reshape(layer: CaffeLayer, shapes, where, with_blobs):
    p = layer.type_params
    if int(p.get("axis", 0)) != 0 or int(p.get("num_axes", -1)) != -1:
        raise CaffeImportError(f"{where}: Reshape with axis/num_axes is not supported")
    dims = _ints(p.get_message("shape"), "dim")
    if sum(1 for d in dims if d == -1) > 1:
        raise CaffeImportError(f"{where}: Reshape has more than one -1")
    return CaffeReshape(dims), None


def _build_dropout(layer: CaffeLayer, shapes, where, with_blobs):
    return nn.Dropout(float(layer.type_params.get("dropout_ratio", 0.5))), None


_BUILDERS = {
    "Convolution": _build_convolution,
    "Deconvolution": _build_deconvolution,
    "InnerProduct": _build_inner_product,
    "Pooling": _build_pooling,
    "BatchNorm": _build_batch_norm,
    "Scale": _build_scale,
    "ReLU": _build_relu,
    "Sigmoid": lambda layer, shapes, where, wb: (nn.Sigmoid(), None),
    "TanH": lambda layer, shapes, where, wb: (nn.Tanh(), None),
    "Eltwise": _build_eltwise,
    "Concat": _build_concat,
    "Softmax": _build_softmax,
    "Flatten": _build_flatten,
    "Reshape": _build_reshape,
    "Dropout": _build_dropout,
}

#: The Caffe layer types :func:`import_caffe` understands (plus ``Input`` and ``Split``).
SUPPORTED_TYPES = tuple(sorted([*_BUILDERS, "Input", "Split"]))


def _module_name(name: str, used: set[str]) -> str:
    """A submodule name for Caffe layer ``name`` (``.`` -> ``_``, unique, not an nn.Module attribute)."""
    base = name.replace(".", "_") or "layer"
    candidate, k = base, 1
    while candidate in used or hasattr(nn.Module, candidate) or candidate in ("net_name", "input_names",
                                                                              "input_shapes", "output_names",
                                                                              "module_names", "layer_names",
                                                                              "layer_types", "blob_shapes"):
        candidate = f"{base}_{k}"
        k += 1
    used.add(candidate)
    return candidate


def _load(obj: Any, kind: str):
    if isinstance(obj, CaffeNet):
        return obj
    if kind == "prototxt":
        return parse_prototxt(Path(obj) if isinstance(obj, (str, os.PathLike)) and not _looks_inline(obj) else obj)
    from .caffemodel import read_caffemodel

    return read_caffemodel(obj)


def _looks_inline(obj: Any) -> bool:
    return isinstance(obj, str) and ("\n" in obj or "{" in obj)


def build_module(net: CaffeNet, weights: CaffeNet | Mapping[str, Sequence[np.ndarray]] | None = None, *,
                 input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                 source: str | None = None) -> CaffeNetModule:
    """Build the :class:`CaffeNetModule` of a parsed net (see :func:`import_caffe`).

    Args:
        net: the deploy net (layers without blobs, or with blobs when ``weights`` is None).
        weights: a caffemodel net or a mapping layer name -> blobs; ``None`` uses the
            net's own layer blobs where it has any.
        input_shape: overrides the declared input shape (one shape for a single input, or
            a mapping input name -> shape).
        source: the name used in messages (default: the net's source).
    """
    source = source or net.source or "<net>"
    blobs_by_layer, with_any = _blobs_by_layer(net, weights)
    problems = structure_problems(net, SUPPORTED_TYPES, include=_phase_included)
    if problems:
        p = problems[0]
        line = f":{p.line}" if p.line is not None else ""
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        kind = f" ({p.type})" if p.type else ""
        raise CaffeImportError(f"{source}{line}: layer {p.layer!r}{kind}: {p.problem}{more}")
    layers = [layer for layer in net.layers if _phase_included(layer)]
    inputs = _input_shapes(net, layers, input_shape, source)

    # Shape inference runs every new module on zeros of batch size 1.
    values: dict[str, torch.Tensor] = {n: torch.zeros((1, *s[1:])) for n, s in inputs.items()}
    steps: list[_Step] = []
    modules: dict[str, nn.Module] = {}
    used: set[str] = set()
    types: dict[str, str] = {}
    for layer in layers:
        if layer.type == "Input":
            continue
        if layer.type == "Split":
            steps.append(_Step(layer.name, None, tuple(layer.bottoms) * len(layer.tops), tuple(layer.tops)))
            values.update({t: values[layer.bottoms[0]] for t in layer.tops})
            continue
        module, flatten = _build_layer(layer, values, blobs_by_layer.get(layer.name, []), with_any, source)
        name = _module_name(layer.name, used)
        modules[name] = module
        types[layer.name] = layer.type
        steps.append(_Step(layer.name, name, tuple(layer.bottoms), tuple(layer.tops), flatten))
    module = CaffeNetModule(net.name, inputs, steps, modules, _output_blobs(inputs, steps, source), types)
    module.blob_shapes = {n: tuple(v.shape) for n, v in values.items()}
    return module.eval()


def _blobs_by_layer(net: CaffeNet, weights) -> tuple[dict[str, list], bool]:
    """Layer name -> blobs (from ``weights``, or the net's own), and whether any were given."""
    if weights is None:
        blobs = {layer.name: layer.blobs for layer in net.layers if layer.blobs}
        return blobs, bool(blobs)
    if isinstance(weights, CaffeNet):
        return {layer.name: layer.blobs for layer in weights.layers if layer.blobs}, True
    return {k: list(v) for k, v in weights.items()}, True


def _input_shapes(net: CaffeNet, layers: Sequence[CaffeLayer], input_shape, source: str) -> dict[str, tuple[int, ...]]:
    """Every input's shape: declared (``input:`` or ``Input`` layers), then ``input_shape``."""
    inputs: dict[str, tuple[int, ...]] = dict(net.declared_inputs)
    for layer in layers:
        if layer.type == "Input":
            shapes = layer.type_params.get_all("shape")
            for k, top in enumerate(layer.tops):
                msg = shapes[k] if k < len(shapes) else (shapes[0] if shapes else None)
                inputs[top] = tuple(int(d) for d in msg.get_all("dim")) if isinstance(msg, Message) else ()
    if isinstance(input_shape, Mapping):
        for k, v in input_shape.items():
            if k not in inputs:
                raise CaffeImportError(f"{source}: input_shape names {k!r}, not an input of the net ({list(inputs)})")
            inputs[k] = tuple(int(d) for d in v)
    elif input_shape is not None:
        if len(inputs) != 1:
            raise CaffeImportError(f"{source}: the net has {len(inputs)} inputs; give input_shape as a mapping")
        inputs[next(iter(inputs))] = tuple(int(d) for d in input_shape)
    if not inputs:
        raise CaffeImportError(f"{source}: the net declares no input (no Input layer, no 'input:' field)")
    for name, shape in inputs.items():
        if not shape or any(d < 1 for d in shape):
            raise CaffeImportError(f"{source}: input {name!r} has no usable shape {shape}; pass input_shape=")
    return inputs


def _build_layer(layer: CaffeLayer, values: dict[str, torch.Tensor], layer_blobs: list, with_any: bool,
                 source: str) -> tuple[nn.Module, int | None]:
    """The module of one layer, run on its bottoms' zeros to check it and shape its top
    (written into ``values``)."""
    where = _where(layer, source)
    builder = _BUILDERS[layer.type]  # structure_problems checked the type
    if len(layer.tops) != 1:
        raise CaffeImportError(f"{where}: {len(layer.tops)} tops; only single-top layers are supported")
    n_bottoms = len(layer.bottoms)
    if layer.type in ("Eltwise", "Concat"):
        if n_bottoms < 1:
            raise CaffeImportError(f"{where}: needs bottoms")
    elif n_bottoms != 1:
        raise CaffeImportError(f"{where}: {n_bottoms} bottoms; the layer takes 1")
    needs = layer.type in ("Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale")
    if needs and with_any and not layer_blobs:
        raise CaffeImportError(f"{where}: the caffemodel has no blobs for this layer")
    shapes = [tuple(values[b].shape) for b in layer.bottoms]
    proxy = CaffeLayer(layer.name, layer.type, layer.bottoms, layer.tops, layer.params, layer_blobs, layer.line)
    module, flatten = builder(proxy, shapes, where, needs and with_any)
    module.eval()
    xs = [values[b] for b in layer.bottoms]
    if flatten is not None:
        xs = [torch.flatten(xs[0], flatten)]
    try:
        with torch.no_grad():
            values[layer.tops[0]] = module(*xs)
    except (RuntimeError, ValueError) as exc:
        raise CaffeImportError(f"{where}: does not apply to bottom shape(s) {shapes}: {exc}") from None
    return module, flatten


def _output_blobs(inputs: Mapping[str, Any], steps: Sequence[_Step], source: str) -> list[str]:
    """Blobs produced and never consumed afterwards (Caffe's ``available_blobs`` rule)."""
    available: dict[str, None] = dict.fromkeys(inputs)
    for step in steps:
        for b in step.bottoms:
            available.pop(b, None)
        for t in step.tops:
            available.pop(t, None)
            available[t] = None
    if not available:
        raise CaffeImportError(f"{source}: the net has no output blob")
    return list(available)


def import_caffe(
    prototxt: str | os.PathLike | CaffeNet,
    caffemodel: str | os.PathLike | CaffeNet | None = None,
    *,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
) -> CaffeNetModule:
    """Build the PyTorch module equivalent to a Caffe deploy net.

    Args:
        prototxt: the ``deploy.prototxt`` (path, text, or a parsed
            :class:`~torch_nvdla.caffe.prototxt.CaffeNet`).
        caffemodel: the trained ``.caffemodel`` (path or a parsed net); blobs are
            matched by layer name. ``None``: the layers keep PyTorch's initial values
            (enough for shapes and structure).
        input_shape: the input shape when the prototxt declares none, or to override it
            (a mapping input name -> shape for several inputs).

    Returns:
        A :class:`CaffeNetModule` in eval mode; submodules carry the Caffe layer names.

    Raises:
        CaffeImportError: an unsupported layer type or parameter, a missing or misshapen
            blob, a bottom no layer produces; naming the file, line and layer.
        FileFormatError: a prototxt / caffemodel that does not parse.
    """
    net = _load(prototxt, "prototxt")
    weights = None if caffemodel is None else _load(caffemodel, "caffemodel")
    return build_module(net, weights, input_shape=input_shape)
