"""``export_caffe(model, table, out_dir)``: the three files the NVDLA compiler reads, from one model.

Design notes and the facts behind them: ``docs/export.md``.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..caffe.importer import (
    CaffeConcat,
    CaffeEltwise,
    CaffeImportError,
    CaffeReshape,
    CaffeScale,
    build_module,
)
from ..caffe.prototxt import CaffeLayer, CaffeNet, EnumValue, Message, parse_prototxt
from ..caffe.shapes import caffe_pool_output_size
from ..calib.taps import BN_NORMALIZED, TapSelection
from ..errors import TorchNvdlaError
from ..model.state import eval_mode
from ..nvdla.naming import PAD_SHORTCUT
from ..nvdla.weights import fold_batchnorm

__all__ = [
    "CaffeConversion",
    "CaffeExport",
    "CaffeExportError",
    "CaffeLayerInfo",
    "PAD_SHORTCUT",
    "caffe_tap_selection",
    "convert_to_caffe",
    "export_caffe",
]

#: Default relative tolerance of the verification: ``max|caffe - torch| <= RTOL * max|torch|``.
RTOL = 1e-4
#: ReLU6's cap: written as a Caffe ReLU whose range is at most this, so INT8 saturation caps it.
RELU6_CAP = 6.0
RELU6_NOTE = "ReLU6: a ReLU whose entry is at most 6, so INT8 saturation does the cap"


class CaffeExportError(TorchNvdlaError, ValueError):
    """A model (or a part of it) that cannot be written as an NVDLA Caffe net; names the module."""


# ---------------------------------------------------------------------------------------
# Tracing with tap names
# ---------------------------------------------------------------------------------------


def _is_pad_shortcut(m: nn.Module) -> bool:
    return getattr(m, "nvdla_export", None) == PAD_SHORTCUT


_LEAF_TYPES = (CaffeEltwise, CaffeConcat, CaffeScale, CaffeReshape)


def _first_proxy(args) -> fx.Proxy | None:
    for a in args:
        if isinstance(a, fx.Proxy):
            return a
        if isinstance(a, (tuple, list)) and a and isinstance(a[0], fx.Proxy):
            return a[0]
    return None


class _TapTracer(fx.Tracer):
    """fx tracer that records, per node, the taps (calibration names) observing its value."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.output_taps: dict[fx.Node, list[str]] = {}  # node -> taps of module outputs
        self.input_taps: dict[fx.Node, list[str]] = {}  # node -> "<tap>:input" names
        self.call_tap: dict[fx.Node, str] = {}  # call_module node -> its tap
        self.node_scope: dict[fx.Node, str] = {}  # node -> innermost module path of a traced-through call

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LEAF_TYPES) or _is_pad_shortcut(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if next(m.children(), None) is not None:
            return super().call_module(m, forward, args, kwargs)
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        tap = path if k == 0 else f"{path}#{k}"
        first = _first_proxy(args)
        if first is not None:
            self.input_taps.setdefault(first.node, []).append(f"{tap}:input")
        before = len(self.graph.nodes)
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.output_taps.setdefault(out.node, []).append(tap)
            if out.node.op == "call_module":
                self.call_tap[out.node] = tap
        # nodes created inside a traced-through childless module belong to its scope
        for node in list(self.graph.nodes)[before:]:
            self.node_scope.setdefault(node, tap)
        return out


def _trace(model: nn.Module) -> tuple[fx.GraphModule, _TapTracer]:
    if next(model.children(), None) is None:
        raise CaffeExportError(
            f"the model ({type(model).__name__}) is a single module; wrap it in nn.Sequential to export it"
        )
    tracer = _TapTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise CaffeExportError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "data-dependent control flow is not supported"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm, tracer


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps a snapshot of every node's value (before in-place ops)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


# ---------------------------------------------------------------------------------------
# The intermediate layer list
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Val:
    """One Caffe tensor: produced by ``layer`` (None: the net input)."""

    layer: "_Layer | None"
    shape: tuple[int, ...]
    taps: list[str] = field(default_factory=list)
    node: fx.Node | None = None  # the fx node whose value this is (for verification)


@dataclass(eq=False)
class _Layer:
    type: str
    bottoms: list[_Val]
    params: Message
    blobs: list[np.ndarray]
    kind: str
    source: str
    base: str  # name stem when no tap names it
    own_tap: str | None = None  # the tap of the module call that made it
    fixed_tap: str | None = None  # a tap that must measure it (BatchNorm: <bn>:normalized)
    rule: str = "tap"  # how the range is found without a tap: producer / sum / max / fixed
    module: str | None = None
    inplace_ok: bool = False
    out: _Val | None = None
    name: str = ""
    note: str = ""
    subsample_of: "_Layer | None" = None  # a subsampling convolution: the stride-1 pooling it follows


@dataclass(frozen=True)
class CaffeLayerInfo:
    """One layer of the exported net.

    Attributes:
        name: the Caffe layer name (= its calib.json key).
        type: the Caffe type.
        kind: NVDLA layer kind (:data:`torch_nvdla.nvdla.naming.KINDS`).
        source: the PyTorch module / function it comes from.
        bottoms: bottom blob names; tops: top blob names.
        inputs: the layers producing its bottoms.
        shape: its output shape for the example input.
        tap: the tap whose range is its calib.json entry, or ``None`` (see ``rule``).
        rule: ``"tap"``, or for a tensor no tap observes ``"producer"`` (its input's
            range: ReLU, Flatten, subsampling), ``"sum"`` (sum of the inputs' ranges),
            ``"max"`` (largest input range) or ``"fixed"`` (softmax: 1).
        note: why the layer looks the way it does (rewrites), for reports.
    """

    name: str
    type: str
    kind: str
    source: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    tap: str | None
    rule: str
    note: str = ""


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _spatial(params: Message, key: str, hw: tuple[int, int], default: int) -> None:
    """Add a 2-D convolution parameter: one value when H == W (left out when it is the
    default), else ``<key>_h`` / ``<key>_w``. Never a repeated ``[h, w]`` pair: the NVDLA
    Caffe parser reads a repeated pair as ``[w, h]``."""
    h, w = hw
    if h == w:
        if h != default:
            params.add(key, h)
    else:
        params.add(f"{key}_h", h).add(f"{key}_w", w)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


class _Converter:
    """Turns a traced graph into :class:`_Layer` objects."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, tracer: _TapTracer, values: dict[fx.Node, Any],
                 fold_batchnorm: bool = False) -> None:
        self.model = model
        self.gm = gm
        self.tracer = tracer
        self.values = values
        self.fold_batchnorm = fold_batchnorm
        self.modules = dict(gm.named_modules())
        self.layers: list[_Layer] = []
        self.val: dict[fx.Node, _Val] = {}
        self.notes: list[str] = []
        self.outputs: list[_Val] = []

    # -- helpers ------------------------------------------------------------------------
    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.modules[node.target]
            return f"module {node.target!r} ({type(mod).__name__})"
        name = getattr(node.target, "__name__", str(node.target))
        scope = self.tracer.node_scope.get(node)
        if scope is None:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                scope = list(stack.values())[-1][0]
        inside = f" in module {scope!r} ({type(self.modules.get(scope.split('#')[0], nn.Module())).__name__})" if scope else ""
        kind = "method" if node.op == "call_method" else "function"
        return f"{kind} {name!r} (node {node.name!r}){inside}"

    def base_name(self, node: fx.Node, op: str) -> str:
        scope = self.tracer.node_scope.get(node)
        if scope is None:
            stack = node.meta.get("nn_module_stack") or {}
            scope = list(stack.values())[-1][0] if stack else ""
        return f"{scope}.{op}" if scope else op

    def tensor(self, node: Any, where: str) -> _Val:
        if not isinstance(node, fx.Node) or node not in self.val:
            raise CaffeExportError(f"{where}: input {node!r} is not a tensor of the network (constants are not supported)")
        return self.val[node]

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.values[node].shape)

    def emit(self, node: fx.Node | None, type_: str, bottoms: list[_Val], params: Message | None = None,
             blobs: Sequence[np.ndarray] = (), *, kind: str, source: str, base: str, shape: tuple[int, ...],
             own_tap: str | None = None, fixed_tap: str | None = None, rule: str = "tap",
             module: str | None = None, inplace_ok: bool = False, note: str = "") -> _Val:
        layer = _Layer(type_, list(bottoms), params or Message(), list(blobs), kind, source, base, own_tap, fixed_tap,
                       rule, module, inplace_ok, note=note)
        out = _Val(layer, tuple(shape), node=node)
        layer.out = out
        self.layers.append(layer)
        if node is not None:
            self.val[node] = out
        return out

    def alias(self, node: fx.Node, src: _Val) -> None:
        self.val[node] = src

    # -- conversion ---------------------------------------------------------------------
    def run(self) -> None:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node is placeholders[0]:
                    shape = self.shape(node)
                    if len(shape) != 4:
                        raise CaffeExportError(
                            f"the model input has shape {shape}; the NVDLA compiler needs a 4-D NCHW Input"
                        )
                    params = Message({"input_param": {"shape": {"dim": list(shape)}}})
                    self.emit(node, "Input", [], params, kind="input", source="model input", base="data",
                              shape=shape, own_tap="data")
                elif not isinstance(self.values.get(node), torch.Tensor):
                    continue
                else:
                    raise CaffeExportError(f"the model takes several tensor inputs ({node.name!r} is the second); "
                                           "only one input is supported")
            elif node.op == "get_attr":
                continue  # parameters are read from the modules; a bare tensor used as input fails later
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                if not isinstance(self.values.get(node), torch.Tensor):
                    if isinstance(self.values.get(node), (tuple, list)) and any(
                            isinstance(v, torch.Tensor) for v in self.values[node]):
                        raise CaffeExportError(f"{self.where(node)} returns several tensors: not supported")
                    continue  # sizes, shapes, dims: no layer
                self.call_function(node)
            elif node.op == "output":
                outs = node.args[0]
                outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
                for o in outs:
                    self.outputs.append(self.tensor(o, "the model output"))
        for node, taps in self.tracer.output_taps.items():
            if node in self.val:
                self.val[node].taps.extend(t for t in taps if t not in self.val[node].taps)
        for node, taps in self.tracer.input_taps.items():
            if node in self.val:
                self.val[node].taps.extend(t for t in taps if t not in self.val[node].taps)

    def call_module(self, node: fx.Node) -> None:
        mod = self.modules[node.target]
        path = str(node.target)
        tap = self.tracer.call_tap.get(node, path)
        where = self.where(node)
        args = node.args
        shape = self.shape(node)
        common = dict(source=f"{path} ({type(mod).__name__})", base=tap, own_tap=tap, shape=shape)
        if node in self.val:
            return  # a BatchNorm folded into the convolution before it
        if isinstance(mod, nn.Conv2d):
            self.conv(node, mod, where, common)
        elif isinstance(mod, nn.Linear):
            x = self.tensor(args[0], where)
            in_shape = self.shape(args[0])
            if len(in_shape) != 2:
                raise CaffeExportError(f"{where}: applied to a {len(in_shape)}-D tensor {in_shape}; "
                                       "InnerProduct needs (N, features) (flatten first)")
            params = Message({"inner_product_param": {"num_output": mod.out_features}})
            blobs = [_f32(mod.weight)]
            if mod.bias is not None:
                blobs.append(_f32(mod.bias))
            else:
                params.get_message("inner_product_param").add("bias_term", False)
            self.emit(node, "InnerProduct", [x], params, blobs, kind="fc", module=path, **common)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            self.batch_norm(node, mod, where, common, path)
        elif isinstance(mod, nn.ReLU):
            self.emit(node, "ReLU", [self.tensor(args[0], where)], kind="relu", rule="producer", inplace_ok=True,
                      **common)
        elif isinstance(mod, nn.ReLU6):
            self.relu6(node, args[0], where, common)
        elif isinstance(mod, nn.ConvTranspose2d):
            self.deconv(node, mod, where, common)
        elif isinstance(mod, nn.Upsample):
            self.upsample(node, mod, where, common)
        elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            self.pooling(node, mod, where, common)
        elif isinstance(mod, nn.Softmax):
            dim = mod.dim if mod.dim is not None else (0 if len(shape) in (0, 1, 3) else 1)
            self.softmax(node, dim, where, common)
        elif isinstance(mod, nn.Flatten):
            self.flatten(node, args[0], mod.start_dim, mod.end_dim, where, common)
        elif isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            self.alias(node, self.tensor(args[0], where))
        elif isinstance(mod, CaffeEltwise):
            self.eltwise(node, list(args), where, common, mod.operation, mod.coeffs)
        elif isinstance(mod, CaffeConcat):
            self.concat(node, list(args), mod.axis, where, common)
        elif isinstance(mod, CaffeScale):
            self.scale_layer(node, mod, where, common, path)
        elif _is_pad_shortcut(mod):
            self.pad_shortcut(node, mod, where, common, path)
        else:
            raise CaffeExportError(
                f"{where} has no NVDLA Caffe equivalent (supported: Conv2d, ConvTranspose2d, Linear, "
                "BatchNorm1d/2d, ReLU, ReLU6, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, nearest Upsample, Softmax, "
                "Flatten, Identity, Dropout, residual add, cat, PadShortcut); nothing was written"
            )

    def call_function(self, node: fx.Node) -> None:
        t = node.target
        where = self.where(node)
        args, kwargs = list(node.args), dict(node.kwargs)
        shape = self.shape(node)
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        tap_list = self.tracer.output_taps.get(node, [])
        own = tap_list[0] if tap_list else None  # the tap of a traced-through module returning it
        scope = self.base_name(node, "").rstrip(".")
        source = f"{name}()" + (f" in {scope}" if scope else "")
        common = dict(source=source, base=own or self.base_name(node, name.strip("_")), own_tap=own, shape=shape)
        handler = _FUNCTION_HANDLERS.get(_function_kind(t, name))
        if handler is None:
            raise CaffeExportError(f"{where} has no NVDLA Caffe equivalent; nothing was written")
        handler(self, node, name, args, kwargs, where, common)

    # -- functions (one handler per kind; see _FUNCTION_HANDLERS) ------------------------
    def fn_add(self, node, name, args, kwargs, where, common) -> None:
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if alpha != 1:
            raise CaffeExportError(f"{where}: add with alpha={alpha!r} is not supported (Eltwise SUM only)")
        self.eltwise(node, args[:2], where, common, "SUM", ())

    def fn_relu(self, node, name, args, kwargs, where, common) -> None:
        self.emit(node, "ReLU", [self.tensor(args[0], where)], kind="relu", rule="producer", inplace_ok=True,
                  **common)

    def fn_relu6(self, node, name, args, kwargs, where, common) -> None:
        if name == "hardtanh":
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            if (lo, hi) != (0.0, 6.0):
                raise CaffeExportError(f"{where}: hardtanh({lo}, {hi}) has no NVDLA Caffe equivalent "
                                       "(only hardtanh(0, 6), a ReLU6)")
        self.relu6(node, args[0], where, common)

    def relu6(self, node, x, where: str, common: dict) -> None:
        """ReLU6 as a Caffe ReLU whose entry is at most 6: INT8 saturation at ``127 * S`` then
        caps it exactly (``min(relu(x), 6)`` quantized is ``min(relu(x), amax)`` for any
        ``amax <= 6``); the calib.json writer holds it to that."""
        self.emit(node, "ReLU", [self.tensor(x, where)], kind="relu", rule="producer", inplace_ok=True,
                  note=RELU6_NOTE, **common)

    def fn_flatten(self, node, name, args, kwargs, where, common) -> None:
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
        self.flatten(node, args[0], start, end, where, common)

    def fn_reshape(self, node, name, args, kwargs, where, common) -> None:
        src = args[0]
        shape, in_shape = common["shape"], self.shape(src)
        if len(shape) == 2 and len(in_shape) >= 2 and shape[0] == in_shape[0]:
            self.flatten(node, src, 1, -1, where, common)
        elif shape == in_shape:
            self.alias(node, self.tensor(src, where))
        else:
            raise CaffeExportError(f"{where}: reshape {in_shape} -> {shape} is not a flatten; the NVDLA compiler "
                                   "does not accept Caffe Reshape layers")

    def fn_cat(self, node, name, args, kwargs, where, common) -> None:
        tensors = kwargs.get("tensors", args[0] if args else None)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        self.concat(node, list(tensors), dim, where, common)

    def fn_softmax(self, node, name, args, kwargs, where, common) -> None:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None:
            dim = 0 if len(common["shape"]) in (0, 1, 3) else 1
        self.softmax(node, dim, where, common)

    def fn_pool(self, node, name, args, kwargs, where, common) -> None:
        self.functional_pool(node, name, args, kwargs, where, common)

    def fn_identity(self, node, name, args, kwargs, where, common) -> None:
        if name == "dropout" and kwargs.get("training", args[2] if len(args) > 2 else True):
            raise CaffeExportError(f"{where}: dropout with training=True is random; not exportable")
        self.alias(node, self.tensor(args[0], where))

    # -- layer kinds ----------------------------------------------------------------------
    def conv(self, node: fx.Node, mod: nn.Conv2d, where: str, common: dict) -> None:
        if mod.padding_mode != "zeros":
            raise CaffeExportError(f"{where}: padding_mode={mod.padding_mode!r}; Caffe pads with zeros only")
        kernel, stride, dilation = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
        if isinstance(mod.padding, str):
            if mod.padding == "valid":
                pad = (0, 0)
            else:  # "same", stride 1: total padding d*(k-1) must split evenly
                totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
                if any(t % 2 for t in totals):
                    raise CaffeExportError(f"{where}: padding='same' needs asymmetric padding here; Caffe pads symmetrically")
                pad = (totals[0] // 2, totals[1] // 2)
        else:
            pad = _pair(mod.padding)
        if dilation[0] != dilation[1]:
            raise CaffeExportError(f"{where}: dilation {dilation} differs between H and W; the NVDLA Caffe parser "
                                   "reads a repeated dilation as [w, h] where Caffe reads [h, w]")
        p = _conv_param(mod.out_channels, kernel, stride, pad, mod.groups, mod.bias is not None, dilation[0])
        blobs = [_f32(mod.weight)] + ([_f32(mod.bias)] if mod.bias is not None else [])
        x, path, out_node = self.tensor(node.args[0], where), str(node.target), node
        bn_node = self._foldable_batchnorm(node) if self.fold_batchnorm else None
        if bn_node is not None:  # written as one convolution whose output is the BatchNorm's
            bn = self.modules[bn_node.target]
            weight, bias = fold_batchnorm(mod.weight.detach(), None if mod.bias is None else mod.bias.detach(),
                                          bn.running_mean, bn.running_var, bn.eps,
                                          None if bn.weight is None else bn.weight.detach(),
                                          None if bn.bias is None else bn.bias.detach())
            if mod.bias is None:
                p.remove("bias_term")
            blobs = [_f32(weight), _f32(bias)]
            bn_tap = self.tracer.call_tap.get(bn_node, str(bn_node.target))
            common = dict(common, own_tap=bn_tap, source=f"{common['source']} + {bn_node.target} (BatchNorm folded)")
            out_node = bn_node
        self.emit(out_node, "Convolution", [x], Message({"convolution_param": p}), blobs, kind="conv", module=path,
                  **common)

    def deconv(self, node: fx.Node, mod: nn.ConvTranspose2d, where: str, common: dict) -> None:
        kernel, stride, pad = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding)
        if any(_pair(mod.output_padding)) or _pair(mod.dilation) != (1, 1) or mod.padding_mode != "zeros":
            raise CaffeExportError(f"{where}: output_padding, dilation and non-zero padding modes have no Caffe "
                                   "Deconvolution equivalent")
        p = _conv_param(mod.out_channels, kernel, stride, pad, mod.groups, mod.bias is not None)
        blobs = [_f32(mod.weight)] + ([_f32(mod.bias)] if mod.bias is not None else [])
        self.emit(node, "Deconvolution", [self.tensor(node.args[0], where)], Message({"convolution_param": p}),
                  blobs, kind="conv", module=str(node.target), **common)

    def upsample(self, node: fx.Node, mod: nn.Upsample, where: str, common: dict) -> None:
        """Nearest upsampling by an integer factor ``s`` as a fixed Deconvolution: kernel and
        stride ``s``, weight 1 from channel ``c`` to channel ``c`` (group 1: the compiler
        takes no grouped Deconvolution), no bias -- each output pixel is one input pixel."""
        in_shape, out_shape = self.shape(node.args[0]), common["shape"]
        if mod.mode != "nearest" or len(in_shape) != 4 or any(o % i for o, i in zip(out_shape[2:], in_shape[2:])):
            raise CaffeExportError(f"{where}: only nearest upsampling by an integer factor has an NVDLA Caffe "
                                   f"equivalent (mode {mod.mode!r}, {tuple(in_shape[2:])} -> {tuple(out_shape[2:])})")
        sh, sw = (o // i for o, i in zip(out_shape[2:], in_shape[2:]))
        c = in_shape[1]
        weight = np.zeros((c, c, sh, sw), dtype=np.float32)
        weight[np.arange(c), np.arange(c)] = 1.0
        p = _conv_param(c, (sh, sw), (sh, sw), (0, 0), 1, False)
        self.emit(node, "Deconvolution", [self.tensor(node.args[0], where)], Message({"convolution_param": p}),
                  [weight], kind="conv", module=str(node.target),
                  note=f"nearest upsampling x{sh}x{sw} as a fixed identity Deconvolution", **common)
        self.notes.append(f"{common['source']}: nearest upsampling written as a fixed identity Deconvolution "
                          f"(kernel = stride = {sh}x{sw})")

    def _foldable_batchnorm(self, node: fx.Node) -> fx.Node | None:
        """The BatchNorm (with running statistics) that is the convolution's only reader."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,):
            return None
        bn = self.modules.get(users[0].target)
        ok = isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None \
            and bn.running_var is not None
        return users[0] if ok else None

    def batch_norm(self, node: fx.Node, mod: nn.modules.batchnorm._BatchNorm, where: str, common: dict, path: str) -> None:
        if mod.running_mean is None or mod.running_var is None:
            raise CaffeExportError(f"{where}: no running statistics (track_running_stats=False); Caffe's BatchNorm "
                                   "needs the global mean and variance")
        in_shape = self.shape(node.args[0])
        if len(in_shape) not in (2, 4):
            raise CaffeExportError(f"{where}: BatchNorm on a {len(in_shape)}-D tensor; only (N, C) and NCHW are supported")
        x = self.tensor(node.args[0], where)
        tap = common["own_tap"]
        bn_params = Message({"batch_norm_param": {"use_global_stats": True, "eps": float(mod.eps)}})
        blobs = [_f32(mod.running_mean), _f32(mod.running_var), np.ones((1,), dtype=np.float32)]
        affine = mod.weight is not None
        normalized_tap = f"{tap}:normalized"
        y = self.emit(None if affine else node, "BatchNorm", [x], bn_params, blobs, kind="bn",
                      source=common["source"], base=normalized_tap if affine else tap, shape=common["shape"],
                      own_tap=None if affine else tap, fixed_tap=normalized_tap if affine else None,
                      module=path, inplace_ok=True)
        if not affine:
            return
        sp = Message({"scale_param": {"bias_term": True}})
        bias = _f32(mod.bias) if mod.bias is not None else np.zeros(mod.num_features, dtype=np.float32)
        self.emit(node, "Scale", [y], sp, [_f32(mod.weight), bias], kind="scale", module=path, inplace_ok=True,
                  **common)

    def scale_layer(self, node: fx.Node, mod: CaffeScale, where: str, common: dict, path: str) -> None:
        in_shape = self.shape(node.args[0])
        axis = mod.axis if mod.axis >= 0 else mod.axis + len(in_shape)
        if axis != 1 or mod.weight.dim() != 1:
            raise CaffeExportError(f"{where}: only per-channel Scale (axis 1, a (C,) blob) is supported by NVDLA")
        sp = Message()
        blobs = [_f32(mod.weight)]
        if mod.bias is not None:
            sp.add("bias_term", True)  # the NVDLA parser reads the bias blob whenever bias_term is present
            blobs.append(_f32(mod.bias))
        self.emit(node, "Scale", [self.tensor(node.args[0], where)], Message({"scale_param": sp}) if len(sp) else None,
                  blobs, kind="scale", module=path, inplace_ok=True, **common)

    def eltwise(self, node: fx.Node, args: list, where: str, common: dict, op: str, coeffs: Sequence[float]) -> None:
        if len(args) != 2 or not all(isinstance(a, fx.Node) and isinstance(self.values.get(a), torch.Tensor) for a in args):
            raise CaffeExportError(f"{where}: only the sum of two tensors is supported (no constants, no broadcasting)")
        if op != "SUM" or (coeffs and any(c != 1.0 for c in coeffs)):
            raise CaffeExportError(f"{where}: Eltwise {op} with coefficients {tuple(coeffs)}: only a plain SUM is supported")
        a, b = (self.tensor(x, where) for x in args)
        sa, sb = self.shape(args[0]), self.shape(args[1])
        if sa != sb:
            raise CaffeExportError(f"{where}: adds shapes {sa} and {sb}; Eltwise needs equal shapes (no broadcasting)")
        self.emit(node, "Eltwise", [a, b], Message({"eltwise_param": {"operation": EnumValue("SUM")}}),
                  kind="eltwise", rule="sum", **common)

    def concat(self, node: fx.Node, tensors: list, dim: int, where: str, common: dict) -> None:
        ndim = len(common["shape"])
        dim = dim + ndim if dim < 0 else dim
        if dim != 1:
            raise CaffeExportError(f"{where}: concatenation along dim {dim}; the NVDLA compiler concatenates channels (dim 1) only")
        vals = [self.tensor(x, where) for x in tensors]
        self.emit(node, "Concat", vals, None, kind="concat", rule="max", **common)

    def softmax(self, node: fx.Node, dim: int, where: str, common: dict) -> None:
        ndim = len(common["shape"])
        dim = dim + ndim if dim < 0 else dim
        if dim != 1:
            raise CaffeExportError(f"{where}: softmax over dim {dim}; the NVDLA compiler's Softmax works over channels (dim 1)")
        self.emit(node, "Softmax", [self.tensor(node.args[0], where)], kind="softmax", rule="fixed", **common)

    def flatten(self, node: fx.Node, src: fx.Node, start: int, end: int, where: str, common: dict) -> None:
        in_shape = self.shape(src)
        x = self.tensor(src, where)
        nd = len(in_shape)
        start = start + nd if start < 0 else start
        end = end + nd if end < 0 else end
        if nd <= 2 and (start >= end or in_shape == common["shape"]):
            self.alias(node, x)
            return
        if start != 1 or end != nd - 1:
            raise CaffeExportError(f"{where}: flatten(start_dim={start}, end_dim={end}) of {in_shape}; only flattening "
                                   "everything after the batch dimension is supported")
        users = list(node.users)
        if users and all(u.op == "call_module" and isinstance(self.modules[u.target], nn.Linear) for u in users):
            self.alias(node, x)  # InnerProduct flattens its bottom (C order) by itself
            self.notes.append(f"{common['source']}: flatten feeding only InnerProduct layers dropped (Caffe flattens)")
            return
        self.emit(node, "Flatten", [x], None, kind="other", rule="producer", **common)

    def pooling(self, node: fx.Node, mod: nn.Module, where: str, common: dict) -> None:
        in_shape = self.shape(node.args[0])
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            method = "AVE" if isinstance(mod, nn.AdaptiveAvgPool2d) else "MAX"
            if isinstance(mod, nn.AdaptiveMaxPool2d) and mod.return_indices:
                raise CaffeExportError(f"{where}: return_indices is not supported")
            self.adaptive(node, method, mod.output_size, in_shape, where, common)
            return
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise CaffeExportError(f"{where}: return_indices is not supported")
            if _pair(mod.dilation) != (1, 1):
                raise CaffeExportError(f"{where}: dilated max pooling is not supported by Caffe")
            self.pool(node, "MAX", _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding),
                      mod.ceil_mode, True, in_shape, where, common)
        else:
            if mod.divisor_override:
                raise CaffeExportError(f"{where}: divisor_override is not supported by Caffe")
            self.pool(node, "AVE", _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding),
                      mod.ceil_mode, mod.count_include_pad, in_shape, where, common)

    def functional_pool(self, node: fx.Node, name: str, args: list, kwargs: dict, where: str, common: dict) -> None:
        names = {
            "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                           "divisor_override"),
            "adaptive_avg_pool2d": ("input", "output_size"),
            "adaptive_max_pool2d": ("input", "output_size", "return_indices"),
        }[name]
        defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                    "count_include_pad": True, "divisor_override": None}
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        if any(isinstance(v, fx.Node) for k, v in bound.items() if k != "input"):
            raise CaffeExportError(f"{where}: pooling parameters computed at run time are not supported")
        in_shape = self.shape(bound["input"])
        if name.startswith("adaptive"):
            self.adaptive(node, "AVE" if "avg" in name else "MAX", bound["output_size"], in_shape, where, common)
            return
        if bound.get("return_indices") or bound.get("divisor_override"):
            raise CaffeExportError(f"{where}: return_indices / divisor_override are not supported")
        if _pair(bound.get("dilation", 1)) != (1, 1):
            raise CaffeExportError(f"{where}: dilated max pooling is not supported by Caffe")
        kernel = _pair(bound["kernel_size"])
        stride = _pair(bound["stride"]) if bound["stride"] not in (None, [], ()) else kernel
        self.pool(node, "MAX" if name == "max_pool2d" else "AVE", kernel, stride, _pair(bound["padding"]),
                  bool(bound["ceil_mode"]), bool(bound["count_include_pad"]), in_shape, where, common)

    def adaptive(self, node: fx.Node, method: str, output_size: Any, in_shape: tuple[int, ...], where: str,
                 common: dict) -> None:
        out = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        out = tuple(in_shape[2 + i] if o is None else int(o) for i, o in enumerate(out))
        h, w = in_shape[2:]
        if h % out[0] or w % out[1]:
            raise CaffeExportError(f"{where}: adaptive pooling {h}x{w} -> {out[0]}x{out[1]} has uneven windows; "
                                   "Caffe pooling needs the input size to be a multiple of the output size")
        kernel = (h // out[0], w // out[1])
        stride = (1, 1) if out == (1, 1) else kernel
        self.pool(node, method, kernel, stride, (0, 0), False, True, in_shape, where, common)

    def pool(self, node: fx.Node, method: str, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
             ceil_mode: bool, count_include_pad: bool, in_shape: tuple[int, ...], where: str, common: dict) -> None:
        if len(in_shape) != 4:
            raise CaffeExportError(f"{where}: pooling a {len(in_shape)}-D tensor; only NCHW is supported")
        if method == "AVE" and not count_include_pad and any(pad):
            raise CaffeExportError(f"{where}: count_include_pad=False with padding; Caffe's average pooling always "
                                   "counts the padding")
        out_shape = common["shape"]
        caffe = tuple(caffe_pool_output_size(in_shape[2 + i], kernel[i], stride[i], pad[i]) for i in range(2))
        torch_out = tuple(out_shape[2:])
        x = self.tensor(node.args[0], where)
        if caffe == torch_out:
            self.emit(node, "Pooling", [x], self.pool_params(method, kernel, stride, pad), kind="pool", **common)
            return
        # Caffe rounds up where PyTorch rounds down: pool at stride 1 along the mismatched
        # axes (no rounding there), then subsample with a fixed identity 1x1 convolution.
        mismatch = tuple(c != t for c, t in zip(caffe, torch_out))
        for i in range(2):
            if mismatch[i] and (torch_out[i] - 1) * stride[i] + kernel[i] > in_shape[2 + i] + 2 * pad[i]:
                raise CaffeExportError(f"{where}: the last pooling window overhangs the padded input "
                                       f"(ceil_mode); Caffe cannot express it")
        s1 = tuple(1 if mismatch[i] else stride[i] for i in range(2))
        sub = tuple(stride[i] if mismatch[i] else 1 for i in range(2))
        mid_shape = (out_shape[0], out_shape[1],
                     *(caffe_pool_output_size(in_shape[2 + i], kernel[i], s1[i], pad[i]) for i in range(2)))
        pooled = self.emit(None, "Pooling", [x], self.pool_params(method, kernel, s1, pad), kind="pool",
                           source=common["source"], base=common["base"], shape=mid_shape, own_tap=common["own_tap"],
                           note=f"stride {s1} (PyTorch stride {stride}); {caffe} != PyTorch {torch_out} otherwise")
        channels = out_shape[1]
        weight = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
        p = Message()
        p.add("num_output", channels).add("kernel_size", 1)  # with a (zero) bias: the compiler crashes
        _spatial(p, "stride", sub, 1)  # without one when this conv feeds a conv and a sum (ResNet-18)
        zero_bias = np.zeros(channels, dtype=np.float32)
        sub_val = self.emit(node, "Convolution", [pooled], Message({"convolution_param": p}), [weight, zero_bias],
                            kind="conv",
                            source=common["source"] + " [subsampling]", base=common["base"] + "_subsample",
                            shape=out_shape, rule="producer",
                            note=f"fixed identity 1x1 convolution, stride {sub}: Caffe rounds pooled sizes up")
        sub_val.layer.subsample_of = pooled.layer
        pooled.layer.rule = "producer"  # NVDLA: a pool's entry is its producer's
        self.notes.append(f"{common['source']}: Caffe pools to {caffe}, PyTorch to {torch_out}: pooled at stride "
                          f"{s1} and subsampled by a fixed 1x1 convolution with stride {sub}")

    @staticmethod
    def pool_params(method: str, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> Message:
        p = Message()
        p.add("pool", EnumValue(method))
        if kernel[0] == kernel[1]:
            p.add("kernel_size", kernel[0])
        else:
            p.add("kernel_h", kernel[0]).add("kernel_w", kernel[1])
        if stride[0] == stride[1]:
            p.add("stride", stride[0])
        else:
            p.add("stride_h", stride[0]).add("stride_w", stride[1])
        if pad[0] == pad[1]:
            if pad[0]:
                p.add("pad", pad[0])
        else:
            p.add("pad_h", pad[0]).add("pad_w", pad[1])
        return Message({"pooling_param": p})

    def pad_shortcut(self, node: fx.Node, mod: nn.Module, where: str, common: dict, path: str) -> None:
        in_shape = self.shape(node.args[0])
        cin, cout, stride = int(mod.in_planes), int(mod.out_planes), int(mod.stride)
        if in_shape[1] != cin:
            raise CaffeExportError(f"{where}: input has {in_shape[1]} channels, the shortcut expects {cin}")
        before = (cout - cin) // 2
        weight = np.zeros((cout, cin, 1, 1), dtype=np.float32)
        weight[np.arange(cin) + before, np.arange(cin), 0, 0] = 1.0
        p = Message()
        p.add("num_output", cout).add("bias_term", False).add("kernel_size", 1)
        if stride != 1:
            p.add("stride", stride)
        self.emit(node, "Convolution", [self.tensor(node.args[0], where)], Message({"convolution_param": p}), [weight],
                  kind="conv", module=path, note=f"option-A shortcut as a fixed 1x1 convolution (stride {stride}, "
                  f"channels {cin} -> {cout}, {before} zero channels first)", **common)
        self.notes.append(f"{common['source']}: option-A shortcut written as a fixed 1x1 Convolution "
                          f"(stride {stride}, identity into channels {before}..{before + cin - 1} of {cout})")


# ---------------------------------------------------------------------------------------
# Naming, ordering, blobs
# ---------------------------------------------------------------------------------------


def _preset_names(model: nn.Module, names: str) -> tuple[str, dict[str, str], list[str]]:
    """(preset, tap -> name, preset name order) for ``names`` (``auto`` or a preset)."""
    from ..nvdla.naming import PRESETS, NvdlaNames, detect_preset

    preset = detect_preset(model) if names == "auto" else names
    if preset not in PRESETS:
        raise CaffeExportError(f"unknown naming preset {names!r}; choose auto or one of {', '.join(PRESETS)}")
    if preset == "generic":
        return preset, {}, []
    nv = NvdlaNames.for_model(model, preset)
    return preset, nv.tap_to_name(), nv.names()


def _name_tap(val: _Val, preset_map: Mapping[str, str], own: str | None) -> str | None:
    """The tap a layer is named after: one the preset names, else the call's own (None: name the op)."""
    for t in val.taps:
        if t in preset_map:
            return t
    return own


def _range_tap(val: _Val, preset_map: Mapping[str, str], own: str | None) -> str | None:
    """The tap whose range is the layer's entry: a preset-named one, its own call's, else any tap
    observing the same tensor (a pass-through module's output, a consumer's ``:input``)."""
    for t in val.taps:
        if t in preset_map:
            return t
    if own is not None:
        return own
    outs = [t for t in val.taps if not t.endswith(":input")]
    return (outs or val.taps or [None])[0]


def _order(layers: list[_Layer], priority: Mapping[str, int]) -> list[_Layer]:
    """A topological order of ``layers`` that follows ``priority`` (preset order) where it can."""
    if not priority:
        return layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    key: dict[int, tuple[float, int]] = {}
    last = -1.0
    for i, layer in enumerate(layers):
        p = priority.get(layer.name)
        if p is not None:
            last = float(p)
            key[id(layer)] = (float(p), i)
        else:
            key[id(layer)] = (last + 0.5, i)
    deps = {id(layer): {id(b.layer) for b in layer.bottoms if b.layer is not None} for layer in layers}
    users: dict[int, list[_Layer]] = {}
    for layer in layers:
        for d in deps[id(layer)]:
            users.setdefault(d, []).append(layer)
    pending = {k: len(v) for k, v in deps.items()}
    heap = [(key[id(layer)], index[id(layer)], layer) for layer in layers if not pending[id(layer)]]
    heapq.heapify(heap)
    out: list[_Layer] = []
    while heap:
        _, _, layer = heapq.heappop(heap)
        out.append(layer)
        for u in users.get(id(layer), []):
            pending[id(u)] -= 1
            if not pending[id(u)]:
                heapq.heappush(heap, (key[id(u)], index[id(u)], u))
    return out if len(out) == len(layers) else layers


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaffeConversion:
    """A model converted to Caffe layers, verified, not yet written.

    Attributes:
        net: the Caffe net; its layers carry their blobs (float32 weights).
        layers: one :class:`CaffeLayerInfo` per layer, prototxt order.
        selection: the taps a calibration must observe so every layer has a range
            (pass ``taps=conversion.selection`` to :func:`~torch_nvdla.calibrate`).
        preset: the naming preset used (``"caffe-lenet"``, ``"resnet-caffe"``, ``"generic"``).
        input_shape: the Input layer's shape.
        notes: the rewrites made (dropped flattens, subsampled pools, option-A shortcuts).
        max_abs_diff: largest |Caffe - PyTorch| over the model output(s) on the example
            input (``nan`` when not verified).
        output_max_abs: largest |PyTorch output| on it (the scale of ``max_abs_diff``).
    """

    net: CaffeNet
    layers: tuple[CaffeLayerInfo, ...]
    selection: TapSelection
    preset: str
    input_shape: tuple[int, ...]
    notes: tuple[str, ...] = ()
    max_abs_diff: float = float("nan")
    output_max_abs: float = float("nan")

    def prototxt_text(self) -> str:
        """The deploy prototxt (no blobs)."""
        return _deploy_net(self.net).to_text()

    def caffemodel_bytes(self) -> bytes:
        """The binary caffemodel (every layer with its name, type, bottoms, tops, params, blobs)."""
        from ..caffe.caffemodel import encode_caffemodel

        return encode_caffemodel(self.net.name, self.net.layers)

    def layer_names(self) -> list[str]:
        """The layer names, prototxt order (= calib.json keys)."""
        return [info.name for info in self.layers]

    def nvdla_names(self, table=None):
        """:class:`~torch_nvdla.nvdla.naming.NvdlaNames` with one entry per layer, ranges per the layer rules.

        Layers measured by a tap keep it; the others get a fixed amax computed from
        ``table`` (their rule); without a table they keep no source.

        Raises:
            CaffeExportError: ``table`` lacks a tap a layer needs (names the layers and
                the selection to calibrate with).
        """
        from ..nvdla.naming import SOFTMAX_AMAX, LayerName, NvdlaNames

        amax: dict[str, float] = {}
        out = []
        missing = []
        for info in self.layers:
            if info.rule == "tap" or info.tap is not None:
                tap = info.tap
                if table is not None:
                    if tap not in table:
                        missing.append(f"{info.name} (tap {tap!r})")
                        continue
                    amax[info.name] = float(table[tap].amax)
                    if info.note == RELU6_NOTE and amax[info.name] > RELU6_CAP:
                        amax[info.name] = RELU6_CAP  # ReLU6 never exceeds it: the entry saturates there
                        out.append(LayerName(name=info.name, amax=RELU6_CAP, kind=info.kind, inputs=info.inputs,
                                             note=info.note))
                        continue
                out.append(LayerName(name=info.name, tap=tap, kind=info.kind, inputs=info.inputs,
                                     note=info.note))
                continue
            value: float | None = None
            note = ""
            if table is not None:
                ins = [amax.get(i) for i in info.inputs]
                if info.rule == "fixed":
                    value, note = SOFTMAX_AMAX, "softmax output lies in [0, 1]"
                elif any(v is None for v in ins) or not ins:
                    missing.append(f"{info.name} (its inputs have no range)")
                    continue
                elif info.rule == "producer" and info.note == RELU6_NOTE:
                    value, note = min(ins[0], RELU6_CAP), f"no tap: range of its input {info.inputs[0]}, at most 6"
                elif info.rule == "producer":
                    value, note = ins[0], f"no tap: range of its input {info.inputs[0]} (an upper bound)"
                elif info.rule == "sum":
                    value, note = float(sum(ins)), "no tap: sum of its inputs' ranges (an upper bound)"
                elif info.rule == "max":
                    value, note = float(max(ins)), "no tap: largest input range"
                amax[info.name] = value  # type: ignore[assignment]
            elif info.rule == "fixed":
                value, note = SOFTMAX_AMAX, "softmax output lies in [0, 1]"
            out.append(LayerName(name=info.name, amax=value, kind=info.kind, inputs=info.inputs, note=note))
        if missing:
            raise CaffeExportError(
                f"{len(missing)} Caffe layer(s) have no range in the calibration table: {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else "")
                + "; calibrate with taps=convert_to_caffe(model, ...).selection (or caffe_tap_selection(model, shape))"
            )
        return NvdlaNames(layers=out, selection=self.selection, preset=self.preset)


def _deploy_net(net: CaffeNet) -> CaffeNet:
    return CaffeNet(net.name, [CaffeLayer(l.name, l.type, l.bottoms, l.tops, l.params) for l in net.layers])


def _example(model: nn.Module, input_shape: Sequence[int] | None, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise CaffeExportError(f"example_input must be a tensor, got {type(example_input).__name__}")
        x = example_input.detach()
        if input_shape is not None and tuple(x.shape) != tuple(input_shape):
            raise CaffeExportError(f"example_input has shape {tuple(x.shape)}, input_shape says {tuple(input_shape)}")
    else:
        if input_shape is None:
            raise CaffeExportError("give input_shape=(N, C, H, W) (the Input layer's shape) or example_input=")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 4 or any(d < 1 for d in shape):
            raise CaffeExportError(f"input_shape must be 4 positive integers (N, C, H, W), got {input_shape!r}")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
    device = next(iter(model.parameters()), torch.empty(0)).device
    dtype = next(iter(model.parameters()), torch.empty(0, dtype=torch.float32)).dtype
    return x.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)


def convert_to_caffe(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    names: str = "auto",
    overrides: Mapping[str, str] | None = None,
    net_name: str | None = None,
    verify: bool = True,
    rtol: float = RTOL,
    fold_batchnorm: bool = False,
) -> CaffeConversion:
    """Convert ``model`` to Caffe layers (in memory) and verify them against PyTorch.

    Args:
        model: the model; left as it was (eval mode only during the call).
        input_shape: ``(N, C, H, W)`` of the Input layer; a seeded random input of that
            shape drives tracing and verification.
        example_input: a real input instead (its shape is the Input shape).
        names: ``"auto"`` (:func:`~torch_nvdla.nvdla.naming.detect_preset`) or a preset of
            :data:`~torch_nvdla.nvdla.naming.PRESETS`; ``"generic"`` names every layer after its tap.
        overrides: tap or layer name -> layer name, applied last.
        net_name: the Caffe net name (default: the model's class name).
        verify: rebuild the written net with :func:`~torch_nvdla.caffe.importer.import_caffe`
            and compare every layer with PyTorch (recommended).
        rtol: verification tolerance relative to each tensor's largest magnitude.
        fold_batchnorm: write a BatchNorm that is a convolution's only reader into the
            convolution's weights and bias (:func:`~torch_nvdla.nvdla.weights.fold_batchnorm`,
            what the compiler's fast-math profile does itself): no ``BatchNorm`` / ``Scale``
            layers, so no ``<bn>:normalized`` taps are needed (a default calibration has
            every range), and the basic profile has no near-zero Scale values to drop.

    Returns:
        A :class:`CaffeConversion`.

    Raises:
        CaffeExportError: an unsupported module or function (named, with its type), a
            shape Caffe cannot produce, or a verification mismatch (names the layer).
    """
    if not isinstance(model, nn.Module):
        raise CaffeExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = _example(model, input_shape, example_input)
    with torch.no_grad(), eval_mode(model):
        gm, tracer = _trace(model)
        rec = _Recorder(gm)
        try:
            traced_out = rec.run(x)
            ref_out = model(x)
        except Exception as exc:  # the model's own error, whatever its type
            raise CaffeExportError(f"{type(model).__name__} does not run on an input of shape {tuple(x.shape)}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    _check_trace(traced_out, ref_out, type(model).__name__)
    conv = _Converter(model, gm, tracer, rec.values, fold_batchnorm=fold_batchnorm)
    conv.run()
    preset, preset_map, preset_order = _preset_names(model, names)

    layers = _live(conv.layers, conv.outputs)
    # names: preset name of the chosen tap, else the generic name of the tap / op
    from ..nvdla.naming import generic_layer_name, unique_name

    used: set[str] = set()
    overrides = dict(overrides or {})
    matched: set[str] = set()
    chosen_tap: dict[int, str | None] = {}
    subsampled = {id(layer.subsample_of) for layer in layers if layer.subsample_of is not None}
    for layer in layers:
        if layer.subsample_of is not None:
            continue
        tap = layer.fixed_tap or _name_tap(layer.out, preset_map, layer.own_tap)
        # a stride-1 pooling before its subsampling is named after the pool's tap but measured
        # by none: its entry is its producer's (the NVDLA pool rule)
        chosen_tap[id(layer)] = None if id(layer) in subsampled else (
            layer.fixed_tap or _range_tap(layer.out, preset_map, layer.own_tap))
        name = preset_map.get(tap) if tap is not None else None
        if name is None:
            name = generic_layer_name(tap) if tap is not None else generic_layer_name(layer.base)
        for key in (tap, name):
            if key is not None and key in overrides:
                matched.add(key)
                name = overrides[key]
                break
        if not isinstance(name, str) or not name:
            raise CaffeExportError(f"layer name override for {tap or layer.base!r} must be a non-empty string")
        layer.name = unique_name(name, used)
    for layer in layers:
        pooled = layer.subsample_of
        if pooled is not None:
            chosen_tap[id(layer)] = _range_tap(layer.out, preset_map, pooled.own_tap)
            layer.name = unique_name(f"{pooled.name}_subsample", used)
    unmatched = sorted(set(overrides) - matched)
    if unmatched:
        raise CaffeExportError(f"name overrides matched no tap and no layer: {', '.join(unmatched)}")
    layers = _order(layers, {n: i for i, n in enumerate(preset_order)})

    net, infos, selection = _assemble(layers, conv.outputs, chosen_tap, net_name or type(model).__name__)
    result = CaffeConversion(net, tuple(infos), selection, preset, tuple(x.shape), tuple(dict.fromkeys(conv.notes)))
    if verify:
        diff, scale = _verify(result, layers, rec.values, x, ref_out, rtol)
        result = CaffeConversion(net, tuple(infos), selection, preset, tuple(x.shape), result.notes, diff, scale)
    return result


def _check_trace(traced: Any, ref: Any, what: str) -> None:
    a = traced if isinstance(traced, (tuple, list)) else (traced,)
    b = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(a) != len(b) or not all(isinstance(t, torch.Tensor) for t in (*a, *b)):
        raise CaffeExportError(f"{what}: the model must return a tensor or a tuple of tensors")
    for u, v in zip(a, b):
        if u.shape != v.shape or not torch.allclose(u, v, rtol=1e-5, atol=1e-6 * float(v.abs().max() or 1.0)):
            raise CaffeExportError(f"{what}: the torch.fx trace computes something else than the model "
                                   "(data-dependent control flow?); cannot export")


def _live(layers: list[_Layer], outputs: list[_Val]) -> list[_Layer]:
    """Drop layers nothing downstream uses (Caffe would make their tops extra outputs)."""
    alive: set[int] = set()
    stack = [v.layer for v in outputs if v.layer is not None]
    while stack:
        layer = stack.pop()
        if id(layer) in alive:
            continue
        alive.add(id(layer))
        stack.extend(b.layer for b in layer.bottoms if b.layer is not None)
    inputs = [layer for layer in layers if layer.type == "Input"]
    return [layer for layer in layers if id(layer) in alive or layer in inputs]


def _assemble(layers: list[_Layer], outputs: list[_Val], chosen_tap: Mapping[int, str | None], net_name: str
              ) -> tuple[CaffeNet, list[CaffeLayerInfo], TapSelection]:
    consumers: dict[int, int] = {}
    for layer in layers:
        for b in layer.bottoms:
            consumers[id(b)] = consumers.get(id(b), 0) + 1
    out_ids = {id(v) for v in outputs}
    blob: dict[int, str] = {}
    caffe_layers: list[CaffeLayer] = []
    infos: list[CaffeLayerInfo] = []
    input_taps: list[str] = []
    normalized = False
    for layer in layers:
        bottoms = [blob[id(b)] for b in layer.bottoms]
        in_place = (layer.inplace_ok and len(layer.bottoms) == 1 and layer.bottoms[0].layer is not None
                    and layer.bottoms[0].layer.type != "Input" and consumers.get(id(layer.bottoms[0]), 0) == 1
                    and id(layer.bottoms[0]) not in out_ids)
        top = bottoms[0] if in_place else layer.name
        blob[id(layer.out)] = top
        caffe_layers.append(CaffeLayer(layer.name, layer.type, bottoms, [top], layer.params, layer.blobs))
        tap = chosen_tap.get(id(layer))
        if tap is not None and tap.endswith(":input"):
            input_taps.append(tap[: -len(":input")])
        if tap is not None and tap.endswith(":normalized"):
            normalized = True
        rule = "tap" if tap is not None else layer.rule
        if rule == "tap" and tap is None:  # a module output no tap observes (should not happen)
            rule = "producer"
        infos.append(CaffeLayerInfo(layer.name, layer.type, layer.kind, layer.source, tuple(bottoms), (top,),
                                    tuple(b.layer.name for b in layer.bottoms if b.layer is not None),
                                    tuple(layer.out.shape), tap, rule, layer.note))
    selection = TapSelection(inputs=tuple(dict.fromkeys(input_taps)), derived=(BN_NORMALIZED,) if normalized else ())
    return CaffeNet(net_name, caffe_layers), infos, selection


def _verify(conv: CaffeConversion, layers: list[_Layer], values: Mapping[fx.Node, Any], x: torch.Tensor,
            ref_out: Any, rtol: float) -> tuple[float, float]:
    """Parse the files back, rebuild them in PyTorch, compare layer by layer and the outputs."""
    from ..caffe.caffemodel import decode_caffemodel

    text = conv.prototxt_text()
    data = conv.caffemodel_bytes()
    try:
        deploy = parse_prototxt(text)
        weights = decode_caffemodel(data, "<model.caffemodel>")
        module = build_module(deploy, weights, source="<deploy.prototxt>")
    except (CaffeImportError, TorchNvdlaError) as exc:
        raise CaffeExportError(f"the exported net does not read back: {exc}") from exc
    for info in conv.layers:  # a ReLU6's cap is the INT8 saturation of its entry: model it here
        if info.note == RELU6_NOTE:
            setattr(module, module.module_names[info.name], nn.ReLU6())
    xs = x.detach().to("cpu", torch.float32)
    with torch.no_grad():
        tops: dict[str, torch.Tensor] = {}
        outs = module._run((xs,), tops)
    by_name = {layer.name: layer for layer in layers}
    for info in conv.layers:
        layer = by_name[info.name]
        node = layer.out.node if layer.out is not None else None
        got = tops.get(info.name)
        if got is None:
            continue
        if tuple(got.shape) != tuple(info.shape):
            raise CaffeExportError(f"layer {info.name!r} ({info.type}, from {info.source}): Caffe computes shape "
                                   f"{tuple(got.shape)}, expected {tuple(info.shape)}")
        if node is None or not isinstance(values.get(node), torch.Tensor):
            continue
        want = values[node].detach().to("cpu", torch.float32)
        if tuple(want.shape) != tuple(got.shape):
            continue  # an elided flatten: the Caffe blob is the unflattened tensor
        err = float((got - want).abs().max()) if want.numel() else 0.0
        scale = float(want.abs().max()) if want.numel() else 0.0
        if err > rtol * max(scale, 1e-6) + 1e-6:
            raise CaffeExportError(f"layer {info.name!r} ({info.type}, from {info.source}): Caffe differs from PyTorch "
                                   f"by {err:.3g} (largest value {scale:.3g}); the export would be wrong")
    a = outs
    b = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    if len(a) != len(b):
        raise CaffeExportError(f"the Caffe net has {len(a)} output(s) ({', '.join(module.output_names)}), "
                               f"the model {len(b)}")
    diff, scale = 0.0, 0.0
    for u, v in zip(a, b):
        v = v.detach().to("cpu", torch.float32)
        if u.shape != v.shape:
            raise CaffeExportError(f"output shape {tuple(u.shape)} differs from the model's {tuple(v.shape)}")
        diff = max(diff, float((u - v).abs().max()))
        scale = max(scale, float(v.abs().max()))
    if diff > rtol * max(scale, 1e-6) + 1e-6:
        raise CaffeExportError(f"the Caffe net's output differs from the model's by {diff:.3g} (largest value {scale:.3g})")
    return diff, scale


def caffe_tap_selection(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                        example_input: torch.Tensor | None = None, names: str = "auto",
                        fold_batchnorm: bool = False) -> TapSelection:
    """The taps a calibration must observe so :func:`export_caffe` finds every layer's range.

    The BatchNorm halves (``<bn>:normalized``) and the inputs of modules fed by a
    functional op (a residual sum read as ``<relu>#k:input``). Pass it as
    ``calibrate(model, loader, taps=...)``.
    """
    return convert_to_caffe(model, input_shape, example_input=example_input, names=names, verify=False,
                            fold_batchnorm=fold_batchnorm).selection


@dataclass(frozen=True)
class CaffeExport:
    """What :func:`export_caffe` wrote.

    Attributes:
        prototxt: the ``deploy.prototxt``.
        caffemodel: the ``.caffemodel``.
        calib_json: the calib.json (``None`` when no table was given).
        conversion: the :class:`CaffeConversion` (layers, notes, verification).
        scales: layer -> scale written to calib.json (empty without a table).
        calib_report: the :class:`~torch_nvdla.nvdla.calibjson.ExportReport` (rule changes,
            findings), or ``None``.
    """

    prototxt: Path
    caffemodel: Path
    calib_json: Path | None
    conversion: CaffeConversion
    scales: dict[str, float] = field(default_factory=dict)
    calib_report: Any = None

    def print(self, limit: int | None = None) -> None:
        """The layers (name, type, bottoms -> tops, shape, scale, source) as a rich table on stdout."""
        from rich.table import Table

        from ..utils.report import stdout

        t = Table(title=f"{self.prototxt.parent}: {len(self.conversion.layers)} Caffe layers "
                        f"(preset {self.conversion.preset})")
        for col, kw in [("#", {"justify": "right"}), ("layer", {}), ("type", {}), ("bottom -> top", {}),
                        ("shape", {}), ("scale", {"justify": "right"}), ("range from", {}), ("PyTorch", {})]:
            t.add_column(col, **kw)
        sources = self.calib_report.ranges.resolution.sources if self.calib_report is not None else {}
        infos = list(self.conversion.layers)
        shown = infos if limit is None else infos[:limit]
        for i, info in enumerate(shown):
            s = self.scales.get(info.name)
            t.add_row(str(i), info.name, info.type, f"{', '.join(info.bottoms) or '-'} -> {', '.join(info.tops)}",
                      "x".join(map(str, info.shape)), "" if s is None else f"{s:.5g}",
                      sources.get(info.name, info.tap or info.rule), info.source)
        if len(shown) < len(infos):
            t.add_row("…", f"{len(infos) - len(shown)} more", "", "", "", "", "", "")
        stdout.print(t)


def export_caffe(
    model: nn.Module,
    table,
    out_dir: str | os.PathLike,
    *,
    input_shape: Sequence[int] | None = None,
    example_input: torch.Tensor | None = None,
    names: str = "auto",
    overrides: Mapping[str, str] | None = None,
    net_name: str | None = None,
    eltwise: str = "report",
    prototxt_name: str = "deploy.prototxt",
    caffemodel_name: str = "model.caffemodel",
    calib_name: str = "calib.json",
    verify: bool = True,
    rtol: float = RTOL,
    target: str = "nv_full",
    fold_batchnorm: bool = False,
    conversion: "CaffeConversion | None" = None,
) -> CaffeExport:
    """Write ``deploy.prototxt``, ``model.caffemodel`` and ``calib.json`` for the NVDLA compiler.

    Args:
        model: the PyTorch model (see the module docstring for what is supported).
        table: its :class:`~torch_nvdla.CalibrationTable`, calibrated with (at least)
            ``taps=caffe_tap_selection(model, input_shape)``; ``None`` writes no calib.json.
        out_dir: the folder (created if needed).
        input_shape: ``(N, C, H, W)`` of the Input layer.
        example_input: a real input for tracing and verification instead.
        names: naming preset (``"auto"``, ``"caffe-lenet"``, ``"resnet-caffe"``, ``"generic"``).
        overrides: tap or layer name -> layer name.
        net_name: the net name (default: the model's class name).
        eltwise: ``"report"`` or ``"unify"`` element-wise inputs with different ranges
            (see :func:`~torch_nvdla.nvdla.calibjson.export_calib_json`).
        prototxt_name, caffemodel_name, calib_name: file names inside ``out_dir``. The
            compiler lowercases the calib.json path: upper-case letters are reported.
        verify: compare the re-read Caffe net with PyTorch layer by layer before writing.
        rtol: verification tolerance.

        target: the compiler's ``--configtarget``; layers it cannot run are refused
            (:func:`~torch_nvdla.nvdla.rules.hardware_issues`: a pooling kernel above 8,
            LUT activations, PROD / MAX sums, ...).
        fold_batchnorm: fold each BatchNorm into the convolution before it (see
            :func:`convert_to_caffe`); a default ``calibrate(model, loader)`` table then
            has every range the export needs.
        conversion: a :func:`convert_to_caffe` of this model already made (e.g. for
            ``conversion.selection`` before calibrating): written as it is, not converted
            again (the naming and verification options are then its own).

    Returns:
        A :class:`CaffeExport`.

    Raises:
        CaffeExportError: unsupported modules / functions, verification mismatches, or a
            table without a range some layer needs; nothing is written.
        CalibrationError: calib.json rules (a scale the compiler cannot represent);
            nothing is written.
    """
    from ..nvdla.calibjson import export_calib_json

    if conversion is None:
        conversion = convert_to_caffe(model, input_shape, example_input=example_input, names=names,
                                      overrides=overrides, net_name=net_name, verify=verify, rtol=rtol,
                                      fold_batchnorm=fold_batchnorm)
    from ..nvdla.rules import hardware_issues

    blocking = [i for i in hardware_issues(conversion.net, target) if i.level == "error"]
    if blocking:
        raise CaffeExportError(
            f"{len(blocking)} layer(s) the NVDLA compiler cannot run on {target}, nothing was written: "
            + "; ".join(f"{i.layer}: {i.message}" for i in blocking[:5]))
    nv = conversion.nvdla_names(table) if table is not None else None
    text = conversion.prototxt_text()
    data = conversion.caffemodel_bytes()
    out = Path(out_dir)
    final = {"prototxt": out / prototxt_name, "caffemodel": out / caffemodel_name}
    if table is not None:
        final["calib"] = out / calib_name
    if len({p.name for p in final.values()}) != len(final):
        raise CaffeExportError(f"the output file names collide: {', '.join(p.name for p in final.values())}")
    report = None
    from ..utils.io import atomic_write_bytes, atomic_write_text, publish_together

    with publish_together():  # the three files appear together, or none of them
        atomic_write_text(final["prototxt"], text)
        atomic_write_bytes(final["caffemodel"], data)
        if table is not None:
            report = export_calib_json(table, final["calib"], nv, eltwise=eltwise, show=False)
    if report is not None:
        from ..utils.console import say

        for f in report.findings:
            if f.rule == "uppercase-path":
                say(f"[yellow]warning:[/] {f.message}")
    scales = dict(report.scales) if report is not None else {}
    if report is not None:
        report = dataclasses.replace(report, path=final["calib"])
    return CaffeExport(final["prototxt"], final["caffemodel"], final.get("calib"), conversion, scales, report)


def _conv_param(num_output: int, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                group: int, bias: bool, dilation: int = 1) -> Message:
    """A ``convolution_param`` (Convolution and Deconvolution): non-square sizes as ``*_h`` /
    ``*_w`` fields, defaults left out."""
    p = Message()
    p.add("num_output", num_output)
    if not bias:
        p.add("bias_term", False)
    _spatial(p, "pad", pad, 0)
    if kernel[0] == kernel[1]:
        p.add("kernel_size", kernel[0])
    else:
        p.add("kernel_h", kernel[0]).add("kernel_w", kernel[1])
    _spatial(p, "stride", stride, 1)
    if group != 1:
        p.add("group", group)
    if dilation != 1:
        p.add("dilation", dilation)
    return p


def _function_kind(target: Any, name: str) -> str | None:
    """The kind of a traced function call (``add``, ``relu``, ...), or None when unsupported."""
    if target in (operator.add, operator.iadd, torch.add) or name in ("add", "add_", "__add__", "__iadd__"):
        return "add"
    if target in (F.relu, torch.relu, torch.relu_) or name in ("relu", "relu_"):
        return "relu"
    if target in (F.relu6, F.hardtanh) or name in ("relu6", "hardtanh", "hardtanh_"):
        return "relu6"
    if target is torch.flatten or name == "flatten":
        return "flatten"
    if name in ("view", "reshape") or target is torch.reshape:
        return "reshape"
    if target in (torch.cat, getattr(torch, "concat", None), getattr(torch, "concatenate", None)):
        return "cat"
    if target in (F.softmax, torch.softmax) or name == "softmax":
        return "softmax"
    if name in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return "pool"
    if target is F.dropout or name in ("dropout", "contiguous", "clone", "detach", "float"):
        return "identity"
    return None


#: Function kind -> the converter method that writes it.
_FUNCTION_HANDLERS = {
    "add": _Converter.fn_add, "relu": _Converter.fn_relu, "relu6": _Converter.fn_relu6, "flatten": _Converter.fn_flatten,
    "reshape": _Converter.fn_reshape, "cat": _Converter.fn_cat, "softmax": _Converter.fn_softmax,
    "pool": _Converter.fn_pool, "identity": _Converter.fn_identity,
}
