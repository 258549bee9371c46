"""INT8 simulation of a calibrated model: fake-quant and NVDLA integer arithmetic.

Design notes and the facts behind them: ``docs/sim.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..caffe.shapes import caffe_pool_output_size
from ..calib.taps import (
    CallSites,
    TapSelection,
    TensorMemo,
    first_tensor,
    leaf_modules,
    tensor_args,
)
from ..errors import CalibrationError
from ..model.batch import call_args
from ..model.state import eval_mode, model_fingerprint
from ..nvdla.naming import PAD_SHORTCUT
from ..nvdla.requant import avgpool_q16, emulator_softmax, multiplier_shift, rescale_ratio
from ..nvdla.weights import (
    BIAS_LEFT_SHIFT_MAX,
    bias_int16_shift,
    fold_batchnorm,
    quantize_bias,
    quantize_weight,
)

__all__ = [
    "DATA",
    "MISSING_POLICIES",
    "MODES",
    "PLACEMENTS",
    "WEIGHT_MODES",
    "CallNode",
    "Layer",
    "LayerRequant",
    "Simulation",
    "SimulationConfig",
    "SimulationPlan",
    "compare_modes",
    "int8_simulation",
    "plan_simulation",
    "simulation_taps",
]

MODES = ("fake", "nvdla")
PLACEMENTS = ("all", "nvdla", "modelopt")
WEIGHT_MODES = ("per-kernel", "per-filter")
MISSING_POLICIES = ("error", "fp32")
#: Producer id of the model input (the ``data`` tap).
DATA = -1

_PASS_TYPES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
               nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_MAXPOOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d)
_SOFTMAX_TYPES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
_WEIGHTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CALL_KINDS = ("conv", "fc", "bn", "relu", "add", "maxpool", "avgpool", "softmax", "pass", "generic", "opaque")
_LAYER_KINDS = ("conv", "fc", "eltwise", "relu", "maxpool", "avgpool", "softmax", "float")
#: Layer kinds that end in a rescaling converter (they can write at any scale).
_RESCALING = ("conv", "fc", "eltwise", "relu", "float")


def _model_input(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> torch.Tensor | None:
    """The model input, as the ``data`` tap sees it: the first tensor argument (keywords last)."""
    return first_tensor(tuple(args) + tuple((kwargs or {}).values()))


# ------------------------------------------------------------------------------------------
# Configuration and plan
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRequant:
    """One layer's integer requantization (see :meth:`Simulation.requantization`).

    Attributes:
        layer: the layer (its first tap).
        kind: ``conv``, ``fc``, ``eltwise`` or ``relu``.
        m: the int16 multiplier, or one per output channel (per-filter).
        t: the right shift.
        bias: ``(int16 values per channel, left shift)`` for a conv / fc with a bias.
        s_in, s_out: the input and output scales the ratio is made of.
        s_w: the weight scale (one per filter in per-filter mode); 1 for a sum or a ReLU.
    """

    layer: str
    kind: str
    m: int | tuple[int, ...]
    t: int
    bias: tuple[tuple[int, ...], int] | None = None
    s_in: float = 0.0
    s_out: float = 0.0
    s_w: float | tuple[float, ...] = 1.0


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """Options of an INT8 simulation.

    Attributes:
        mode: ``"fake"`` (quantize-dequantize) or ``"nvdla"`` (integer arithmetic).
        weights: ``"per-kernel"`` (one weight scale per layer, the compiler's default)
            or ``"per-filter"`` (one per output channel).
        placement: which tensors are quantized (``"all"``, ``"nvdla"``, ``"modelopt"``);
            ``None``: ``"all"`` for fake-quant, ``"nvdla"`` for integer mode (the only one
            it supports).
        missing: a tap the simulation needs is not in the table: ``"error"`` (raise,
            naming every such tap and its layer) or ``"fp32"`` (run those layers in FP32).
        check_model: refuse a table calibrated for another model (different structure
            fingerprint, tap types or tap names).
    """

    mode: str = "fake"
    weights: str = "per-kernel"
    placement: str | None = None
    missing: str = "error"
    check_model: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CalibrationError(f"unknown simulation mode {self.mode!r}; choose one of {', '.join(MODES)}")
        w = str(self.weights).strip().lower().replace("_", "-")
        if w not in WEIGHT_MODES:
            raise CalibrationError(f"unknown weight mode {self.weights!r}; choose one of {', '.join(WEIGHT_MODES)}")
        object.__setattr__(self, "weights", w)
        placement = self.placement or ("all" if self.mode == "fake" else "nvdla")
        if placement not in PLACEMENTS:
            raise CalibrationError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.mode == "nvdla" and placement != "nvdla":
            raise CalibrationError(
                f"mode='nvdla' simulates the NVDLA graph only (placement='nvdla'), got placement={placement!r}"
            )
        object.__setattr__(self, "placement", placement)
        if self.missing not in MISSING_POLICIES:
            raise CalibrationError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {self.missing!r}")


@dataclass(frozen=True, kw_only=True)
class CallNode:
    """One leaf-module call of a forward pass, as the discovery pass saw it.

    Attributes:
        index: position in call order.
        tap: its tap name (``path`` or ``path#k``).
        path: the module path.
        call: which call of that module (0-based).
        module_type: the module's class name.
        kind: ``conv``, ``fc``, ``bn``, ``relu``, ``add``, ``maxpool``, ``avgpool``,
            ``softmax``, ``pass`` (value-preserving), ``generic`` or ``opaque`` (output
            not a floating tensor).
        producers: per tensor argument, the producing call's index, :data:`DATA` for the
            model input, or ``None`` when unknown (a functional op made it).
        consumers: indices of the calls that read its output.
        is_output: its output is (part of) the model's output.
        shape: its output shape on the discovery batch.
        subsampled: a max pool whose Caffe output size (rounded up) differs from
            PyTorch's: the export writes it as a stride-1 pool plus a fixed 1x1 strided
            convolution, a layer that requantizes (and can be given another scale).
    """

    index: int
    tap: str
    path: str
    call: int
    module_type: str
    kind: str
    producers: tuple[int | None, ...]
    consumers: tuple[int, ...]
    is_output: bool
    shape: tuple[int, ...]
    subsampled: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _CALL_KINDS:
            raise CalibrationError(f"call {self.tap!r}: unknown kind {self.kind!r}")


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One operation of the simulated NVDLA graph; it turns INT8 (or stays FP32) as a whole.

    Attributes:
        name: the head call's tap (``layer1.0.conv1``).
        kind: ``conv``, ``fc``, ``eltwise``, ``relu``, ``maxpool``, ``avgpool``, ``softmax``
            (the runtime's CPU emulator, INT8 in and out) or ``float`` (an op NVDLA does not
            have, run in float with its output quantized).
        calls: indices of its calls, head first (conv, then fused BN and ReLU).
        taps: their taps.
        input_taps: per input, the table entry whose scale it is read at (``None``: none).
        output_tap: the table entry whose scale it writes at (``None``: float output).
        integer_exact: whether ``mode="nvdla"`` computes it with NVDLA's integer rules.
        notes: what is special about it.
    """

    name: str
    kind: str
    calls: tuple[int, ...]
    taps: tuple[str, ...]
    input_taps: tuple[str | None, ...]
    output_tap: str | None
    integer_exact: bool = True
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _LAYER_KINDS:
            raise CalibrationError(f"layer {self.name!r}: unknown kind {self.kind!r}")
        if not self.calls or len(self.calls) != len(self.taps):
            raise CalibrationError(f"layer {self.name!r}: {len(self.calls)} calls for {len(self.taps)} taps")

    @property
    def label(self) -> str:
        """``conv1+bn1+relu1``: the head tap and the fused taps' last path component."""
        rest = [t.rsplit(".", 1)[-1] for t in self.taps[1:]]
        return "+".join([self.name, *rest])

    @property
    def needed_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for t in (*self.input_taps, self.output_tap) if t is not None))


@dataclass(frozen=True, kw_only=True)
class SimulationPlan:
    """How a model is simulated: its calls, the NVDLA layers and which scale each tensor has.

    Attributes:
        calls: every leaf call of one forward pass, in order.
        layers: the NVDLA operations after fusion, in network order.
        call_layer: per call, the index of its layer (``None``: a free op -- reshape,
            identity, softmax -- that always runs as written).
        edge_taps: per call, the table entry whose scale its output carries in the NVDLA
            graph (``None``: a float tensor).
        missing: ``(layer, tap)`` pairs: taps the simulation needs and the table lacks.
        fp32_layers: layers that run in FP32 because of ``missing="fp32"``.
        unused_taps: table taps this simulation does not read.
        notes: everything worth knowing (fusions, fallbacks, rule applications).
        fingerprint: the model's structure fingerprint.
    """

    calls: tuple[CallNode, ...]
    layers: tuple[Layer, ...]
    call_layer: tuple[int | None, ...]
    edge_taps: tuple[str | None, ...]
    missing: tuple[tuple[str, str], ...] = ()
    fp32_layers: tuple[str, ...] = ()
    unused_taps: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fingerprint: str = ""

    def __post_init__(self) -> None:
        n = len(self.calls)
        if len(self.call_layer) != n or len(self.edge_taps) != n:
            raise CalibrationError(f"inconsistent plan: {n} calls, {len(self.call_layer)} layer indices, "
                                   f"{len(self.edge_taps)} edge scales")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> Layer:
        """The layer named ``name`` (its head tap)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the simulation plan; layers: {', '.join(self.layer_names[:12])}"
                       + (" ..." if len(self.layers) > 12 else ""))

    def call_index(self, tap: str) -> int:
        for c in self.calls:
            if c.tap == tap:
                return c.index
        raise KeyError(f"no call {tap!r} in the simulation plan")

    def print(self, title: str | None = None) -> None:
        """A rich table on stdout: each NVDLA layer, the scales it reads and writes, its notes."""
        from rich.table import Table

        from ..utils.report import stdout

        t = Table(title=title or f"NVDLA simulation plan: {len(self.layers)} layers from {len(self.calls)} calls")
        for col, just in [("#", "right"), ("layer", "left"), ("kind", "left"), ("reads at", "left"),
                          ("writes at", "left"), ("notes", "left")]:
            t.add_column(col, justify=just)
        for i, layer in enumerate(self.layers):
            notes = [n for n in layer.notes if not n.startswith("fused:")]
            if layer.name in self.fp32_layers:
                notes.insert(0, "FP32 (taps missing)")
            t.add_row(str(i), layer.label, layer.kind, ", ".join(str(x) for x in layer.input_taps),
                      str(layer.output_tap), "; ".join(notes), style="yellow" if not layer.integer_exact else None)
        stdout.print(t)

    def downstream(self, layer_names: Iterable[str]) -> frozenset[int]:
        """Calls whose output can change when these layers change precision.

        The layers' own calls and everything reading them, transitively; a call whose
        input has no known producer is included when it runs after the first changed call.
        """
        start = [i for name in layer_names for i in self.layer(name).calls]
        if not start:
            return frozenset()
        first = min(start)
        dirty = set(start)
        for c in self.calls:
            if c.index in dirty or c.index < first:
                continue
            if any(p is None or (p != DATA and p in dirty) for p in c.producers):
                dirty.add(c.index)
        return frozenset(dirty)


# ------------------------------------------------------------------------------------------
# Discovery: one recorded forward pass
# ------------------------------------------------------------------------------------------


def _value_preserving(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether every value of ``out`` is a value of ``x`` or zero (a copy/subsample/pad)."""
    if out.dtype != x.dtype or not out.is_floating_point():
        return False
    if out.numel() == 0:
        return True
    pool = torch.cat([x.detach().reshape(-1), x.new_zeros(1)])
    return bool(torch.isin(out.detach().reshape(-1), pool).all())


def _caffe_subsamples(module: nn.Module, inputs: list[torch.Tensor], out: Any) -> bool:
    """Whether Caffe's pooled size (rounded up) differs from this pool's output size."""
    if not isinstance(module, nn.MaxPool2d) or not inputs or not isinstance(out, torch.Tensor) \
            or inputs[0].dim() != 4 or out.dim() != 4:
        return False
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k, s, p = pair(module.kernel_size), pair(module.stride or module.kernel_size), pair(module.padding)
    caffe = tuple(caffe_pool_output_size(inputs[0].shape[2 + i], k[i], s[i], p[i]) for i in range(2))
    return caffe != tuple(out.shape[2:])


def _classify(module: nn.Module, inputs: list[torch.Tensor], versions: list[int], out: Any) -> str:
    if getattr(module, "nvdla_export", None) == PAD_SHORTCUT:
        return "generic"  # exported as a 1x1 conv: a layer with its own tensor and scale
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
        return "opaque"
    if isinstance(module, nn.Conv2d):
        return "conv" if module.padding_mode == "zeros" else "generic"
    if isinstance(module, nn.Linear):
        return "fc"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None \
            and module.running_var is not None:
        return "bn"
    if isinstance(module, (nn.ReLU, nn.ReLU6)):  # ReLU6: INT8 saturation caps it when its amax <= 6
        return "relu"
    if isinstance(module, _MAXPOOL_TYPES) and not getattr(module, "return_indices", False):
        return "maxpool"
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return "avgpool"
    if isinstance(module, _SOFTMAX_TYPES):
        return "softmax"
    if isinstance(module, _PASS_TYPES):
        return "pass"
    untouched = all(t._version == v for t, v in zip(inputs, versions)) and all(out is not t for t in inputs)
    if not untouched:
        return "generic"
    if len(inputs) == 2 and inputs[0].shape == inputs[1].shape == out.shape \
            and all(t.is_floating_point() for t in inputs):
        with torch.no_grad():
            if torch.equal(out, inputs[0] + inputs[1]):
                return "add"
    if len(inputs) == 1 and inputs[0].is_floating_point() and _value_preserving(inputs[0], out):
        return "pass"
    return "generic"


@dataclass
class _RawCall:
    index: int
    tap: str
    path: str
    call: int
    module_type: str
    kind: str = "opaque"
    producers: tuple = ()
    consumers: list = field(default_factory=list)
    is_output: bool = False
    shape: tuple = ()
    subsampled: bool = False


class _Discovery:
    """Runs the model once with recording hooks and returns its calls (hooks removed in finally)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[_RawCall] = []
        self._made = TensorMemo()  # tensor -> the index of the call that made it (DATA: the input)
        self._keep: list[torch.Tensor] = []
        self._pending: dict[int, list] = {}

    def _remember(self, t: torch.Tensor, producer: int) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            self._made.remember(t, producer)
            self._keep.append(t)

    def _producer(self, t: torch.Tensor) -> int | None:
        return self._made.get(t) if t.numel() else None

    def _on_input(self, module, args, kwargs) -> None:
        self._made.clear()
        x = _model_input(args, kwargs)
        if x is not None:
            self._remember(x, DATA)

    def _on_call(self, tap: str, path: str, call: int, module: nn.Module, args) -> None:
        ts = tensor_args(args)
        raw = _RawCall(index=-1, tap=tap, path=path, call=call, module_type=type(module).__name__,
                       producers=tuple(self._producer(t) for t in ts))
        self._pending.setdefault(id(module), []).append((raw, ts, [t._version for t in ts]))

    def _on_output(self, tap: str, path: str, call: int, module: nn.Module, args, output) -> None:
        raw, ts, versions = self._pending[id(module)].pop()
        raw.kind = _classify(module, ts, versions, output)
        raw.subsampled = raw.kind == "maxpool" and _caffe_subsamples(module, ts, output)
        raw.index = len(self.calls)
        if isinstance(output, torch.Tensor):
            raw.shape = tuple(output.shape)
        self.calls.append(raw)
        out = output if isinstance(output, torch.Tensor) else None
        if out is None and isinstance(output, (tuple, list)):
            out = first_tensor(output)
        if out is not None:
            self._remember(out, raw.index)

    def run(self, args: tuple, kwargs: dict) -> tuple[_RawCall, ...]:
        sites = CallSites(self.model, on_input=self._on_input, on_call=self._on_call, on_output=self._on_output)
        try:
            with sites, torch.no_grad():
                output = self.model(*args, **kwargs)
            outs = [output] if isinstance(output, torch.Tensor) else tensor_args(
                list(output.values()) if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [])
            for t in outs:
                p = self._producer(t)
                if p is not None and p >= 0:
                    self.calls[p].is_output = True
        finally:
            self._keep.clear()
            self._made.clear()
        for c in self.calls:
            for p in c.producers:
                if p is not None and p >= 0 and c.index not in self.calls[p].consumers:
                    self.calls[p].consumers.append(c.index)
        return tuple(self.calls)


# ------------------------------------------------------------------------------------------
# Plan: fusion, edge scales, table checks
# ------------------------------------------------------------------------------------------


def _sole_reader(calls: Sequence[_RawCall], idx: int, kind: str) -> int | None:
    """The call of ``kind`` that is the only reader of call ``idx``'s output, reading nothing else."""
    c = calls[idx]
    if c.is_output or len(c.consumers) != 1:
        return None
    r = calls[c.consumers[0]]
    if r.kind != kind or r.producers != (idx,):
        return None
    return r.index


def _origin(p, calls):
    """The call that created the tensor ``p`` refers to: pass-through calls (identity,
    dropout, flatten...) create no layer and no tensor in the exported network."""
    seen = set()
    while p is not None and p != DATA and p not in seen and calls[p].kind == "pass" and calls[p].producers:
        seen.add(p)
        p = calls[p].producers[0]
    return p


def _earlier_index(producers, calls) -> int:
    """Which of a sum's two operands (0 or 1) was created earlier.

    The compiler gives the tensor created earlier (prototxt order, which is the call
    order of an exported model) the scale of the one created later (EngineGraph's
    updateScalingFactors, as measured); the model input counts as the earliest.
    """
    if len(producers) != 2 or producers[0] is None or producers[1] is None:
        return 0
    a, b = (_origin(p, calls) for p in producers)
    key = lambda p: -1 if p is None or p == DATA else p  # noqa: E731
    return 0 if key(a) <= key(b) else 1


def _table_model_check(table, raw: Sequence[_RawCall], model: nn.Module, config: SimulationConfig,
                       fingerprint: str) -> list[str]:
    """Refuse a table of another model; return notes about taps it has that the model lacks."""
    key = table.meta.get("cache_key") if isinstance(getattr(table, "meta", None), dict) else None
    stored = key.get("fingerprint") if isinstance(key, dict) else None
    types = {c.tap: c.module_type for c in raw}
    known = set(types) | {"data"}
    unknown = [t for t in table if t.split(":", 1)[0] not in known]
    wrong_type = []
    for t, info in getattr(table, "infos", {}).items():
        base = t.split(":", 1)[0]
        if base in types and info.module and info.module_type and info.module_type != types[base]:
            wrong_type.append(f"{base} ({info.module_type} in the table, {types[base]} in the model)")
    if config.check_model:
        if stored and stored != fingerprint:
            raise CalibrationError(
                f"the calibration table was made for a different model (structure fingerprint {stored} != "
                f"{fingerprint} of this {type(model).__name__}); recalibrate, or pass check_model=False"
            )
        if wrong_type:
            raise CalibrationError(
                "the calibration table was made for a different model: tap types differ: " + ", ".join(wrong_type[:6])
            )
        if table and len(unknown) * 2 > len(table):
            raise CalibrationError(
                f"the calibration table was made for a different model: {len(unknown)} of its {len(table)} taps "
                f"are not taps of this {type(model).__name__} (e.g. {', '.join(unknown[:5])}); a table keyed by "
                "NVDLA / Caffe layer names must be mapped back to taps first"
            )
    return [f"{len(unknown)} table tap(s) are not taps of this model and are ignored: {', '.join(unknown[:8])}"] \
        if unknown else []


@dataclass
class _Group:
    """Calls fused into one NVDLA operation while the plan is built (head call first)."""

    kind: str
    calls: list[int]

    @property
    def head(self) -> int:
        return self.calls[0]

    @property
    def tail(self) -> int:
        return self.calls[-1]


#: Call kind -> the NVDLA operation it heads (pass and opaque calls head none).
_OPERATION_OF = {"conv": "conv", "fc": "fc", "add": "eltwise", "relu": "relu", "maxpool": "maxpool",
                 "avgpool": "avgpool", "bn": "float", "generic": "float", "softmax": "softmax"}


def _fuse(raw: Sequence[_RawCall]) -> tuple[list[int | None], list[_Group]]:
    """Fast-math fusion: a conv / fc takes its sole BatchNorm reader and then its sole ReLU
    reader; a sum its sole ReLU reader. Returns each call's group (or None) and the groups."""
    call_layer: list[int | None] = [None] * len(raw)
    groups: list[_Group] = []
    for c in raw:
        kind = _OPERATION_OF.get(c.kind)
        if call_layer[c.index] is not None or kind is None:
            continue
        members = [c.index]
        followers = {"conv": ("bn", "relu"), "fc": ("bn", "relu"), "eltwise": ("relu",)}.get(kind, ())
        for follower in followers:
            nxt = _sole_reader(raw, members[-1], follower)
            if nxt is not None:
                members.append(nxt)
        for i in members:
            call_layer[i] = len(groups)
        groups.append(_Group(kind, members))
    return call_layer, groups


def _edge_of(edge: Sequence[str | None], p: int | None) -> str | None:
    """The table entry a tensor made by call ``p`` is written at."""
    if p is None:
        return None
    return "data" if p == DATA else edge[p]


def _edge_scales(raw: Sequence[_RawCall], call_layer: Sequence[int | None], groups: Sequence[_Group],
                 tapset: set[str]) -> list[str | None]:
    """The table entry every call's output is written at, with the compiler's element-wise rule
    applied to a fixed point.

    A group writes at its last call's tap; pools and value-preserving calls keep their
    input's (a functional op's result: the call's ``:input`` tap, when observed). When the two inputs of a sum differ, the producer of the earlier-created one
    (when it can rescale) writes at the later one's entry instead, which moves every other
    reader of that tensor too: iterate until nothing changes.
    """
    override: dict[int, str | None] = {}
    edge: list[str | None] = [None] * len(raw)
    for _ in range(len(raw) + 2):
        before = list(edge)
        for c in raw:
            g_i = call_layer[c.index]
            g = groups[g_i] if g_i is not None else None
            if c.kind == "pass" or (g is not None and g.kind in ("maxpool", "avgpool")):
                edge[c.index] = _edge_of(edge, c.producers[0]) if c.producers else None
                if edge[c.index] is None and f"{c.tap}:input" in tapset:
                    edge[c.index] = f"{c.tap}:input"
                if c.subsampled and g_i in override:  # its 1x1 subsampling conv can rescale
                    edge[c.index] = override[g_i]
            elif c.kind == "opaque" or g is None:
                edge[c.index] = None
            else:
                edge[c.index] = override.get(g_i, raw[g.tail].tap)
        for g in groups:
            head = raw[g.head]
            if g.kind != "eltwise" or len(head.producers) != 2:
                continue
            e = _earlier_index(head.producers, raw)
            a, b = _origin(head.producers[e], raw), head.producers[1 - e]
            sb = _edge_of(edge, b)
            if a is None or a == DATA or sb is None:
                continue
            ga = call_layer[a]
            if ga is not None and (groups[ga].kind in _RESCALING or raw[a].subsampled) and groups[ga].tail == a:
                override[ga] = sb
        if edge == before:
            break
    return edge


def _layer_inputs(g: _Group, raw: Sequence[_RawCall], edge: Sequence[str | None], tapset: set[str],
                  notes: list[str]) -> list[str | None]:
    """The entries a group's inputs are read at (a functional op's result: its ``:input`` tap)."""
    head = raw[g.head]
    inputs: list[str | None] = []
    for p in head.producers[: (2 if g.kind == "eltwise" else 1)]:
        src = _edge_of(edge, p)
        if src is None and f"{head.tap}:input" in tapset:
            src = f"{head.tap}:input"
            notes.append(f"input producer unknown (a functional op): read at '{src}'")
        inputs.append(src)
    return [] if g.kind == "float" else inputs


def _eltwise_notes(g: _Group, g_i: int, raw, inputs, call_layer) -> list[str]:
    """What the element-wise rule did to a sum's inputs."""
    head = raw[g.head]
    ea = _earlier_index(head.producers, raw)
    a = _origin(head.producers[ea], raw)
    early, late = inputs[ea], inputs[1 - ea]
    if late is not None and early != late:
        return [f"earlier input re-quantized from '{early}' to '{late}' in float: its producer cannot rescale "
                "(not integer-exact)"]
    if a is not None and a != DATA and g_i != call_layer[a] and late is not None:
        return ["element-wise rule: the earlier-created input is written at the later one's scale"]
    return []


def _output_tap(g: _Group, raw, edge, inputs, tapset: set[str], notes: list[str]) -> str | None:
    """The entry a group writes at (a pool keeps its input's; a rescaling op may take a sum's)."""
    head, tail = raw[g.head], raw[g.tail]
    if g.kind in ("maxpool", "avgpool"):
        first = inputs[0] if inputs else None
        out_tap = edge[tail.index] if head.subsampled else first
        if out_tap != first:
            notes.append("element-wise rule: its subsampling 1x1 conv writes at the sum's later input's scale")
        if head.tap in tapset and out_tap != head.tap:
            notes.append(f"entry '{head.tap}' unused (a pool keeps its input's scale)")
        return out_tap
    out_tap = edge[tail.index]
    if out_tap != tail.tap and g.kind in _RESCALING:
        notes.append("element-wise rule: writes at the scale of the sum's later-created input")
    return out_tap


def _make_layer(g_i: int, g: _Group, raw, edge, call_layer, tapset: set[str]) -> tuple[Layer, list[str]]:
    """One :class:`Layer` and the taps the table must hold for it."""
    head = raw[g.head]
    notes: list[str] = []
    inputs = _layer_inputs(g, raw, edge, tapset, notes)
    if g.kind == "eltwise" and len(inputs) == 2:
        notes.extend(_eltwise_notes(g, g_i, raw, inputs, call_layer))
    out_tap = _output_tap(g, raw, edge, inputs, tapset, notes)
    if len(g.calls) > 1:
        notes.append("fused: " + " + ".join(raw[i].tap for i in g.calls))
    if g.kind == "float":
        notes.append(f"{head.module_type} is not an NVDLA op here: float on carried values, output quantized")
    layer = Layer(name=head.tap, kind=g.kind, calls=tuple(g.calls), taps=tuple(raw[i].tap for i in g.calls),
                  input_taps=tuple(inputs), output_tap=out_tap, integer_exact=g.kind != "float", notes=tuple(notes))
    if g.kind == "float":
        lacks = [] if head.tap in tapset else [head.tap]
    else:
        lacks = [t if t is not None else f"{head.tap}:input" for t in layer.needed_taps if t is None or t not in tapset]
        if any(t is None for t in inputs):
            lacks.append(f"{head.tap}:input")
    return layer, list(dict.fromkeys(lacks))


def _build_plan(raw: Sequence[_RawCall], table, model: nn.Module, config: SimulationConfig) -> SimulationPlan:
    """The NVDLA graph of one discovered forward: fusion, the scale of every tensor, the layers."""
    fingerprint = model_fingerprint(model)  # hashes every weight: once per plan
    notes = _table_model_check(table, raw, model, config, fingerprint)
    call_layer, groups = _fuse(raw)
    tapset = set(table)
    edge = _edge_scales(raw, call_layer, groups, tapset)
    layers: list[Layer] = []
    needed: list[tuple[str, str]] = []
    for g_i, g in enumerate(groups):
        layer, lacks = _make_layer(g_i, g, raw, edge, call_layer, tapset)
        layers.append(layer)
        needed.extend((layer.name, t) for t in lacks)
    used = set(tapset) if config.placement == "all" else {t for layer in layers for t in layer.needed_taps}
    return SimulationPlan(
        calls=tuple(CallNode(index=c.index, tap=c.tap, path=c.path, call=c.call, module_type=c.module_type, kind=c.kind,
                             producers=tuple(c.producers), consumers=tuple(c.consumers), is_output=c.is_output,
                             shape=tuple(c.shape), subsampled=c.subsampled) for c in raw),
        layers=tuple(layers), call_layer=tuple(call_layer), edge_taps=tuple(edge), missing=tuple(needed),
        unused_taps=tuple(t for t in table if t not in used), notes=tuple(notes), fingerprint=fingerprint,
    )


def _missing_for_placement(plan: SimulationPlan, table, placement: str) -> list[tuple[str, str]]:
    """``(where, tap)`` pairs the placement needs and the table lacks."""
    if placement == "nvdla":
        return list(plan.missing)
    out = []
    if placement == "all":
        if "data" not in table:
            out.append(("data", "data"))
        for c in plan.calls:
            if c.kind not in ("softmax", "opaque") and c.tap not in table:
                out.append((c.tap, c.tap))
            # a conv / fc fed by a functional op (no observed producer) reads it through its ':input' tap
            if c.kind in ("conv", "fc") and c.producers and c.producers[0] is None and f"{c.tap}:input" not in table:
                out.append((c.tap, f"{c.tap}:input"))
        return out
    for c in plan.calls:  # modelopt
        if c.kind in ("conv", "fc") and _modelopt_input_tap(plan, table, c) is None:
            out.append((c.tap, f"{c.tap}:input"))
    return out


def _modelopt_input_tap(plan: SimulationPlan, table, c: CallNode) -> str | None:
    own = f"{c.tap}:input"
    if own in table:
        return own
    p = c.producers[0] if c.producers else None
    if p is None:
        return None
    tap = "data" if p == DATA else plan.calls[p].tap
    return tap if tap in table else None


def _raise_missing(missing: Sequence[tuple[str, str]], what: str) -> None:
    taps = list(dict.fromkeys(t for _, t in missing))
    lines = [f"{layer} needs '{tap}'" for layer, tap in missing[:12]]
    more = f" ... and {len(missing) - 12} more" if len(missing) > 12 else ""
    raise CalibrationError(
        f"the calibration table lacks {len(taps)} tap(s) the {what} needs: " + "; ".join(lines) + more
        + ". Calibrate with those taps (e.g. calibrate(..., taps=TapSelection(inputs=(...,))) for ':input' taps), "
        "or pass missing='fp32' to run those layers in FP32 (command line: --missing fp32, or let the command "
        "calibrate the model itself instead of --table)"
    )


# ------------------------------------------------------------------------------------------
# Per-layer runtimes (placement "nvdla", both modes)
# ------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    return float(np.float32(x))


def _scale_of(table, tap: str) -> float:
    return float(table[tap].scale)


def _s32(scale: float, device) -> torch.Tensor:
    return torch.tensor(scale, dtype=torch.float32, device=device)


#: The largest float32 / float64 below 1/2.
_BELOW_HALF = {torch.float32: float(np.nextafter(np.float32(0.5), np.float32(0))),
               torch.float64: float(np.nextafter(0.5, 0.0))}


def _round_sat(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sat8(round_half_away(x / S)), S)`` in the compute dtype, in three passes after the division.

    Bit-identical to :func:`~torch_nvdla.nvdla.requant.quantize` (tested), faster:
    ``round_half_away(y) = trunc(y + copysign(h, y))`` with ``h`` the largest float below
    1/2. For a tie ``y = n + 1/2`` the sum ``n + 1 - 2^-25`` rounds to ``n + 1``; for ``y``
    below a tie by at least one ulp the sum stays at least one ulp below ``n + 1``; for
    ``|y| < 1/2`` it stays below 1 -- for every ``|y| < 2^22`` (float32; ``2^51`` in
    float64), and larger values saturate anyway. With ``h = 1/2`` the sum would round up
    to 1 for ``y = 1/2 - 2^-25``. Compute dtype as ``fake_quant``'s: float64 stays float64,
    everything else is float32.
    """
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=cd, device=x.device)
    y = x.to(cd) / s
    y = y.add_(torch.copysign(torch.tensor(_BELOW_HALF[cd], dtype=cd, device=x.device), y)).trunc_()
    return y.clamp_(-128.0, 127.0), s


def _fq(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Fake-quant ``sat8(round_half_away(x / S)) * S`` in ``x``'s dtype (= ``_requant.fake_quant``)."""
    q, s = _round_sat(x, scale)
    return q.mul_(s).to(x.dtype)


def _q(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The int8 values ``sat8(round_half_away(x / S))`` as float32 (= ``_requant.quantize``)."""
    if x.dtype == torch.float64:
        return _round_sat(x, scale)[0].to(torch.float32)
    return _round_sat(x, scale)[0]


def _dequant(q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``q * S`` computed as :func:`fake_quant` does (float32 product), in ``dtype``."""
    return (q.to(torch.float32) * _s32(scale, q.device)).to(dtype)


def _requant_f64(acc: torch.Tensor, mscale: torch.Tensor | float, low: float) -> torch.Tensor:
    """``sat(round_half_away(acc * m / 2^t), low, 127)`` for an exact float64 accumulator.

    Equal to :func:`~torch_nvdla.nvdla.requant.requantize` (tested bit for bit), in fewer
    passes. Exactness: ``|acc| <= 2^31`` and ``m < 2^15``, so ``acc * (m 2^-t)`` has at
    most 46 significant bits and is exact in float64; with ``v = n 2^-t``,
    ``v + 1/2 = (n + 2^(t-1)) 2^-t`` is exact while ``t <= 53``, and for larger ``t``
    ``|v| < 2^-7`` so the rounded sum stays in ``(-1, 1)`` and truncates to 0, the exact
    answer. ``low = 0`` applies a fused ReLU: requantization is monotone and maps 0 to 0,
    so ``max(requant(acc), 0) = requant(max(acc, 0))`` (the SDP's order).
    """
    v = acc * mscale
    v.add_(torch.sign(v).mul_(0.5)).trunc_()
    return v.clamp_(low, 127.0)


def _per_filter_mt(ratios: Sequence[float], name: str) -> tuple[torch.Tensor, int, list[int]]:
    """Per-filter multipliers: the largest ratio fixes the shared shift; ``m_k = trunc(r_k 2^t)``.

    nvdla/sw ``SDPBiasOpNode::performPerChannelRescaling``: one truncate for the X1 MUL
    stage. A channel whose multiplier truncates to 0 is zeroed (the compiler only reports
    "Scale value is 0"); returned as the third value.
    """
    rmax = max(ratios)
    try:
        _, t = multiplier_shift(rmax, float32=True)
    except ValueError as e:
        raise CalibrationError(f"layer {name!r}: {e}") from None
    ms = [math.trunc(math.ldexp(_f32(r), t)) for r in ratios]
    zeroed = [k for k, m in enumerate(ms) if m == 0]
    return torch.tensor(ms, dtype=torch.int64), t, zeroed


def _ratio_mt(r: float, name: str) -> tuple[int, int]:
    try:
        return multiplier_shift(r, float32=True)
    except ValueError as e:
        raise CalibrationError(f"layer {name!r}: {e}") from None


#: float32 holds every integer of magnitude < 2^24 exactly.
_F32_EXACT = 2.0**24
_INT32_LIMIT = 2.0**31


def _fast_f32_backend(device: torch.device) -> bool:
    """Whether float32 convolutions / matmuls of small integers are exact sums here.

    On x86-64 CPUs PyTorch runs a float32 convolution as a direct oneDNN kernel or as
    im2col + SGEMM (NNPACK, whose Winograd/FFT transforms round, is switched off around the
    call), and a linear layer as SGEMM: every partial sum is a float32 addition, exact while
    it stays below 2^24. On GPUs (TF32, Winograd in cuDNN) and other CPUs the float64
    path of :mod:`torch_nvdla.nvdla.requant` is used. Each layer also checks its first batch
    against float64 and keeps float64 if they differ.
    """
    import platform

    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64") \
        and torch.get_float32_matmul_precision() == "highest"


class _Runtime:
    """Computes one INT8 layer (its head call); the fused calls pass their input through.

    ``exact_in[i]`` says whether input ``i`` is known to arrive as exact ``q * S`` at the
    right scale (its producer is an INT8 layer of this simulation writing at that scale), in
    which case the input is not re-quantized, only read back.
    """

    def __init__(self, layer: Layer, plan: SimulationPlan, table, modules: Mapping[str, nn.Module],
                 config: SimulationConfig) -> None:
        self.layer = layer
        self.fake = config.mode == "fake"
        self.head = plan.calls[layer.calls[0]]
        self.module = modules[self.head.path]
        self.s_in = [_scale_of(table, t) for t in layer.input_taps if t is not None]
        self.s_out = _scale_of(table, layer.output_tap) if layer.output_tap is not None else None
        self.exact_in: tuple[bool, ...] = tuple(False for _ in self.s_in)
        self.notes: list[str] = []

    def read(self, x: torch.Tensor, i: int, scale: float | None = None) -> torch.Tensor:
        """Input ``i`` as NVDLA reads it.

        Fake-quant: the dequantized real value ``q * S``. Integer mode: ``q`` itself, as
        float32 integers in ``[-128, 127]``.
        """
        s = self.s_in[i] if scale is None else scale
        exact = self.exact_in[i] and scale is None and x.dtype in (torch.float32, torch.float64)
        if self.fake:
            return x if exact else _fq(x, s)
        if exact:
            return torch.round(x.to(torch.float32) / _s32(s, x.device))
        return _q(x, s)

    def __call__(self, args, kwargs, orig):  # pragma: no cover - overridden
        raise NotImplementedError


class _ConvFC(_Runtime):
    def __init__(self, layer, plan, table, modules, config):
        super().__init__(layer, plan, table, modules, config)
        m = self.module
        calls = [plan.calls[i] for i in layer.calls]
        bn = next((modules[c.path] for c in calls[1:] if c.kind == "bn"), None)
        self.relu = any(c.kind == "relu" for c in calls[1:])
        w = m.weight.detach()
        b = m.bias.detach() if m.bias is not None else None
        if bn is not None:
            w, b = fold_batchnorm(w, b, bn.running_mean, bn.running_var, bn.eps,
                                  bn.weight if bn.affine else None, bn.bias if bn.affine else None)
        try:
            qw = quantize_weight(w, config.weights, name=layer.name)
        except ValueError as e:
            raise CalibrationError(str(e)) from None
        self.is_conv = layer.kind == "conv"
        s_in, s_out = self.s_in[0], self.s_out
        sw = qw.scale.detach().to("cpu", torch.float64)
        self.sw = sw
        if self.fake:
            view = qw.scale.reshape([-1] + [1] * (w.dim() - 1)) if qw.scale.dim() else qw.scale
            self.w = (qw.q.to(torch.float32) * view).to(w.dtype if w.is_floating_point() else torch.float32)
            self.b = b.to(self.w.dtype) if b is not None else None
            return
        self.wq = qw.q
        if b is not None:
            try:
                bq = quantize_bias(b, s_in, qw.scale, name=layer.name)
            except ValueError as e:
                raise CalibrationError(str(e)) from None
            b16, shift = bias_int16_shift(bq)
            self.bias = b16.to(torch.int64) << shift
            self.bias16 = (tuple(int(v) for v in b16.reshape(-1).tolist()), int(shift))
        else:
            self.bias = None
            self.bias16 = None
        if sw.dim() == 0:
            r = rescale_ratio(s_in, float(sw), s_out, float32=True)
            self.m, self.t = _ratio_mt(r, layer.name)
            mscale = torch.tensor(math.ldexp(self.m, -self.t), dtype=torch.float64)
        else:
            ratios = [rescale_ratio(s_in, float(v), s_out, float32=True) for v in sw.tolist()]
            self.m, self.t, zeroed = _per_filter_mt(ratios, layer.name)
            if zeroed:
                self.notes.append(f"per-filter multiplier of channel(s) {zeroed[:8]} truncates to 0: zeroed")
            mscale = self.m.to(torch.float64) * math.ldexp(1.0, -self.t)
        k = self.wq.shape[0]
        shape = [1, k] + [1] * (w.dim() - 2) if self.is_conv else [k]
        self.mscale = mscale.reshape(shape) if mscale.dim() else mscale
        self.bias64 = self.bias.to(torch.float64).reshape(shape) if self.bias is not None else None
        wabs = self.wq.to(torch.float64).abs().reshape(k, -1).sum(1)
        bound = 128.0 * float(wabs.max())
        self.f32_exact = bound < _F32_EXACT
        bmax = float(self.bias.abs().max()) if self.bias is not None and self.bias.numel() else 0.0
        self.acc_bounded = bound + bmax < _INT32_LIMIT - 1
        self.w32 = self.wq.to(torch.float32)
        self.w64 = self.wq.to(torch.float64)
        self.verified = False

    def _products(self, q: torch.Tensor, padding) -> torch.Tensor:
        """The exact sum of products, float64 (float32 kernels where provably exact)."""
        m = self.module
        dev = q.device
        if self.is_conv:
            # NNPACK (CPU) and cuDNN (GPU) may pick Winograd / FFT / TF32 algorithms, which round.
            backend = torch.backends.cudnn if dev.type == "cuda" else torch.backends.nnpack

            def conv(x, w):
                with backend.flags(enabled=False):
                    return F.conv2d(x, w.to(dev), None, m.stride, padding, m.dilation, m.groups)
        else:
            def conv(x, w):
                return F.linear(x, w.to(dev))
        if self.f32_exact and _fast_f32_backend(dev):
            acc = conv(q, self.w32).to(torch.float64)
            if not self.verified:
                ref = conv(q.to(torch.float64), self.w64)
                self.verified = True
                if not torch.equal(acc, ref):
                    self.f32_exact = False
                    self.notes.append("float32 kernel was not exact on this backend: float64 used")
                    return ref
            return acc
        return conv(q.to(torch.float64), self.w64)

    def __call__(self, args, kwargs, orig):
        x = args[0]
        m = self.module
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if self.fake:
            xq = self.read(x, 0)
            w = self.w.to(device=x.device, dtype=xq.dtype)
            b = self.b.to(device=x.device, dtype=xq.dtype) if self.b is not None else None
            y = F.conv2d(xq, w, b, m.stride, m.padding, m.dilation, m.groups) if self.is_conv else F.linear(xq, w, b)
            if self.relu:
                y = torch.relu(y)
            return _fq(y, self.s_out)
        q = self.read(x, 0)
        padding = m.padding if self.is_conv else None
        unbatched = self.is_conv and q.dim() == 3
        if unbatched:
            q = q.unsqueeze(0)
        if self.is_conv and isinstance(padding, str):
            pads = list(m._reversed_padding_repeated_twice) if padding == "same" else [0, 0, 0, 0]
            q = F.pad(q, pads)
            padding = 0
        acc = self._products(q, padding)
        if self.bias64 is not None:
            acc = acc + self.bias64.to(acc.device)
        if not self.acc_bounded:
            acc = acc.clamp_(-_INT32_LIMIT, _INT32_LIMIT - 1)
        y = _requant_f64(acc, self.mscale.to(acc.device), 0.0 if self.relu else -128.0)
        if unbatched:
            y = y.squeeze(0)
        return _dequant(y, self.s_out, dtype)


class _Eltwise(_Runtime):
    def __init__(self, layer, plan, table, modules, config):
        super().__init__(layer, plan, table, modules, config)
        self.relu = any(plan.calls[i].kind == "relu" for i in layer.calls[1:])
        self.early = _earlier_index(tuple(plan.calls[layer.calls[0]].producers), plan.calls)
        self.s_common = self.s_in[1 - self.early]  # the later-created input's scale
        if not self.fake:
            r = _f32(_f32(self.s_common) / _f32(self.s_out))
            self.m, self.t = _ratio_mt(r, layer.name)
            self.mscale = math.ldexp(self.m, -self.t)

    def __call__(self, args, kwargs, orig):
        ab = tensor_args(args)[:2]
        dtype = ab[0].dtype
        e, late = self.early, 1 - self.early
        se = None if self.s_in[e] == self.s_common else self.s_common
        total = self.read(ab[e], e, se) + self.read(ab[late], late)
        if self.fake:
            return _fq(torch.relu(total) if self.relu else total, self.s_out)
        acc = total.to(torch.float64)  # |sum| <= 256: exact
        return _dequant(_requant_f64(acc, self.mscale, 0.0 if self.relu else -128.0), self.s_out, dtype)


class _Relu(_Runtime):
    def __init__(self, layer, plan, table, modules, config):
        super().__init__(layer, plan, table, modules, config)
        if not self.fake:
            r = _f32(_f32(self.s_in[0]) / _f32(self.s_out))
            self.m, self.t = _ratio_mt(r, layer.name)
            self.mscale = math.ldexp(self.m, -self.t)

    def __call__(self, args, kwargs, orig):
        x = args[0]
        if self.fake:
            return _fq(torch.relu(self.read(x, 0)), self.s_out)
        acc = self.read(x, 0).to(torch.float64)
        return _dequant(_requant_f64(acc, self.mscale, 0.0), self.s_out, x.dtype)


class _MaxPool(_Runtime):
    """A max pool keeps its input's scale; one the Caffe export subsamples with a fixed
    identity 1x1 convolution (weights 127 at ``S_w = 1/127``, zero bias) requantizes
    ``127 q`` by ``r = S_in (1/127) / S_out`` there, like any convolution."""

    def __init__(self, layer, plan, table, modules, config):
        super().__init__(layer, plan, table, modules, config)
        self.subsampled = plan.calls[layer.calls[0]].subsampled
        if self.subsampled and not self.fake:
            self.sw = float(_f32(1.0) / _f32(127.0))
            r = rescale_ratio(self.s_in[0], self.sw, self.s_out, float32=True)
            self.m, self.t = _ratio_mt(r, layer.name)
            self.mscale = math.ldexp(self.m, -self.t)
            shape = plan.calls[layer.calls[0]].shape
            self.bias16 = ((0,) * int(shape[1]), BIAS_LEFT_SHIFT_MAX) if len(shape) > 1 else None

    def __call__(self, args, kwargs, orig):
        x = args[0]
        xq = x if (self.exact_in[0] and x.dtype in (torch.float32, torch.float64)) else _fq(x, self.s_in[0])
        y = orig(xq, *args[1:], **kwargs)  # max of exact multiples: exact, same scale
        if not self.subsampled or self.s_out == self.s_in[0]:
            return y
        if self.fake:
            return _fq(y, self.s_out)
        acc = torch.round(y.to(torch.float64) / float(_f32(self.s_in[0]))) * 127.0
        return _dequant(_requant_f64(acc, self.mscale, -128.0), self.s_out, x.dtype)


class _AvgPool(_Runtime):
    def __init__(self, layer, plan, table, modules, config):
        super().__init__(layer, plan, table, modules, config)
        m = self.module
        self.pdp = None
        if isinstance(m, nn.AvgPool2d):
            def pair(v):
                return (v, v) if isinstance(v, int) else tuple(v)

            k = pair(m.kernel_size)
            s = pair(m.stride) if m.stride is not None else k
            pad = pair(m.padding)
            if m.divisor_override is None and all(1 <= v <= 8 for v in k) and all(0 <= v <= 7 for v in pad):
                self.pdp = (k, s, pad, bool(m.ceil_mode))
                if not m.count_include_pad and any(pad):
                    self.notes.append("count_include_pad=False: the PDP divides by the full kernel area")
            else:
                self.notes.append("average pool outside the PDP's range: float average, re-quantized")

    def _adaptive(self, h: int, w: int):
        out = self.module.output_size
        oh, ow = (out, out) if isinstance(out, int) else out
        oh = h if oh is None else oh
        ow = w if ow is None else ow
        if h % oh or w % ow:
            return None
        kh, kw = h // oh, w // ow
        if not (1 <= kh <= 8 and 1 <= kw <= 8):
            return None
        return (kh, kw), (kh, kw), (0, 0), False

    def __call__(self, args, kwargs, orig):
        x = args[0]
        s = self.s_in[0]
        if self.fake:
            return _fq(orig(self.read(x, 0)), s)
        spec = self.pdp
        if spec is None and isinstance(self.module, nn.AdaptiveAvgPool2d) and x.dim() in (3, 4):
            spec = self._adaptive(x.shape[-2], x.shape[-1])
        if spec is None:
            return _fq(orig(_dequant(self.read(x, 0), s, x.dtype)), s)
        k, st, pad, ceil = spec
        y = avgpool_q16(self.read(x, 0), k, st, pad, ceil_mode=ceil)
        return _dequant(y, s, x.dtype)


class _Softmax(_Runtime):
    """The runtime's CPU softmax (:func:`~torch_nvdla.nvdla.requant.emulator_softmax`).

    The emulator reads the channel axis only: a softmax over another axis or over a plane
    (``H x W > 1``) runs in float, with a note.
    """

    def __init__(self, layer, plan, table, modules, config):
        super().__init__(layer, plan, table, modules, config)
        dim = getattr(self.module, "dim", None)
        shape = self.head.shape
        self.emulated = len(shape) >= 2 and all(d == 1 for d in shape[2:]) and dim in (1, -len(shape), None) \
            and isinstance(self.module, nn.Softmax)
        if not self.emulated:
            self.notes.append("softmax over another axis or a plane: not the emulator's (channels of one pixel); "
                              "computed in float")

    def __call__(self, args, kwargs, orig):
        x = args[0]
        if not self.emulated or self.s_out is None:
            return orig(*args, **kwargs)
        q = self.read(x, 0).reshape(x.shape[0], x.shape[1])
        if self.fake:
            q = torch.round(q / _s32(self.s_in[0], x.device))
        out = emulator_softmax(q, self.s_in[0], self.s_out)
        return _dequant(out, self.s_out, x.dtype).reshape(x.shape)


class _Float(_Runtime):
    def __call__(self, args, kwargs, orig):
        return _fq(orig(*args, **kwargs), self.s_out)


_RUNTIMES = {"conv": _ConvFC, "fc": _ConvFC, "eltwise": _Eltwise, "relu": _Relu, "maxpool": _MaxPool,
             "avgpool": _AvgPool, "float": _Float, "softmax": _Softmax}


# ------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------


@dataclass
class _Replay:
    """Reuse of recorded outputs (the sweep): calls outside ``dirty`` return ``base`` entries.

    Entries are ``(tensor, version)``; an entry whose tensor was modified in place since it
    was recorded (another version) is recomputed. Every computed output goes to ``out``.
    """

    base: dict[int, tuple[torch.Tensor, int]]
    dirty: frozenset[int] | None  # None: everything is dirty (recording)
    out: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)


class _Engine:
    """How a simulation changes the model's computation: one per placement family, chosen
    once. :class:`Simulation` discovers the graph, plans and names the calls; the engine
    installs itself on the model (:meth:`install`) and takes itself off (:meth:`remove`)."""

    def __init__(self, sim: "Simulation") -> None:
        self.sim = sim

    def install(self, plan: SimulationPlan, missing: list[tuple[str, str]]) -> SimulationPlan:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def model_input(self, args: tuple, kwargs: dict):
        """A root forward-pre-hook result for the model input (None: unchanged)."""
        return None

    def set_layers(self, layers: Iterable[str] | None) -> None:
        raise CalibrationError("choosing layers needs placement='nvdla' (the fused NVDLA graph)")

    def replaying(self, base: dict | None, dirty: frozenset[int] | None):
        raise CalibrationError("replay needs placement='nvdla'")

    @property
    def enabled_layers(self) -> tuple[str, ...]:
        return ()

    def runtimes(self) -> Mapping[int, _Runtime]:
        return {}


class _GraphEngine(_Engine):
    """Placement ``"nvdla"``: every leaf call's ``forward`` is replaced; a fused NVDLA layer
    runs its :class:`_Runtime` at its head call and passes its other calls through."""

    def __init__(self, sim: "Simulation") -> None:
        super().__init__(sim)
        self._runtimes: dict[int, _Runtime] = {}
        self._enabled: frozenset[int] = frozenset()
        self._forwards: list[tuple[nn.Module, bool, Any]] = []
        self._replay: _Replay | None = None
        self._plan: SimulationPlan | None = None

    def runtimes(self) -> Mapping[int, _Runtime]:
        return self._runtimes

    def install(self, plan: SimulationPlan, missing: list[tuple[str, str]]) -> SimulationPlan:
        sim = self.sim
        lacking = {layer for layer, _ in missing}
        fp32_layers: list[str] = []
        for i, layer in enumerate(plan.layers):
            if layer.name in lacking:
                fp32_layers.append(layer.name)
                continue
            self._runtimes[i] = _RUNTIMES[layer.kind](layer, plan, sim.table, sim._modules, sim.config)
        notes = list(plan.notes) + [f"{layer.name}: {n}" for layer in plan.layers for n in layer.notes]
        notes += [f"{plan.layers[i].name}: {n}" for i, rt in self._runtimes.items() for n in rt.notes]
        if fp32_layers:
            notes.append(f"{len(fp32_layers)} layer(s) run in FP32 (taps missing): {', '.join(fp32_layers[:8])}")
        plan = dataclasses.replace(plan, missing=tuple(missing), fp32_layers=tuple(fp32_layers), notes=tuple(notes))
        self._plan = plan
        self._enabled = self._resolve_layers(sim._requested_layers)
        self._update_exact()
        for path, module in leaf_modules(sim.model):
            had = "forward" in module.__dict__
            self._forwards.append((module, had, module.__dict__.get("forward")))
            module.__dict__["forward"] = self._make_forward(path, module, module.forward)
        return plan

    def remove(self) -> None:
        while self._forwards:
            module, had, old = self._forwards.pop()
            if had:
                module.__dict__["forward"] = old
            else:
                module.__dict__.pop("forward", None)
        self._replay = None

    @property
    def enabled_layers(self) -> tuple[str, ...]:
        return tuple(self._plan.layers[i].name for i in sorted(self._enabled)) if self._plan is not None else ()

    def set_layers(self, layers: Iterable[str] | None) -> None:
        if self._plan is None:
            self.sim._requested_layers = None if layers is None else tuple(layers)
            return
        self._enabled = self._resolve_layers(layers)
        self._update_exact()

    def _resolve_layers(self, layers: Iterable[str] | None) -> frozenset[int]:
        plan = self._plan
        names = {layer.name: i for i, layer in enumerate(plan.layers)}
        if layers is None:
            chosen = set(range(len(plan.layers)))
        else:
            chosen = set()
            for name in layers:
                if name not in names:
                    raise CalibrationError(f"unknown layer {name!r}; layers: {', '.join(list(names)[:12])}"
                                           + (" ..." if len(names) > 12 else ""))
                chosen.add(names[name])
        return frozenset(i for i in chosen if i in self._runtimes)

    def _update_exact(self) -> None:
        """Mark the inputs that arrive already quantized at the scale they are read at."""
        plan = self._plan
        exact: set[int] = set()
        for c in plan.calls:
            g = plan.call_layer[c.index]
            if g is not None and g in self._enabled:
                exact.add(c.index)
            elif c.kind == "pass" and c.producers and c.producers[0] is not None and c.producers[0] in exact:
                exact.add(c.index)
        for rt in self._runtimes.values():
            head = rt.head
            flags = []
            for i in range(len(rt.s_in)):
                p = head.producers[i] if i < len(head.producers) else None
                flags.append(p is not None and p != DATA and p in exact
                             and plan.edge_taps[p] == rt.layer.input_taps[i])
            rt.exact_in = tuple(flags)

    def _make_forward(self, path: str, module: nn.Module, orig: Callable):
        sim = self.sim

        def forward(*args, **kwargs):
            tap = sim._tap_of(module, path)
            try:
                return self._dispatch(sim._index[tap], orig, args, kwargs)
            finally:
                sim._current[id(module)].pop()

        return forward

    def _dispatch(self, idx: int, orig: Callable, args, kwargs):
        """Run call ``idx``: from the replay cache when clean and unmodified, else compute it."""
        rp = self._replay
        if rp is None:
            return self._compute(idx, orig, args, kwargs)
        if rp.dirty is not None and idx not in rp.dirty:
            hit = rp.base.get(idx)
            if hit is not None and hit[0]._version == hit[1]:
                return hit[0]
        y = self._compute(idx, orig, args, kwargs)
        if isinstance(y, torch.Tensor):
            rp.out[idx] = (y, y._version)
        return y

    def _compute(self, idx: int, orig: Callable, args, kwargs):
        g = self._plan.call_layer[idx]
        if g is None or g not in self._enabled:
            return orig(*args, **kwargs)
        rt = self._runtimes[g]
        if rt.head.index == idx:
            return rt(args, kwargs, orig)
        return args[0]  # a fused BatchNorm / ReLU: the head already computed it

    @contextlib.contextmanager
    def replaying(self, base: dict | None, dirty: frozenset[int] | None) -> Iterator[_Replay]:
        rp = _Replay(base=base or {}, dirty=dirty)
        self._replay = rp
        try:
            yield rp
        finally:
            self._replay = None


class _TapEngine(_Engine):
    """Placements ``"all"`` and ``"modelopt"``: forward hooks fake-quantize tap tensors
    (every tap's output; modelopt: conv / fc inputs only) and conv / fc weights are swapped
    for their quantized values."""

    def __init__(self, sim: "Simulation", *, modelopt: bool) -> None:
        super().__init__(sim)
        self.modelopt = modelopt
        self._fq_taps: dict[str, float] = {}
        self._input_fq: dict[str, float] = {}
        self._params: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._handles: list = []

    def install(self, plan: SimulationPlan, missing: list[tuple[str, str]]) -> SimulationPlan:
        sim, table = self.sim, self.sim.table
        lacking = {tap for _, tap in missing}
        self._fq_taps = {t: _scale_of(table, t) for t in table if t not in lacking}
        if self.modelopt:
            for c in plan.calls:
                if c.kind in ("conv", "fc"):
                    t = _modelopt_input_tap(plan, table, c)
                    if t is not None:
                        self._input_fq[c.tap] = _scale_of(table, t)
        seen: set[int] = set()
        called = {c.path for c in plan.calls}
        for path, module in leaf_modules(sim.model):
            self._handles.append(module.register_forward_pre_hook(self._make_pre(path)))
            self._handles.append(module.register_forward_hook(self._make_post(path)))
            if isinstance(module, _WEIGHTED_TYPES) and id(module) not in seen and path in called:
                seen.add(id(module))
                self._quantize_weight(path, module)
        return plan

    def _quantize_weight(self, path: str, module: nn.Module) -> None:
        w = module.weight
        try:
            qw = quantize_weight(w.detach(), self.sim.config.weights, name=path)
        except ValueError as e:
            raise CalibrationError(str(e)) from None
        view = qw.scale.reshape([-1] + [1] * (w.dim() - 1)) if qw.scale.dim() else qw.scale
        self._params.append((w, w.data))
        w.data = (qw.q.to(torch.float32) * view).to(w.dtype)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._params:
            p, data = self._params.pop()
            p.data = data

    def model_input(self, args: tuple, kwargs: dict):
        s = None if self.modelopt else self._fq_taps.get("data")
        if s is None:
            return None
        if args and isinstance(args[0], torch.Tensor):
            return (_fq(args[0], s), *args[1:]), kwargs
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return args, {**kwargs, k: _fq(v, s)}
        return None

    def _make_pre(self, path: str):
        sim = self.sim

        def pre(module, args):
            tap = sim._tap_of(module, path)
            s = self._input_fq.get(tap) if self.modelopt else self._fq_taps.get(f"{tap}:input")
            if s is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None
            return (_fq(args[0], s), *args[1:])

        return pre

    def _make_post(self, path: str):
        sim = self.sim

        def post(module, args, output):
            tap = sim._tap_of(module, path)
            sim._current[id(module)].pop()
            if self.modelopt or sim._call_kind.get(tap) in ("softmax", "opaque") \
                    or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            norm = self._fq_taps.get(f"{tap}:normalized")
            if norm is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
                x = args[0]
                shape = [1, -1] + [1] * (x.dim() - 2)
                xhat = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
                output = _fq(xhat, norm)
                if module.affine:
                    output = output * module.weight.view(shape) + module.bias.view(shape)
            s = self._fq_taps.get(tap)
            return _fq(output, s) if s is not None else output

        return post


class Simulation:
    """A model under INT8 simulation (what :func:`int8_simulation` yields).

    It discovers the model's graph (one forward), plans the NVDLA layers and names every
    call; an engine chosen once by the placement changes the computation (``"nvdla"``:
    replaced forwards running the integer layers; ``"all"`` / ``"modelopt"``: fake-quant
    hooks and quantized weights).

    Attributes:
        model: the model.
        table: the calibration table.
        config: the :class:`SimulationConfig`.
    """

    def __init__(self, model: nn.Module, table, config: SimulationConfig, layers: Iterable[str] | None = None) -> None:
        self.model = model
        self.table = table
        self.config = config
        self._requested_layers = None if layers is None else tuple(layers)
        self._engine: _Engine = (_GraphEngine(self) if config.placement == "nvdla"
                                 else _TapEngine(self, modelopt=config.placement == "modelopt"))
        self._plan: SimulationPlan | None = None
        self._handles: list = []
        self._sites: CallSites | None = None
        self._current: dict[int, list[str]] = {}  # id(module) -> taps of its running calls
        self._index: dict[str, int] = {}
        self._busy = False
        self._modules: dict[str, nn.Module] = {}
        self._missing: list[tuple[str, str]] = []
        self._call_kind: dict[str, str] = {}

    # -- public ------------------------------------------------------------------------
    def requantization(self) -> tuple[LayerRequant, ...]:
        """What the NVDLA integer simulation programs per layer, as the compiler prints it:
        each rescaling layer's multiplier ``m`` (a tuple per filter in per-filter mode)
        and shift ``t``, and a conv / fc's bias as int16 values with their left shift.

        Raises:
            CalibrationError: not in ``mode="nvdla"``, or no plan yet (no example given
                and no forward run).
        """
        if self.config.mode != "nvdla":
            raise CalibrationError("requantization() needs mode='nvdla'")
        if self._plan is None:
            raise CalibrationError("no plan yet: pass example= or run one forward first")
        out = []
        for i, rt in sorted(self._engine.runtimes().items()):
            m = getattr(rt, "m", None)
            if m is None:
                continue
            layer = self._plan.layers[i]
            m = tuple(int(v) for v in m.tolist()) if isinstance(m, torch.Tensor) else int(m)
            sw = getattr(rt, "sw", 1.0)
            sw = tuple(float(v) for v in sw.reshape(-1).tolist()) if isinstance(sw, torch.Tensor) and sw.dim() else float(sw)
            s_in = float(getattr(rt, "s_common", rt.s_in[0] if rt.s_in else 0.0))
            out.append(LayerRequant(layer.name, layer.kind, m, int(rt.t), getattr(rt, "bias16", None), s_in,
                                    float(rt.s_out), sw))
        return tuple(out)

    @property
    def plan(self) -> SimulationPlan | None:
        """The plan (``None`` until the first forward when no example was given)."""
        return self._plan

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the layers currently simulated in INT8 (placement ``"nvdla"``)."""
        return self._engine.enabled_layers

    @property
    def missing(self) -> tuple[tuple[str, str], ...]:
        """``(where, tap)`` pairs the table lacks (run in FP32 with ``missing="fp32"``)."""
        return tuple(self._missing)

    def set_layers(self, layers: Iterable[str] | None) -> None:
        """Choose which layers run INT8 (``None``: all); the others run FP32.

        Only for placement ``"nvdla"``. Layer names are :attr:`Layer.name` (head taps).

        Raises:
            CalibrationError: another placement, or an unknown layer name.
        """
        self._engine.set_layers(layers)

    def replaying(self, base: dict | None, dirty: frozenset[int] | None) -> contextlib.AbstractContextManager[_Replay]:
        """Within: calls outside ``dirty`` (call indices) return their ``base`` output instead of
        running; every call's output is recorded in the yielded object's ``out`` (what
        :func:`~torch_nvdla.sim.sweep.sweep` uses to recompute only what a layer changes).
        Placement ``"nvdla"`` only."""
        return self._engine.replaying(base, dirty)

    # -- setup -----------------------------------------------------------------------------
    def _enter(self, example: Any) -> None:
        self._modules = dict(self.model.named_modules())
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        if example is not None:
            args, kwargs = call_args(example)
            self._prepare(args, kwargs)

    def _exit(self) -> None:
        if self._sites is not None:
            self._sites.close()
            self._sites = None
        self._current.clear()
        while self._handles:
            self._handles.pop().remove()
        self._engine.remove()

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        """Discover the graph (one forward on this batch), plan, install the engine."""
        self._busy = True
        try:
            with eval_mode(self.model):  # the discovery pass leaves no trace in the buffers
                raw = _Discovery(self.model).run(args, kwargs)
        finally:
            self._busy = False
        plan = _build_plan(raw, self.table, self.model, self.config)
        missing = _missing_for_placement(plan, self.table, self.config.placement)
        if missing and self.config.missing == "error":
            _raise_missing(missing, f"{self.config.placement!r} placement")
        if self._requested_layers is not None and self.config.placement != "nvdla":
            raise CalibrationError("choosing layers needs placement='nvdla' (the fused NVDLA graph)")
        self._missing = missing
        self._index = {c.tap: c.index for c in plan.calls}
        self._call_kind = {c.tap: c.kind for c in plan.calls}
        # Call-site naming shared with calibration (torch_nvdla.calib.taps.CallSites); registered
        # before the engine's hooks / forwards, so every call is named before it is simulated.
        self._sites = CallSites(self.model, on_input=self._on_pass, on_call=self._on_call)
        self._sites.__enter__()
        self._plan = self._engine.install(plan, missing)

    # -- call naming (both engines) ----------------------------------------------------------
    def _on_pass(self, module, args, kwargs) -> None:
        self._current.clear()

    def _on_call(self, tap: str, path: str, call: int, module: nn.Module, args) -> None:
        if tap not in self._index:
            raise CalibrationError(
                f"call {tap!r} did not happen when the simulation plan was built (data-dependent control flow?)"
            )
        self._current.setdefault(id(module), []).append(tap)

    def _tap_of(self, module: nn.Module, path: str) -> str:
        stack = self._current.get(id(module))
        if not stack:
            raise CalibrationError(f"module {path!r} was run without calling it (module.forward(...) instead of "
                                   "module(...)): the simulation cannot name the call")
        return stack[-1]

    def _root_pre(self, module, args, kwargs):
        if self._busy:
            return None
        x = _model_input(args, kwargs)
        if x is not None and not x.is_floating_point():
            raise CalibrationError(
                f"the model input 'data' is a {x.dtype} tensor; INT8 simulation needs the float input the model "
                "was calibrated on (preprocess first)"
            )
        if self._plan is None:
            self._prepare(args, kwargs)
        return self._engine.model_input(args, kwargs)


@contextlib.contextmanager
def int8_simulation(
    model: nn.Module,
    table,
    *,
    mode: str = "fake",
    weights: str = "per-kernel",
    placement: str | None = None,
    layers: Iterable[str] | None = None,
    missing: str = "error",
    example: Any = None,
    check_model: bool = True,
) -> Iterator[Simulation]:
    """Run ``model`` as INT8 within the ``with`` block; restore it exactly afterwards.

    Args:
        model: the calibrated model (its instance is changed, nothing global).
        table: its :class:`~torch_nvdla.CalibrationTable` (tap -> scale).
        mode: ``"fake"`` (quantize-dequantize) or ``"nvdla"`` (NVDLA integer arithmetic).
        weights: ``"per-filter"`` or ``"per-kernel"`` weight scales.
        placement: ``"all"`` (fake-quant default), ``"nvdla"`` or ``"modelopt"`` (see the
            module docstring).
        layers: placement ``"nvdla"`` only: layer names (head taps) to run INT8, the rest
            FP32 (default: all). Change later with :meth:`Simulation.set_layers`.
        missing: ``"error"`` or ``"fp32"`` for taps the table lacks.
        example: a batch to discover the graph on now; by default the first forward call
            inside the block discovers it (one extra FP32 pass on that batch).
        check_model: refuse a table of a different model.

    Inside the block the model runs in eval mode (BatchNorm folding needs the running
    statistics); every module's train/eval flag is restored on exit.

    Yields:
        The :class:`Simulation` (its ``plan`` shows layers, fusions and scales).

    Raises:
        CalibrationError: bad options; a table that lacks taps (names them, unless
            ``missing="fp32"``) or belongs to another model; an integer model input; a
            rescale factor NVDLA cannot represent (names the layer).

    Example::

        with int8_simulation(model, table, mode="nvdla", weights="per-filter"):
            logits = model(images)
    """
    config = SimulationConfig(mode=mode, weights=weights, placement=placement, missing=missing, check_model=check_model)
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(table, Mapping):
        raise CalibrationError(f"table must be a CalibrationTable (tap -> range), got {type(table).__name__}")
    sim = Simulation(model, table, config, layers)
    with eval_mode(model):
        try:
            sim._enter(example)
            yield sim
        finally:
            sim._exit()


def simulation_taps(model: nn.Module, example: Any, base: TapSelection | None = None) -> TapSelection:
    """The tap selection that feeds ``int8_simulation`` of ``model`` in every mode and
    placement: ``base`` (default: every leaf output and the input) plus the ``:input``
    taps of the calls whose input no observed module writes (a functional op's result,
    e.g. a residual ``+`` read by a conv). Found with one FP32 forward on ``example``.
    """
    from ..calib.table import CalibrationTable

    plan = plan_simulation(model, CalibrationTable({}), example, mode="nvdla", missing="fp32", check_model=False)
    inputs = tuple(dict.fromkeys(t[: -len(":input")] for _, t in plan.missing if t.endswith(":input")))
    return (base or TapSelection()).merged(TapSelection(inputs=inputs))


def plan_simulation(model: nn.Module, table, example: Any, **options) -> SimulationPlan:
    """The :class:`SimulationPlan` of ``model`` with ``table``, from one FP32 pass on ``example``.

    ``options`` are those of :func:`int8_simulation` (``mode``, ``weights``, ``placement``,
    ``missing``, ``check_model``). The model is left exactly as it was.
    """
    with int8_simulation(model, table, example=example, **options) as sim:
        return sim.plan


def compare_modes(model: nn.Module, table, example: Any, *, weights: str = "per-kernel",
                  missing: str = "error") -> dict[str, dict[str, float]]:
    """How far NVDLA integer outputs are from fake-quant ones (same fused graph), per layer.

    Runs ``example`` once under ``mode="fake", placement="nvdla"`` and once under
    ``mode="nvdla"`` (each end to end, so differences accumulate along the network) and
    compares each layer's int8 output.

    Returns:
        ``{layer: {"equal": fraction of elements equal, "within_one": fraction within one
        step, "max_steps": largest difference in steps}}``, in network order.
    """
    outputs = {}
    for mode in ("fake", "nvdla"):
        with int8_simulation(model, table, mode=mode, placement="nvdla", weights=weights, missing=missing,
                             example=example) as sim, torch.no_grad():
            args, kwargs = call_args(example)
            with sim.replaying(None, None) as rp:
                model(*args, **kwargs)
            outputs[mode] = (sim.plan, {i: t for i, (t, _) in rp.out.items()})
    plan, fake = outputs["fake"]
    _, nv = outputs["nvdla"]
    result = {}
    for layer in plan.layers:
        tail = layer.calls[-1]
        if layer.output_tap is None or layer.name in plan.fp32_layers or tail not in fake or tail not in nv:
            continue
        s = float(table[layer.output_tap].scale)
        d = ((fake[tail].double() - nv[tail].double()).abs() / s).round()
        result[layer.name] = {
            "equal": float((d == 0).double().mean()),
            "within_one": float((d <= 1).double().mean()),
            "max_steps": float(d.max()) if d.numel() else 0.0,
        }
    return result
