"""ONNX export for TensorRT on NVDLA (Jetson ``--useDLACore``): Q/DQ nodes and/or a calibration cache.

Design notes and the facts behind them: ``docs/export.md``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..calib.table import CalibrationTable
from ..calib.taps import BN_NORMALIZED, CallSites, DerivedTap, first_tensor
from ..errors import CalibrationError
from ..model.batch import call_args, split_labels
from ..model.state import eval_mode, model_device
from ..nvdla.naming import unique_name
from ..utils.io import atomic_write_bytes

__all__ = [
    "DEFAULT_OPSET",
    "MATCH_RTOL",
    "PLACEMENTS",
    "OnnxComparison",
    "OnnxExport",
    "QuantizedTensor",
    "TapComparison",
    "capture_taps",
    "compare_with_onnxruntime",
    "export_onnx",
    "map_taps",
    "quantize_onnx",
]

#: Opset of the exported graph: 13 is the first with per-axis Q/DQ, and what TensorRT 8.x
#: (JetPack 4.6 / 5) parses.
DEFAULT_OPSET = 13
#: A tap matches an ONNX tensor when ``max|onnx - torch| <= MATCH_RTOL * max|torch| + 1e-6``.
#: BatchNorm folding changes float rounding by ~1e-6 relative; distinct tensors of one
#: shape differ by far more than 0.1 %.
MATCH_RTOL = 1e-3
_MATCH_ATOL = 1e-6
#: Q/DQ placements (see the module docstring).
PLACEMENTS = ("nvdla", "all")

#: Ops whose output holds a subset / rearrangement of the input's values (or zeros):
#: a tensor they produce inherits its input's range in the TensorRT cache.
_RANGE_PRESERVING = frozenset({
    "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "GlobalMaxPool", "Slice",
    "Identity", "Dropout", "Pad", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Gather",
})
#: Node types whose second input is a weight that Q/DQ quantizes.
_WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})
_WEIGHT_MODES = ("per-filter", "per-kernel")
_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
_SOFTMAX_MODULES = frozenset({"Softmax", "LogSoftmax", "Softmin", "Softmax2d"})


# ----------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """One activation Q/DQ pair of the exported graph.

    Attributes:
        tensor: the ONNX tensor it quantizes (a name of the plain graph).
        tap: the tap (or call) whose tensor it is.
        scale_tap: the table entry whose amax sets the scale (``tap`` itself with
            placement ``"all"``; NVDLA's rules may pick another, e.g. a fused ReLU's).
        amax: that amax (``scale = amax / 127``).
        dq: the ``DequantizeLinear`` output that carries it in the Q/DQ graph.
    """

    tensor: str
    tap: str
    scale_tap: str
    amax: float
    dq: str

    @property
    def scale(self) -> float:
        return self.amax / 127.0


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how the taps map onto the ONNX graph.

    Attributes:
        path: the ONNX model written (Q/DQ when ``qdq``), or ``None`` when not written.
        cache_path: the TensorRT calibration cache, or ``None``.
        plain_path: the ONNX model the cache's names refer to (``path`` itself without
            Q/DQ; ``<name>.noqdq.onnx`` beside it with Q/DQ), or ``None``.
        qdq: whether ``model`` holds Q/DQ nodes.
        placement: ``"nvdla"`` or ``"all"`` (which tensors got Q/DQ).
        weights: weight quantization of the Q/DQ graph (``"per-filter"``,
            ``"per-kernel"``; ``None``: float weights or no Q/DQ).
        tensors: tap -> ONNX tensor (plain graph), aliases included, network order.
        aliases: tap -> the tap that owns its tensor.
        unmapped: tap -> why no ONNX tensor holds it.
        fused_into: unmapped tap -> the tensor of its own module that holds something
            else (a Conv that absorbed a BatchNorm), where there is one.
        quantized: the activation Q/DQ pairs, in graph order.
        not_quantized: mapped tap -> why its tensor has no Q/DQ of its own (softmax,
            fused into an NVDLA layer, a pool keeping its input's scale, ...).
        qdq_tensors: tap -> the ``DequantizeLinear`` output carrying its tensor.
        propagated: tensor -> tensor whose range it inherits in the cache.
        uncovered: float activation tensors with no range in the cache.
        quantized_weights: weight initializer -> ``"per-filter axis k"`` / ``"per-kernel"``.
        match_error: tap -> ``max|onnx - torch| / max|torch|`` of its match.
        amax_conflicts: alias tap -> (its amax, the owner's) where they differ.
        input_names / output_names: the graph's input and output names.
        model: the ONNX model (Q/DQ when ``qdq``).
        plain_model: the ONNX model without Q/DQ.
    """

    path: Path | None
    cache_path: Path | None
    plain_path: Path | None
    qdq: bool
    placement: str
    weights: str | None
    tensors: dict[str, str]
    aliases: dict[str, str]
    unmapped: dict[str, str]
    fused_into: dict[str, str]
    quantized: tuple[QuantizedTensor, ...]
    not_quantized: dict[str, str]
    qdq_tensors: dict[str, str]
    propagated: dict[str, str]
    uncovered: tuple[str, ...]
    quantized_weights: dict[str, str]
    match_error: dict[str, float]
    amax_conflicts: dict[str, tuple[float, float]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    model: Any = field(repr=False, compare=False, default=None)
    plain_model: Any = field(repr=False, compare=False, default=None)

    def to_dict(self) -> dict:
        """A JSON-ready summary (no models)."""
        return {
            "path": str(self.path) if self.path else None,
            "cache_path": str(self.cache_path) if self.cache_path else None,
            "plain_path": str(self.plain_path) if self.plain_path else None,
            "qdq": self.qdq,
            "placement": self.placement,
            "weights": self.weights,
            "tensors": dict(self.tensors),
            "aliases": dict(self.aliases),
            "unmapped": dict(self.unmapped),
            "fused_into": dict(self.fused_into),
            "quantized": [{"tensor": q.tensor, "tap": q.tap, "scale_tap": q.scale_tap, "amax": q.amax,
                           "scale": q.scale, "dq": q.dq} for q in self.quantized],
            "not_quantized": dict(self.not_quantized),
            "in_float": self.in_float,
            "qdq_tensors": dict(self.qdq_tensors),
            "propagated": dict(self.propagated),
            "uncovered": list(self.uncovered),
            "quantized_weights": dict(self.quantized_weights),
            "amax_conflicts": {k: list(v) for k, v in self.amax_conflicts.items()},
        }

    @property
    def in_float(self) -> dict[str, str]:
        """Taps whose layer runs in float in the Q/DQ graph because the table lacks a range
        it needs (tap -> why); a TensorRT build would keep them out of INT8."""
        return {tap: why for tap, why in self.not_quantized.items() if "FP32" in why}

    def print(self, table: CalibrationTable | None = None, *, limit: int | None = None) -> None:
        """Print the tap -> tensor mapping as a rich table (stdout); unmapped taps are flagged."""
        from rich.table import Table

        from ..utils.report import stdout

        by_tensor = {q.tensor: q for q in self.quantized}
        t = Table(title=f"ONNX tap mapping: {len(self.tensors)} mapped, {len(self.unmapped)} unmapped, "
                        f"{len(self.quantized)} Q/DQ pairs (placement {self.placement!r})")
        for col, kw in [("#", {"justify": "right"}), ("tap", {}), ("ONNX tensor", {}), ("amax", {"justify": "right"}),
                        ("status", {})]:
            t.add_column(col, **kw)
        names = list(dict.fromkeys([*(table if table is not None else []), *self.tensors, *self.unmapped]))
        shown = names if limit is None else names[:limit]
        for i, name in enumerate(shown):
            amax = f"{table[name].amax:.5g}" if table is not None and name in table else ""
            tensor = self.tensors.get(name, "-")
            if name in self.unmapped:
                status = f"[yellow]unmapped[/]: {self.unmapped[name]}"
            else:
                notes = []
                q = by_tensor.get(tensor)
                if name in self.aliases:
                    notes.append(f"same tensor as {self.aliases[name]}")
                elif not self.qdq:
                    notes.append("cache")
                elif q is not None:
                    notes.append("[green]Q/DQ[/]" + (f" at the scale of {q.scale_tap!r}" if q.scale_tap != name else ""))
                elif name in self.not_quantized:
                    notes.append(f"no Q/DQ: {self.not_quantized[name]}")
                if name in self.amax_conflicts:
                    mine, owner = self.amax_conflicts[name]
                    notes.append(f"[yellow]amax {mine:.5g} != owner's {owner:.5g}[/]")
                status = "; ".join(notes)
            t.add_row(str(i), name, tensor, amax, status)
        if len(shown) < len(names):
            t.add_row("…", f"{len(names) - len(shown)} more", "", "", "")
        stdout.print(t)
        if self.unmapped:
            stdout.print(f"[yellow]{len(self.unmapped)} tap(s) have no ONNX tensor:[/] {', '.join(self.unmapped)}",
                         highlight=False)
        if self.in_float:
            stdout.print(f"[yellow]{len(self.in_float)} tap(s) run in FP32 (the table lacks ranges their layer "
                         f"needs):[/] {', '.join(list(self.in_float)[:12])}" + (" ..." if len(self.in_float) > 12 else ""),
                         highlight=False)
        if self.uncovered:
            stdout.print(f"[yellow]{len(self.uncovered)} float tensor(s) have no range in the cache:[/] "
                         + ", ".join(self.uncovered[:12]) + (" ..." if len(self.uncovered) > 12 else ""),
                         highlight=False)
        plain = self.plain_path if self.plain_path != self.path else None
        for what, p in (("model", self.path), ("no-Q/DQ model", plain), ("TensorRT cache", self.cache_path)):
            if p is not None:
                stdout.print(f"wrote {what}: {p}", highlight=False)


@dataclass(frozen=True)
class TapComparison:
    """One tap of :class:`OnnxComparison`.

    Attributes:
        tap: the tap name.
        tensor: the ``DequantizeLinear`` output carrying it in the Q/DQ graph.
        scale: the quantization step of that Q/DQ pair.
        local_steps: ``max |onnxruntime - simulation| / scale`` when onnxruntime
            recomputes the tensor from the simulation's own quantized inputs (one layer,
            no propagation): at most 1 where the graph is the same.
        local_mismatch: fraction of elements differing locally (by more than 1e-3 step).
        max_steps: the same difference end to end (whole network in onnxruntime).
        mismatch: fraction of elements differing end to end.
        ties: elements where ``x / scale`` was exactly ``k + 0.5`` at onnxruntime's
            QuantizeLinear (local run).
        flips: ties where round-half-even and round-half-away disagree (``k`` even).
        same_graph: no difference of placement upstream of (or at) this tensor.
        simulated: the simulation's value lies on this Q/DQ pair's int8 grid.
    """

    tap: str
    tensor: str
    scale: float
    local_steps: float
    local_mismatch: float
    max_steps: float
    mismatch: float
    ties: int
    flips: int
    same_graph: bool
    simulated: bool


@dataclass(frozen=True)
class OnnxComparison:
    """onnxruntime on the Q/DQ model vs ``int8_simulation``, from :func:`compare_with_onnxruntime`.

    Attributes:
        samples: images compared.
        top1_fp32: top-1 accuracy (%) of the float model in PyTorch.
        top1_simulation: top-1 (%) under ``int8_simulation``.
        top1_onnxruntime: top-1 (%) of the Q/DQ model in onnxruntime.
        agreement: % of images where the two INT8 predictions are the same class.
        taps: per-tap comparison (first ``tensor_batches`` batches).
        unmapped: taps with no ONNX tensor (from the export).
        placement: the Q/DQ / simulation placement.
        weights: weight quantization used on both sides.
        tensor_samples: images in the per-tap comparison.
        rounding: ``"half-even"`` (the Q/DQ model as is) or ``"half-away"`` (its
            QuantizeLinear nodes emulated with NVDLA's rounding).
    """

    samples: int
    top1_fp32: float
    top1_simulation: float
    top1_onnxruntime: float
    agreement: float
    taps: tuple[TapComparison, ...]
    unmapped: dict[str, str]
    placement: str
    weights: str | None
    tensor_samples: int = 0
    rounding: str = "half-even"
    top1_onnxruntime_optimized: float | None = None

    @property
    def top1_gap(self) -> float:
        """``|top1_onnxruntime - top1_simulation|`` in points."""
        return abs(self.top1_onnxruntime - self.top1_simulation)

    @property
    def local_steps_same_graph(self) -> float:
        """The largest local difference (steps) over taps where the graph is the same."""
        return max((t.local_steps for t in self.taps if t.same_graph), default=0.0)

    @property
    def max_steps_same_graph(self) -> float:
        """The largest end-to-end difference (steps) over taps where the graph is the same."""
        return max((t.max_steps for t in self.taps if t.same_graph), default=0.0)

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        return {
            "samples": self.samples, "top1_fp32": self.top1_fp32, "top1_simulation": self.top1_simulation,
            "top1_onnxruntime": self.top1_onnxruntime, "top1_gap": self.top1_gap, "agreement": self.agreement,
            "local_steps_same_graph": self.local_steps_same_graph, "max_steps_same_graph": self.max_steps_same_graph,
            "placement": self.placement, "weights": self.weights, "tensor_samples": self.tensor_samples,
            "rounding": self.rounding, "top1_onnxruntime_optimized": self.top1_onnxruntime_optimized,
            "unmapped": dict(self.unmapped), "taps": [dict(t.__dict__) for t in self.taps],
        }

    def print(self, title: str | None = None) -> None:
        """Print the report as rich tables (stdout)."""
        from rich.table import Table

        from ..utils.report import stdout

        how = "Q/DQ" if self.rounding == "half-even" else "Q/DQ, QuantizeLinear rounding half away"
        s = Table(title=title or f"onnxruntime ({how}) vs int8_simulation (fake-quant, placement {self.placement!r}, "
                                 f"weights {self.weights})")
        for col in ("images", "FP32 top-1", "simulation top-1", "onnxruntime top-1", "gap (points)", "same class"):
            s.add_column(col, justify="right")
        s.add_row(str(self.samples), f"{self.top1_fp32:.2f} %", f"{self.top1_simulation:.2f} %",
                  f"{self.top1_onnxruntime:.2f} %", f"{self.top1_gap:.2f}", f"{self.agreement:.2f} %")
        stdout.print(s)
        if self.top1_onnxruntime_optimized is not None:
            stdout.print(f"onnxruntime with graph optimizations (its fused int8 kernels): "
                         f"{self.top1_onnxruntime_optimized:.2f} % top-1. It may differ from the reference run "
                         f"above with the host CPU: on x86 without VNNI those kernels sum u8 x s8 pairs in "
                         f"int16 and saturate; it does not validate the export.", highlight=False)
        t = Table(title=f"per tensor, {self.tensor_samples} images: |onnxruntime - simulation| in quantization steps "
                        "(local: recomputed from the simulation's inputs; end to end: whole network)")
        for col, kw in [("tap", {}), ("ONNX tensor", {}), ("scale", {"justify": "right"}),
                        ("local max", {"justify": "right"}), ("local differing", {"justify": "right"}),
                        ("end-to-end max", {"justify": "right"}), ("differing", {"justify": "right"}),
                        ("ties", {"justify": "right"}),
                        ("flips", {"justify": "right"}), ("graph", {})]:
            t.add_column(col, **kw)
        for c in self.taps:
            local = f"{c.local_steps:.3g}"
            if c.same_graph and c.local_steps > 1.0 + 1e-3:
                local = f"[red]{local}[/]"
            graph = "same" if c.same_graph else "[yellow]differs[/]"
            if not c.simulated:
                graph += " (off the simulation's grid)"
            t.add_row(c.tap, c.tensor, f"{c.scale:.4g}", local, f"{100 * c.local_mismatch:.3f} %", f"{c.max_steps:.3g}",
                      f"{100 * c.mismatch:.3f} %",
                      str(c.ties), str(c.flips), graph)
        stdout.print(t)
        if self.unmapped:
            stdout.print(f"[yellow]unmapped taps (no ONNX tensor):[/] {', '.join(self.unmapped)}", highlight=False)


# ----------------------------------------------------------------------------------------
# Capturing tap values in PyTorch
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_taps(model: nn.Module, names: Iterable[str] | None = None,
                 derived: Sequence[DerivedTap] = (BN_NORMALIZED,)):
    """Record the tensor of every tap during forward passes (hooks removed on exit).

    Names follow :mod:`torch_nvdla.calib.taps`: ``data``, ``<path>``, ``<path>#k``,
    ``<tap>:input``, ``<tap>:<derived>``. Each forward pass overwrites the previous one's
    values. Hooks are registered on entry, after any already on the model, so they see
    what earlier hooks (a fake-quant simulation) made of each output.

    Args:
        model: the model.
        names: taps to keep (default: every leaf output and ``data``).
        derived: derived taps that may be requested.

    Yields:
        A dict tap -> detached clone of the tensor (filled during each forward).
    """
    wanted = None if names is None else set(names)
    values: dict[str, torch.Tensor] = {}

    def keep(name: str, x) -> None:
        if (wanted is None or name in wanted) and isinstance(x, torch.Tensor) and x.is_floating_point():
            values[name] = x.detach().clone()

    def on_input(module, args, kwargs):
        keep("data", first_tensor(tuple(args) + tuple(kwargs.values())))

    def on_call(tap, path, call, module, args):
        keep(f"{tap}:input", first_tensor(args))

    def on_output(tap, path, call, module, args, output):
        keep(tap, output)
        for d in derived:
            name = f"{tap}:{d.name}"
            if (wanted is None or name in wanted) and d.applies(module):
                with torch.no_grad():
                    keep(name, d.fn(module, args, output))

    with CallSites(model, on_input=on_input, on_call=on_call, on_output=on_output):
        yield values


# ----------------------------------------------------------------------------------------
# Export and mapping
# ----------------------------------------------------------------------------------------


def _as_args(example_input) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input \
            and all(isinstance(a, torch.Tensor) for a in example_input):
        return tuple(example_input)
    raise CalibrationError(f"example_input must be a tensor or a tuple of tensors (a batch of real inputs), "
                           f"got {type(example_input).__name__}")


def _torch_export(model: nn.Module, args: tuple, *, opset: int, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_batch: bool, fold_batchnorm: bool):
    """Export with the TorchScript-based exporter; returns the ``onnx.ModelProto``."""
    import onnx

    buf = io.BytesIO()
    dyn = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    mode = torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation / folding notices
        with torch.no_grad(), eval_mode(model):
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dyn, training=mode,
                              do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _float_tensors(model) -> dict[str, tuple]:
    """Float activation tensors of a graph (graph inputs + node outputs) -> static shape (None dims)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    infos = {v.name: v for v in [*g.value_info, *g.output, *g.input]}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    inits = {i.name for i in g.initializer}
    out: dict[str, tuple] = {}
    names = [i.name for i in g.input if i.name not in inits] + [o for n in g.node for o in n.output if o]
    for name in names:
        v = infos.get(name)
        if v is None or v.type.tensor_type.elem_type in floats:
            dims = () if v is None else tuple(d.dim_value if d.HasField("dim_value") else None
                                               for d in v.type.tensor_type.shape.dim)
            out[name] = dims
    return out


def _session(model, outputs: Sequence[str] | None = None, *, optimize: bool = False, threads: int | None = None):
    """An onnxruntime CPU session; ``outputs`` exposes extra tensors as graph outputs."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is an optional dependency
        raise CalibrationError("the ONNX export runs the graph in onnxruntime (to match taps to tensors by value "
                               "and to compare): pip install onnxruntime") from None
    if outputs:
        model = _copy(model)
        have = {o.name for o in model.graph.output}
        for name in outputs:
            if name not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                have.add(name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _copy(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _scope_parts(node_name: str) -> list[str]:
    """``/layer1/layer1.0/relu1/Relu_1`` -> ``['layer1', 'layer1.0', 'relu1']`` (the op dropped)."""
    parts = [p for p in node_name.split("/") if p]
    return parts[:-1]


def _scope_path(node_name: str) -> str:
    """The module path a TorchScript-exporter node name records.

    ``/layer1/layer1.0/relu1/Relu_1`` -> ``layer1.0.relu1``: each scope level is either a
    child's attribute name or (for containers) its full dotted path.
    """
    current = ""
    for part in _scope_parts(node_name):
        if current and part.startswith(current + "."):
            current = part
        else:
            current = f"{current}.{part}" if current else part
    return current


def _scope_matches(module_path: str, node_name: str) -> bool:
    """Whether a node was exported inside the module at ``module_path``."""
    return bool(module_path) and _scope_path(node_name) == module_path


def _module_path_of(tap: str, infos: Mapping) -> str:
    info = infos.get(tap)
    if info is not None:
        return info.module
    base = tap.split(":", 1)[0]
    return base.split("#", 1)[0] if base != "data" else ""


@dataclass(frozen=True)
class _Mapping:
    tensors: dict[str, str]
    owners: dict[str, str]
    aliases: dict[str, str]
    unmapped: dict[str, str]
    errors: dict[str, float]
    fused_into: dict[str, str]


def map_taps(model: nn.Module, table: CalibrationTable | Sequence[str], onnx_model, example_input, *,
             derived: Sequence[DerivedTap] = (BN_NORMALIZED,), rtol: float = MATCH_RTOL) -> _Mapping:
    """Map every tap to the ONNX tensor holding the same values (see the module docstring).

    Args:
        model: the PyTorch model that was exported.
        table: the calibration table (or just the tap names), in network order.
        onnx_model: the exported ``onnx.ModelProto`` (without Q/DQ).
        example_input: the batch to run both on (real inputs are best).
        derived: derived taps that can be recomputed.
        rtol: relative tolerance of a value match.

    Returns:
        An object with ``tensors`` (tap -> tensor), ``owners`` (tensor -> owning tap),
        ``aliases`` (tap -> owner tap), ``unmapped`` (tap -> reason), ``errors`` (relative
        match error) and ``fused_into`` (unmapped tap -> the tensor of its module).
    """
    names = list(table)
    infos = getattr(table, "infos", {}) or {}
    args = _as_args(example_input)
    dev = model_device(model) or torch.device("cpu")
    with torch.no_grad(), eval_mode(model), capture_taps(model, names, derived) as captured:
        model(*[a.to(dev) for a in args])
    captured = dict(captured)
    graph = _GraphValues.of(onnx_model, args)
    tensors, owners, aliases, unmapped, errors, fused = {}, {}, {}, {}, {}, {}
    for tap in names:
        t = captured.get(tap)
        if t is None:
            unmapped[tap] = _why_not_captured(tap, infos)
            continue
        ref = t.detach().to(torch.float32).cpu().numpy()
        name, err, scoped = graph.match(ref, _module_path_of(tap, infos), rtol)
        if name is None:
            if scoped:
                fused[tap] = scoped[-1]
                unmapped[tap] = f"fused: {scoped[-1]} holds other values (e.g. Conv+BatchNorm folded)"
            else:
                unmapped[tap] = f"no ONNX tensor of shape {tuple(ref.shape)} holds these values (fused or folded away)"
            continue
        ref_max = float(np.abs(ref).max()) if ref.size else 0.0
        tensors[tap] = name
        errors[tap] = err / ref_max if ref_max > 0 else err
        if name in owners:
            aliases[tap] = owners[name]
        else:
            owners[name] = tap
    return _Mapping(tensors, owners, aliases, unmapped, errors, fused)


def _why_not_captured(tap: str, infos: Mapping) -> str:
    kind = getattr(infos.get(tap), "kind", "")
    if kind == "derived" or (":" in tap and not tap.endswith(":input")):
        return "derived tap: not recomputed for export"
    return "not observed when the model ran on example_input"


@dataclass
class _GraphValues:
    """Every float tensor of an ONNX graph on one batch, indexed for matching by value."""

    values: dict[str, np.ndarray]
    producer: dict[str, str]
    position: dict[str, int]
    by_shape: dict[tuple, list[str]]
    by_numel: dict[int, list[str]]

    @classmethod
    def of(cls, onnx_model, args: Sequence[torch.Tensor]) -> "_GraphValues":
        floats = _float_tensors(onnx_model)
        graph_inputs = [i.name for i in onnx_model.graph.input]
        feeds = {name: a.detach().cpu().numpy() for name, a in zip(graph_inputs, args)}
        sess = _session(onnx_model, list(floats), optimize=False)
        out_names = [o.name for o in sess.get_outputs()]
        values = dict(feeds)
        for name, v in zip(out_names, sess.run(out_names, feeds)):
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                values[name] = v
        producer: dict[str, str] = {}
        position: dict[str, int] = {n: -1 for n in graph_inputs}
        for i, node in enumerate(onnx_model.graph.node):
            for o in node.output:
                producer[o] = node.name
                position[o] = i
        by_shape: dict[tuple, list[str]] = {}
        by_numel: dict[int, list[str]] = {}
        for name, v in values.items():
            by_shape.setdefault(tuple(v.shape), []).append(name)
            by_numel.setdefault(int(v.size), []).append(name)
        return cls(values, producer, position, by_shape, by_numel)

    def match(self, ref: np.ndarray, path: str, rtol: float) -> tuple[str | None, float, list[str]]:
        """The tensor holding ``ref``'s values within ``rtol`` of its largest |value|:
        preferring one produced inside the tap's module scope, then the smallest error, then
        the latest. Returns it (or None), its error, and the same-shaped tensors of the scope."""
        ref_max = float(np.abs(ref).max()) if ref.size else 0.0
        tol = rtol * ref_max + _MATCH_ATOL
        best = None
        scoped_names = []
        for name in self.by_shape.get(tuple(ref.shape)) or self.by_numel.get(int(ref.size), []):
            v = self.values[name]
            if v.size != ref.size:
                continue
            err = float(np.abs(v.reshape(ref.shape).astype(np.float32) - ref).max()) if ref.size else 0.0
            scoped = _scope_matches(path, self.producer.get(name, ""))
            if scoped:
                scoped_names.append(name)
            if err <= tol:
                key = (0 if scoped else 1, err, -self.position.get(name, -1))
                if best is None or key < best[0]:
                    best = (key, name, err)
        if best is None:
            return None, 0.0, scoped_names
        return best[1], best[2], scoped_names


# ----------------------------------------------------------------------------------------
# Q/DQ insertion
# ----------------------------------------------------------------------------------------


def _all_names(graph) -> set[str]:
    used = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        used.update(n.output)
        used.add(n.name)
    return used


def _weight_axis(node) -> int | None:
    """Output-channel axis of the node's weight (input 1), or None when unsupported."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return None


def quantize_onnx(onnx_model, amax: Mapping[str, float], *, weights: str | None = "per-kernel"):
    """Insert Q/DQ pairs after the given tensors and quantize conv / FC weights.

    Args:
        onnx_model: a float ``onnx.ModelProto`` (opset >= 13); not modified.
        amax: tensor name -> amax (per-tensor ``scale = amax / 127``, zero point 0).
        weights: ``"per-filter"`` (per output channel), ``"per-kernel"`` (one scale per
            weight) or ``None`` (weights stay float).

    Returns:
        ``(model, dq_names, quantized_weights)``: the Q/DQ model, tensor -> the
        ``DequantizeLinear`` output that now carries it, and weight -> description.

    Raises:
        CalibrationError: opset < 13, an unknown weight mode, a tensor not in the
            graph, or a non-positive amax (naming it).
    """
    import onnx

    _check_quantize_options(onnx_model, amax, weights)
    model = _copy(onnx_model)
    g = model.graph
    used = _all_names(g)
    new_inits: list = []
    pre_nodes: list = []  # weight DQs (their inputs are initializers)
    quantized_weights: dict[str, str] = {}
    if weights is not None:
        quantized_weights = _quantize_weights(g, weights, used, new_inits, pre_nodes)
        keep = [i for i in g.initializer if i.name not in quantized_weights]
        del g.initializer[:]
        g.initializer.extend(keep)
    graph_outputs = {o.name for o in g.output}
    dq_names: dict[str, str] = {}
    pairs: dict[str, list] = {}
    renamed: dict[str, str] = {}  # graph output T -> the float tensor now produced as T
    for name, a in amax.items():
        pairs[name], dq_names[name] = _qdq_pair(name, float(a), name in graph_outputs, used, new_inits, renamed)
    g.initializer.extend(new_inits)
    _splice(g, pre_nodes, pairs, dq_names, renamed)
    # Shapes recorded for renamed / removed tensors would be stale: let them be re-inferred.
    stale = set(renamed) | set(quantized_weights)
    keep_vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    onnx.checker.check_model(model, full_check=True)
    return model, dq_names, quantized_weights


def _check_quantize_options(onnx_model, amax: Mapping[str, float], weights: str | None) -> None:
    if weights is not None and weights not in _WEIGHT_MODES:
        raise CalibrationError(f"weights must be one of {_WEIGHT_MODES} or None, got {weights!r}")
    opset = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise CalibrationError(f"Q/DQ with per-channel weights needs ONNX opset >= 13, the model has {opset}")
    g = onnx_model.graph
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for name, a in amax.items():
        if name not in produced:
            raise CalibrationError(f"tensor {name!r} is not produced in the ONNX graph; cannot quantize it")
        if not (math.isfinite(float(a)) and float(a) > 0):
            raise CalibrationError(f"tensor {name!r}: amax must be finite and > 0, got {a!r}")


def _quantize_weights(g, weights: str, used: set[str], new_inits: list, pre_nodes: list) -> dict[str, str]:
    """Conv / Gemm / MatMul weights as int8 initializers behind a DequantizeLinear (which
    keeps the weight's name); returns weight -> how it was quantized."""
    from onnx import helper, numpy_helper

    from ..nvdla.weights import quantize_weight

    inits = {i.name: i for i in g.initializer}
    quantized: dict[str, str] = {}
    for node in g.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        wname = node.input[1]
        axis = _weight_axis(node)
        if wname in quantized or wname not in inits or axis is None:
            continue
        w = numpy_helper.to_array(inits[wname])
        if w.dtype.kind != "f" or w.ndim < 2 or (axis == 1 and w.ndim != 2):
            continue
        wt = torch.from_numpy(np.ascontiguousarray(w if axis == 0 else w.T).astype(np.float32))
        qw = quantize_weight(wt, weights, name=wname)
        q = qw.q.numpy() if axis == 0 else np.ascontiguousarray(qw.q.numpy().T)
        scale = qw.scale.numpy().astype(np.float32)
        qn = unique_name(f"{wname}_quantized", used)
        sn = unique_name(f"{wname}_scale", used)
        zn = unique_name(f"{wname}_zero_point", used)
        new_inits += [numpy_helper.from_array(q.astype(np.int8), qn), numpy_helper.from_array(scale, sn),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn)]
        kw = {"axis": axis} if scale.ndim == 1 else {}
        pre_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [wname],
                                          name=unique_name(f"{wname}_DequantizeLinear", used), **kw))
        quantized[wname] = f"per-filter axis {axis}" if scale.ndim == 1 else "per-kernel"
    return quantized


def _qdq_pair(name: str, amax: float, is_output: bool, used: set[str], new_inits: list,
              renamed: dict[str, str]) -> tuple[list, str]:
    """The QuantizeLinear / DequantizeLinear pair of one tensor and the DQ's output name (a
    graph output keeps its name on the DQ; its producer then writes ``<name>_float``)."""
    from onnx import helper, numpy_helper

    scale = np.float32(amax / 127.0)
    sn = unique_name(f"{name}_scale", used)
    zn = unique_name(f"{name}_zero_point", used)
    new_inits += [numpy_helper.from_array(np.array(scale, np.float32), sn),
                  numpy_helper.from_array(np.array(0, np.int8), zn)]
    src = name
    if is_output:
        src = unique_name(f"{name}_float", used)
        renamed[name] = src
        dq = name
    else:
        dq = unique_name(f"{name}_dequantized", used)
    qout = unique_name(f"{name}_quantized", used)
    return [
        helper.make_node("QuantizeLinear", [src, sn, zn], [qout], name=unique_name(f"{name}_QuantizeLinear", used)),
        helper.make_node("DequantizeLinear", [qout, sn, zn], [dq], name=unique_name(f"{name}_DequantizeLinear", used)),
    ], dq


def _splice(g, pre_nodes: list, pairs: Mapping[str, list], dq_names: Mapping[str, str],
            renamed: Mapping[str, str]) -> None:
    """Put each pair right after its tensor's producer and point every reader at the DQ."""
    rewire = {t: dq for t, dq in dq_names.items() if t not in renamed}
    original = {r: t for t, r in renamed.items()}
    nodes = list(pre_nodes)
    for i in g.input:
        nodes += pairs.get(i.name, [])
    for node in g.node:
        for k, inp in enumerate(node.input):
            if inp in rewire:
                node.input[k] = rewire[inp]
        for k, out in enumerate(node.output):
            if out in renamed:
                node.output[k] = renamed[out]
        nodes.append(node)
        for out in node.output:
            nodes += pairs.get(original.get(out, out), [])
    del g.node[:]
    g.node.extend(nodes)


# ----------------------------------------------------------------------------------------
# Cache entries
# ----------------------------------------------------------------------------------------


def _dynamic_tensors(graph) -> set[str]:
    """Tensors that depend on a graph input (activations and shape computations)."""
    inits = {i.name for i in graph.initializer}
    dyn = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:
        if any(i in dyn for i in node.input if i):
            dyn.update(o for o in node.output if o)
    return dyn


def _cache_ranges(plain_model, owners_amax: Mapping[str, float]
                  ) -> tuple[dict[str, float], dict[str, str], tuple[str, ...]]:
    """Tensor -> amax for the cache, with ranges propagated through range-preserving ops."""
    amax = dict(owners_amax)
    propagated: dict[str, str] = {}
    for node in plain_model.graph.node:
        if node.op_type in _RANGE_PRESERVING and node.input and node.input[0] in amax:
            for o in node.output:
                if o and o not in amax:
                    amax[o] = amax[node.input[0]]
                    propagated[o] = propagated.get(node.input[0], node.input[0])
    floats = _float_tensors(plain_model)
    dyn = _dynamic_tensors(plain_model.graph)
    uncovered = tuple(n for n in floats if n in dyn and n not in amax)
    return amax, propagated, uncovered


def _write_cache(path: Path, amax: Mapping[str, float], trt_version: str | None) -> Path:
    from ..nvdla.trtcache import write_trt_cache

    kwargs = {} if trt_version is None else {"version": trt_version}
    write_trt_cache(dict(amax), path, **kwargs)
    return Path(path)



# ----------------------------------------------------------------------------------------
# Placement: which tensors get Q/DQ, at which scale
# ----------------------------------------------------------------------------------------


def _is_softmax_tap(tap: str, table: CalibrationTable) -> bool:
    info = getattr(table, "infos", {}).get(tap)
    return info is not None and info.kind == "output" and info.module_type in _SOFTMAX_MODULES


def _placement_targets(model: nn.Module, table: CalibrationTable, example: tuple, placement: str,
                       weights: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """``(targets, reasons)``: tap/call whose tensor gets Q/DQ -> the tap whose amax it uses,
    and tap -> why it gets none of its own."""
    targets: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if placement == "all":
        for tap in table:
            if _is_softmax_tap(tap, table):
                reasons[tap] = "softmax stays float (NVDLA runs it on the CPU)"
            else:
                targets[tap] = tap
        return targets, reasons
    from ..sim.simulate import plan_simulation

    plan = plan_simulation(model, table, example[0] if len(example) == 1 else example, mode="fake",
                           placement="nvdla", weights=weights or "per-kernel", missing="fp32")
    fp32 = set(plan.fp32_layers)
    if any("data" in layer.input_taps for layer in plan.layers if layer.name not in fp32) and "data" in table:
        targets["data"] = "data"
    for layer in plan.layers:
        tail = plan.calls[layer.calls[-1]].tap
        if layer.name in fp32:
            for tap in layer.taps:
                reasons[tap] = f"NVDLA layer {layer.label} runs in FP32 (taps missing from the table)"
            continue
        if layer.output_tap is not None:
            targets[tail] = layer.output_tap
        for tap in layer.taps[:-1]:
            reasons[tap] = f"fused into NVDLA layer {layer.label} (never written)"
    for c in plan.calls:
        if c.tap in targets or c.tap in reasons:
            continue
        edge = plan.edge_taps[c.index]
        if c.kind == "softmax":
            reasons[c.tap] = "softmax stays float (NVDLA runs it on the CPU)"
        elif edge is not None:
            reasons[c.tap] = f"keeps its input's scale ({edge!r}): not an NVDLA write"
        else:
            reasons[c.tap] = "float in the NVDLA graph"
    for tap in table:
        if tap not in targets and tap not in reasons:
            reasons[tap] = "not a tensor NVDLA writes"
    return targets, reasons


# ----------------------------------------------------------------------------------------
# export_onnx
# ----------------------------------------------------------------------------------------


def _noqdq_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.noqdq{path.suffix or '.onnx'}")


def export_onnx(
    model: nn.Module,
    table: CalibrationTable,
    path: str | os.PathLike | None,
    *,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    qdq: bool = True,
    cache: str | os.PathLike | None = None,
    placement: str = "nvdla",
    weights: str | None = "per-kernel",
    fold_batchnorm: bool | None = None,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] = ("data",),
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    trt_version: str | int | None = None,
    derived: Sequence[DerivedTap] = (BN_NORMALIZED,),
    show: bool = False,
) -> OnnxExport:
    """Export ``model`` to ONNX for TensorRT (DLA) with the ranges of ``table``.

    Args:
        model: the calibrated model (left as it was: no hooks, same train/eval flags).
        table: its :class:`~torch_nvdla.CalibrationTable`.
        path: the ONNX file to write (``None``: build in memory only).
        example_input: a batch of real inputs (tensor or tuple of tensors): traced by the
            exporter and used to match taps to ONNX tensors by value (a few images do).
        qdq: insert QuantizeLinear / DequantizeLinear pairs (explicit quantization).
        cache: also write TensorRT's calibration cache there, keyed by the tensor names
            of the plain graph (with ``qdq`` that graph goes to ``<name>.noqdq.onnx``).
        placement: ``"nvdla"`` (the tensors NVDLA writes, at its scales) or ``"all"``
            (every tap at its own scale); see the module docstring.
        weights: weight quantization in the Q/DQ graph: ``"per-filter"`` (per output
            channel), ``"per-kernel"`` (one scale) or ``None`` (float weights).
        fold_batchnorm: let the exporter fold BatchNorm into the preceding Conv
            (default: yes for ``"nvdla"``, no for ``"all"``).
        opset: ONNX opset (>= 13 for Q/DQ).
        input_names / output_names: graph input / output names (the first input is the
            ``data`` tap).
        dynamic_batch: a symbolic batch dimension (``batch``); ``False`` fixes it to
            ``example_input``'s.
        trt_version: the TensorRT version in the cache header (default: the writer's).
        derived: derived taps that can be recomputed for matching.
        show: print the mapping table (rich, stdout).

    Returns:
        An :class:`OnnxExport`: the mapping, unmapped taps (with reasons), Q/DQ pairs,
        paths and models. Unmapped taps are also reported on stderr when ``show`` is off.

    Raises:
        CalibrationError: a bad option, an empty table, a table of another model (no tap
            matched), or ``cache`` without a ``path``.
    """
    import onnx

    _check_export_options(model, table, path, qdq=qdq, cache=cache, placement=placement, weights=weights,
                          opset=opset)
    if fold_batchnorm is None:
        fold_batchnorm = placement == "nvdla"
    args = _as_args(example_input)
    dev = model_device(model) or torch.device("cpu")
    args_dev = tuple(a.to(dev) for a in args)
    plain = _torch_export(model, args_dev, opset=opset, input_names=input_names, output_names=output_names,
                          dynamic_batch=dynamic_batch, fold_batchnorm=fold_batchnorm)
    onnx.checker.check_model(plain, full_check=True)

    targets, reasons = _placement_targets(model, table, args_dev, placement, weights) if qdq else ({}, {})
    mapping = _map_table(model, table, plain, args, targets, derived)
    chosen, not_quantized = _choose_tensors(plain, mapping, targets, reasons)
    final, quantized, qweights = plain, [], {}
    if qdq:
        final, quantized, qweights = _insert_qdq(plain, table, chosen, weights)
    owners_amax = {tensor: float(table[tap].amax) for tensor, tap in mapping.owners.items() if tap in table}
    cache_amax, propagated, uncovered = _cache_ranges(plain, owners_amax) if cache is not None else ({}, {}, ())
    out_path, plain_path, cache_path = _write_onnx_files(path, cache, final, plain, qdq, cache_amax, trt_version)
    result = _result(mapping, table, targets, quantized, not_quantized, qdq=qdq, placement=placement, weights=weights,
                     path=out_path, cache_path=cache_path, plain_path=plain_path, propagated=propagated,
                     uncovered=uncovered, qweights=qweights, final=final, plain=plain)
    if show:
        result.print(table)
    else:
        _say_gaps(result)
    return result


def _result(mapping: _Mapping, table, targets, quantized, not_quantized: dict[str, str], *, qdq: bool,
            placement: str, weights, path, cache_path, plain_path, propagated, uncovered, qweights, final,
            plain) -> "OnnxExport":
    """The :class:`OnnxExport` of one export: what each tap became."""
    by_tensor = {q.tensor: q for q in quantized}
    for tap, t in mapping.tensors.items():
        if qdq and t not in by_tensor and tap in table and tap not in not_quantized:
            not_quantized[tap] = "no Q/DQ on this tensor"
    wanted = set(table) | set(targets)
    unmapped = {tap: why for tap, why in mapping.unmapped.items() if tap in wanted}
    tensors = {tap: t for tap, t in mapping.tensors.items() if tap in wanted}
    return OnnxExport(
        path=path, cache_path=cache_path, plain_path=plain_path, qdq=qdq, placement=placement,
        weights=weights if qdq else None, tensors=tensors,
        aliases={k: v for k, v in mapping.aliases.items() if k in tensors},
        unmapped=unmapped, fused_into={k: v for k, v in mapping.fused_into.items() if k in unmapped},
        quantized=tuple(quantized), not_quantized=not_quantized,
        qdq_tensors={tap: by_tensor[t].dq for tap, t in mapping.tensors.items() if t in by_tensor},
        propagated=propagated, uncovered=uncovered,
        quantized_weights=qweights, match_error=dict(mapping.errors), amax_conflicts=_amax_conflicts(mapping, table),
        input_names=tuple(i.name for i in plain.graph.input), output_names=tuple(o.name for o in plain.graph.output),
        model=final, plain_model=plain,
    )


def _check_export_options(model, table, path, *, qdq: bool, cache, placement: str, weights: str | None,
                          opset: int) -> None:
    """:func:`export_onnx`'s argument checks (a :class:`CalibrationError` naming the value)."""
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not len(table):
        raise CalibrationError("the calibration table is empty: nothing to export")
    if placement not in PLACEMENTS:
        raise CalibrationError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if weights is not None and weights not in _WEIGHT_MODES:
        raise CalibrationError(f"weights must be one of {', '.join(_WEIGHT_MODES)} or None, got {weights!r}")
    if qdq and opset < 13:
        raise CalibrationError(f"Q/DQ export needs opset >= 13 (per-axis DequantizeLinear), got opset={opset}")
    if cache is not None and path is None:
        raise CalibrationError("a TensorRT cache needs the ONNX model it refers to: give a path")


def _map_table(model: nn.Module, table, plain, args: tuple, targets: Mapping[str, str],
               derived: Sequence[DerivedTap]) -> _Mapping:
    """Taps (the table's and the placement's) matched to tensors of the plain graph; refuses a
    table none of whose module taps is a call of this model."""
    names = list(dict.fromkeys([*table, *targets]))
    mapping = map_taps(model, _Names(names, getattr(table, "infos", {})), plain, args, derived=derived)
    module_taps = [t for t in table if t != "data"]
    if not any(t in mapping.tensors for t in table) or (
            module_taps and all(mapping.unmapped.get(t, "").startswith("not observed") for t in module_taps)):
        raise CalibrationError(
            f"no tap of the table ({', '.join(module_taps[:6])}{' ...' if len(module_taps) > 6 else ''}) is a module "
            f"call of this {type(model).__name__}: is the table from this model?"
        )
    return mapping


def _amax_conflicts(mapping: _Mapping, table) -> dict[str, tuple[float, float]]:
    """Taps on the same tensor as another tap (an alias) whose ranges differ."""
    conflicts = {}
    for tap, owner in mapping.aliases.items():
        if tap in table and owner in table:
            a, b = float(table[tap].amax), float(table[owner].amax)
            if not math.isclose(a, b, rel_tol=1e-6):
                conflicts[tap] = (a, b)
    return conflicts


def _choose_tensors(plain, mapping: _Mapping, targets: Mapping[str, str], reasons: Mapping[str, str]
                    ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Which tensor gets a Q/DQ pair at which tap's range: ``tensor -> (tap, scale tap)``, and
    the taps left in float with the reason (softmax outputs stay float)."""
    producers = {o: n.op_type for n in plain.graph.node for o in n.output}
    chosen: dict[str, tuple[str, str]] = {}
    not_quantized = {tap: why for tap, why in reasons.items() if tap in mapping.tensors}
    for tap, scale_tap in targets.items():
        tensor = mapping.tensors.get(tap)
        if tensor is None:
            continue
        if producers.get(tensor) in _SOFTMAX_OPS:
            not_quantized[tap] = "softmax stays float (NVDLA runs it on the CPU)"
        elif tensor not in chosen:
            chosen[tensor] = (tap, scale_tap)
    return chosen, not_quantized


def _insert_qdq(plain, table, chosen: Mapping[str, tuple[str, str]], weights: str | None):
    """The Q/DQ graph, its :class:`QuantizedTensor` s in graph order, and the quantized weights."""
    final, dq_names, qweights = quantize_onnx(
        plain, {t: float(table[s].amax) for t, (_, s) in chosen.items()}, weights=weights)
    order = {name: i for i, name in enumerate([i.name for i in plain.graph.input]
                                              + [o for n in plain.graph.node for o in n.output])}
    quantized = []
    for tensor in sorted(chosen, key=lambda t: order.get(t, 1 << 30)):
        tap, scale_tap = chosen[tensor]
        quantized.append(QuantizedTensor(tensor, tap, scale_tap, float(table[scale_tap].amax), dq_names[tensor]))
    return final, quantized, qweights


def _write_onnx_files(path, cache, final, plain, qdq: bool, cache_amax, trt_version):
    """Write the model (and the plain graph plus the cache); returns their paths."""
    out_path = cache_path = plain_path = None
    if path is not None:
        out_path = Path(path)
        atomic_write_bytes(out_path, final.SerializeToString())
        plain_path = out_path if not qdq else None
    if cache is not None:
        if qdq:
            plain_path = _noqdq_path(out_path)
            atomic_write_bytes(plain_path, plain.SerializeToString())
        cache_path = _write_cache(Path(cache), cache_amax, trt_version)
    return out_path, plain_path, cache_path


def _say_gaps(result: "OnnxExport") -> None:
    """One stderr line per kind of gap: taps without a tensor, taps in FP32, uncovered tensors."""
    from ..utils.console import say

    unmapped = result.unmapped
    if unmapped:
        say(f"[yellow]export_onnx: {len(unmapped)} tap(s) have no ONNX tensor:[/] "
            + ", ".join(f"{k} ({v.split(' holds')[0]})" for k, v in list(unmapped.items())[:6])
            + (f" ... and {len(unmapped) - 6} more" if len(unmapped) > 6 else ""))
    if result.in_float:
        say(f"[yellow]export_onnx: {len(result.in_float)} tap(s) run in FP32 (no range for their layer):[/] "
            + ", ".join(list(result.in_float)[:8]))
    if result.uncovered:
        say(f"[yellow]export_onnx: {len(result.uncovered)} float tensor(s) have no range in the cache:[/] "
            + ", ".join(result.uncovered[:8]))


class _Names(list):
    """Tap names plus the table's infos, for :func:`map_taps`."""

    def __init__(self, names: Iterable[str], infos: Mapping) -> None:
        super().__init__(names)
        self.infos = dict(infos or {})


# ----------------------------------------------------------------------------------------
# onnxruntime vs the fake-quant simulation
# ----------------------------------------------------------------------------------------


def _split_batch(batch, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input tensor, labels)``: onnxruntime is fed one tensor per batch."""
    inputs, labels = split_labels(batch, index)
    args, kwargs = call_args(inputs)
    if kwargs or not args or not isinstance(args[0], torch.Tensor):
        raise CalibrationError(f"batch {index}: compare_with_onnxruntime needs (input tensor, labels) batches, "
                               f"got {type(batch).__name__}")
    return args[0], labels


def _top1(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(logits)) if not isinstance(logits, torch.Tensor) else logits
    return t.detach().float().cpu().reshape(t.shape[0], -1).argmax(dim=1)


def _grid_offset(v: np.ndarray, scale: float) -> float:
    """``max |v/scale - round(v/scale)|``: 0 when ``v`` lies on the int8 grid of ``scale``."""
    if v.size == 0:
        return 0.0
    r = v.astype(np.float64) / float(scale)
    return float(np.abs(r - np.rint(r)).max())


def _ties(x: np.ndarray, scale: float) -> tuple[int, int]:
    """Elements where ``x / scale`` (float32, as QuantizeLinear computes it) is exactly ``k + 0.5``,
    and how many of them round differently half-to-even vs half-away-from-zero."""
    r = x.astype(np.float32) / np.float32(scale)
    inside = np.abs(r) < 128.5
    tie = inside & ((r - np.floor(r)) == np.float32(0.5))
    n = int(tie.sum())
    if not n:
        return 0, 0
    rt = r[tie].astype(np.float64)
    away = np.sign(rt) * np.floor(np.abs(rt) + 0.5)
    return n, int((np.rint(rt) != away).sum())


def _ancestors(graph) -> dict[str, set[str]]:
    """Tensor -> every tensor it is computed from (itself included), for activation tensors."""
    anc: dict[str, set[str]] = {i.name: {i.name} for i in graph.input}
    for node in graph.node:
        up: set[str] = set()
        for i in node.input:
            if i in anc:
                up |= anc[i]
        for o in node.output:
            if o:
                anc[o] = up | {o}
    return anc


def _quant_inputs(qdq_model) -> dict[str, str]:
    """DequantizeLinear output -> the float tensor its QuantizeLinear read."""
    q_in = {n.output[0]: n.input[0] for n in qdq_model.graph.node if n.op_type == "QuantizeLinear"}
    return {n.output[0]: q_in[n.input[0]] for n in qdq_model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in q_in}


def _injected(qdq_model, dq_names: Sequence[str]):
    """The Q/DQ model with every activation DequantizeLinear output cut off from its consumers.

    Consumers of ``d`` read a new graph input ``d + "__injected"`` instead, so feeding the
    simulation's quantized tensors there makes onnxruntime recompute each tensor from
    exactly the simulation's inputs (one layer at a time, no error propagation).
    Returns ``(model, {dq: input name})``.
    """
    import onnx

    model = _copy(qdq_model)
    g = model.graph
    used = _all_names(g)
    inputs = {d: unique_name(f"{d}__injected", used) for d in dq_names}
    for node in g.node:
        for k, inp in enumerate(node.input):
            if inp in inputs:
                node.input[k] = inputs[inp]
    for d, name in inputs.items():
        g.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model, inputs




def _half_away_model(qdq_model):
    """The Q/DQ model with every QuantizeLinear rounding half away from zero, as NVDLA does.

    Each ``QuantizeLinear(x, s, 0)`` becomes ``Cast<int8>(Clip(Sign(x/s) * Floor(|x/s| + 0.5),
    -128, 127))`` -- the same float32 ``x / s`` and saturation, only the tie rule differs.
    For measuring the rounding-mode effect in onnxruntime; TensorRT needs the real
    QuantizeLinear.
    """
    from onnx import TensorProto, helper, numpy_helper

    model = _copy(qdq_model)
    g = model.graph
    used = _all_names(g)
    inits = {i.name: i for i in g.initializer}
    half, lo, hi = (unique_name(n, used) for n in ("half_away_0_5", "half_away_lo", "half_away_hi"))
    nodes = []
    for n in g.node:
        zp = inits.get(n.input[2]) if n.op_type == "QuantizeLinear" and len(n.input) > 2 else None
        if n.op_type != "QuantizeLinear" or any(a.name == "axis" for a in n.attribute) or (
                zp is not None and np.any(numpy_helper.to_array(zp))):
            nodes.append(n)
            continue
        x, sc = n.input[0], n.input[1]
        t = [unique_name(f"{n.output[0]}_half_away_{k}", used) for k in range(7)]
        nodes += [helper.make_node("Div", [x, sc], [t[0]]), helper.make_node("Abs", [t[0]], [t[1]]),
                  helper.make_node("Add", [t[1], half], [t[2]]), helper.make_node("Floor", [t[2]], [t[3]]),
                  helper.make_node("Sign", [t[0]], [t[4]]), helper.make_node("Mul", [t[3], t[4]], [t[5]]),
                  helper.make_node("Clip", [t[5], lo, hi], [t[6]]),
                  helper.make_node("Cast", [t[6]], [n.output[0]], to=TensorProto.INT8)]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), name)
                          for name, v in ((half, 0.5), (lo, -128.0), (hi, 127.0))])
    return model


def compare_with_onnxruntime(
    model: nn.Module,
    table: CalibrationTable,
    loader: Iterable,
    *,
    export: OnnxExport | None = None,
    placement: str = "nvdla",
    weights: str = "per-kernel",
    num_batches: int | None = None,
    tensor_batches: int = 1,
    example_images: int = 16,
    rounding: str = "half-even",
    simulation=None,
    optimized: bool = False,
    show: bool = True,
    title: str | None = None,
) -> OnnxComparison:
    """Run the Q/DQ ONNX model in onnxruntime (CPU) and ``int8_simulation`` on the same data.

    The simulation is :func:`torch_nvdla.sim.simulate.int8_simulation` in fake-quant mode with
    the export's placement and weight mode, i.e. the same graph: top-1 should agree
    closely and every tensor should be within one step locally (see the module docstring).

    Args:
        model: the calibrated model.
        table: its calibration table.
        loader: ``(inputs, labels)`` batches (the evaluation split).
        export: a Q/DQ :class:`OnnxExport` of this model and table (default: exported in
            memory here, on the first ``example_images`` images of the first batch).
        placement: of the export made here (``"nvdla"`` or ``"all"``).
        weights: ``"per-filter"`` or ``"per-kernel"``, on both sides.
        num_batches: stop after this many batches.
        tensor_batches: compare every tensor on the first this-many batches.
        example_images: images the export made here traces and matches on.
        rounding: ``"half-even"`` runs the Q/DQ model as it is (QuantizeLinear rounds half
            to even); ``"half-away"`` replaces every activation QuantizeLinear by an
            equivalent subgraph rounding half away from zero, as NVDLA does -- what is
            left is float noise (for measuring; not a model for TensorRT).
        simulation: ``simulation(model, table, weights=..., placement=..., example=...)``
            context manager (default: ``int8_simulation``), entered once; it must have
            installed its hooks on entry (``example`` lets ``int8_simulation`` do so), so
            that the capturing hooks registered after it see its outputs. The FP32
            top-1 runs on a deep copy of the model meanwhile.
        optimized: also run the Q/DQ model with onnxruntime's graph optimizations (which
            fuse Q/DQ into its int8 kernels) and report that top-1 separately. The
            comparison itself always runs with optimizations off: every Q/DQ pair is
            evaluated as written (float arithmetic on the dequantized values), so its
            verdict does not depend on the host CPU's int8 kernels (on x86 without VNNI
            they saturate u8 x s8 pair sums in int16).
        show: print the report (rich tables, stdout).
        title: the report's title.

    Returns:
        An :class:`OnnxComparison`.

    Raises:
        CalibrationError: an export without Q/DQ or with other weights, an empty loader,
            batches without labels.
    """
    if simulation is None:
        from ..sim.simulate import int8_simulation as simulation
    placement = _check_compare_options(weights, rounding, export, placement)
    dev = model_device(model) or torch.device("cpu")
    batches = iter(loader)
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    first = next(batches, None)
    if first is None:
        raise CalibrationError("the loader yielded no batches: nothing to compare")
    x0, _ = _split_batch(first, 0)
    if export is None:
        export = export_onnx(model, table, None, example_input=x0[:example_images], qdq=True, placement=placement,
                             weights=weights)
    runs = _OrtRuns.of(export, rounding, optimized, tensor_batches)
    stats = {tap: _TapStats() for tap in runs.compared}
    counts = _Counts()
    unmapped_grid: dict[str, float] = {}
    import copy

    float_model = copy.deepcopy(model).eval()  # FP32 reference while ``model`` is simulated
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(model))
        stack.enter_context(simulation(model, table, weights=weights, placement=placement, example=x0.to(dev)))
        cap = stack.enter_context(capture_taps(model, runs.watched)) if runs.detail is not None else {}
        for b, batch in enumerate(itertools.chain([first], batches)):
            x, y = _split_batch(batch, b)
            xd = x.to(dev)
            fp = _top1(float_model(xd))
            cap.clear()
            sim = _top1(model(xd))
            feeds = {runs.input_name: x.detach().cpu().numpy().astype(np.float32)}
            if b < tensor_batches and runs.detail is not None:
                ort_out = runs.compare_tensors(feeds, cap, stats)
                for tap in export.unmapped:
                    if tap in cap and tap in table:
                        v = cap[tap].detach().float().cpu().numpy()
                        unmapped_grid[tap] = max(unmapped_grid.get(tap, 0.0), _grid_offset(v, float(table[tap].scale)))
                counts.tensor_samples += len(x)
            else:
                ort_out = runs.fast.run([runs.output_name], feeds)[0]
            fused = _top1(runs.fused.run([runs.output_name], feeds)[0]) if runs.fused is not None else None
            counts.add(y, fp, sim, _top1(ort_out), fused)
    taps = _tap_comparisons(export, table, runs, stats, unmapped_grid)
    pct = counts.percent
    result = OnnxComparison(
        samples=counts.samples, top1_fp32=pct(counts.fp32), top1_simulation=pct(counts.simulation),
        top1_onnxruntime=pct(counts.onnxruntime), agreement=pct(counts.same), taps=tuple(taps),
        unmapped=dict(export.unmapped), placement=placement, weights=weights, tensor_samples=counts.tensor_samples,
        rounding=rounding, top1_onnxruntime_optimized=pct(counts.fused) if runs.fused is not None else None,
    )
    if show:
        result.print(title)
    return result


def _check_compare_options(weights: str, rounding: str, export: OnnxExport | None, placement: str) -> str:
    """Checks :func:`compare_with_onnxruntime`'s options; returns the placement (the export's)."""
    if weights not in _WEIGHT_MODES:
        raise CalibrationError(f"weights must be one of {', '.join(_WEIGHT_MODES)}, got {weights!r}")
    if rounding not in ("half-even", "half-away"):
        raise CalibrationError(f"rounding must be 'half-even' or 'half-away', got {rounding!r}")
    if export is None:
        return placement
    if not export.qdq:
        raise CalibrationError("compare_with_onnxruntime needs a Q/DQ export (export_onnx(..., qdq=True))")
    if export.weights != weights:
        raise CalibrationError(f"the export quantized weights {export.weights!r}, but weights={weights!r}")
    return export.placement


@dataclass
class _Counts:
    """Correct top-1 predictions of each side, and the images they agree on."""

    samples: int = 0
    fp32: int = 0
    simulation: int = 0
    onnxruntime: int = 0
    fused: int = 0
    same: int = 0
    tensor_samples: int = 0

    def add(self, labels: torch.Tensor, fp, sim, ort, fused) -> None:
        y = labels.reshape(-1).cpu()
        self.samples += len(y)
        self.fp32 += int((fp == y).sum())
        self.simulation += int((sim == y).sum())
        self.onnxruntime += int((ort == y).sum())
        if fused is not None:
            self.fused += int((fused == y).sum())
        self.same += int((sim == ort).sum())

    def percent(self, k: int) -> float:
        return 100.0 * k / self.samples if self.samples else 0.0


@dataclass
class _TapStats:
    """One tap's differences, in steps of its scale: onnxruntime's whole graph (``steps``,
    ``bad``) and its layer fed the simulation's inputs (``local``, ``local_bad``)."""

    steps: float = 0.0
    local: float = 0.0
    bad: int = 0
    local_bad: int = 0
    numel: int = 0
    ties: int = 0
    flips: int = 0
    grid: float = 0.0

    def add(self, got: np.ndarray, local: np.ndarray, ref: np.ndarray, scale: float) -> None:
        d = np.abs(got - ref) / scale
        dl = np.abs(local - ref) / scale
        if d.size:
            self.steps = max(self.steps, float(d.max()))
            self.local = max(self.local, float(dl.max()))
        self.bad += int((d > 1e-3).sum())
        self.local_bad += int((dl > 1e-3).sum())
        self.numel += int(d.size)
        self.grid = max(self.grid, _grid_offset(ref, scale))


@dataclass
class _OrtRuns:
    """The onnxruntime sessions of one comparison and the tensors they report.

    ``fast`` runs the model (no graph optimization: every Q/DQ pair as written); ``fused``
    the optimized one (``optimized=True``); ``detail`` also returns every DequantizeLinear
    output; ``local`` is the model with each Q/DQ input injected (``injected``: DQ -> the
    new graph input), so each layer can be fed the simulation's own input.
    """

    fast: Any
    fused: Any
    detail: Any
    local: Any
    injected: dict[str, str]
    input_name: str
    output_name: str
    dq_info: dict[str, QuantizedTensor]
    q_inputs: dict[str, str]
    detail_outputs: list[str]
    local_outputs: list[str]
    compared: dict[str, str]
    watched: list[str]

    @classmethod
    def of(cls, export: OnnxExport, rounding: str, optimized: bool, tensor_batches: int) -> "_OrtRuns":
        q_inputs = _quant_inputs(export.model)
        qmodel = export.model if rounding == "half-even" else _half_away_model(export.model)
        output_name = export.output_names[0]
        dqs = [q.dq for q in export.quantized]
        dq_info = {q.dq: q for q in export.quantized}
        detail_outputs = list(dict.fromkeys([output_name, *dqs]))
        local_outputs = list(dict.fromkeys([*dqs, *[q_inputs[d] for d in dqs]]))
        detail = local = None
        injected: dict[str, str] = {}
        if tensor_batches > 0 and dqs:
            detail = _session(qmodel, detail_outputs, optimize=False)
            # Graph inputs are not injected: the simulation may quantize the input inside its
            # first layer (placement "nvdla"), so the captured ``data`` can be the raw input.
            injected_model, injected = _injected(qmodel, [d for d in dqs
                                                          if dq_info[d].tensor not in export.input_names])
            local = _session(injected_model, local_outputs, optimize=False)
        compared = dict(export.qdq_tensors)
        watched = list(dict.fromkeys([*compared, *(q.tap for q in export.quantized), *export.unmapped]))
        return cls(fast=_session(qmodel, optimize=False), fused=_session(qmodel, optimize=True) if optimized else None,
                   detail=detail, local=local, injected=injected, input_name=export.input_names[0],
                   output_name=output_name, dq_info=dq_info, q_inputs=q_inputs, detail_outputs=detail_outputs,
                   local_outputs=local_outputs, compared=compared, watched=watched)

    def compare_tensors(self, feeds: dict, cap: Mapping[str, torch.Tensor], stats: dict[str, _TapStats]) -> np.ndarray:
        """Every Q/DQ tensor of one batch against the simulation's; returns the model output."""
        outs = dict(zip(self.detail_outputs, self.detail.run(self.detail_outputs, feeds)))
        local_feeds = dict(feeds)
        for dq, name in self.injected.items():
            v = cap.get(self.dq_info[dq].tap)
            local_feeds[name] = (outs[dq] if v is None  # not seen by the simulation: onnxruntime's own
                                 else v.detach().float().cpu().numpy().reshape(outs[dq].shape))
        louts = dict(zip(self.local_outputs, self.local.run(self.local_outputs, local_feeds)))
        for tap, dq in self.compared.items():
            ref = cap.get(tap)
            if ref is None:
                continue
            q = self.dq_info[dq]
            got = outs[dq].astype(np.float64)
            r = ref.detach().float().cpu().numpy().reshape(got.shape).astype(np.float64)
            stats[tap].add(got, louts[dq].astype(np.float64), r, q.scale)
            if tap == q.tap:
                ties, flips = _ties(louts[self.q_inputs[dq]], q.scale)
                stats[tap].ties += ties
                stats[tap].flips += flips
        return outs[self.output_name]


def _tap_comparisons(export: OnnxExport, table, runs: _OrtRuns, stats: Mapping[str, _TapStats],
                     unmapped_grid: Mapping[str, float]) -> list[TapComparison]:
    """Per-tap results, each marked whether both sides compute the same graph up to it.

    Where the two graphs differ: a Q/DQ tensor whose simulated value is off its grid (the
    simulation quantizes it elsewhere or not at all), or an unmapped tap the simulation
    quantizes (at the tensor that absorbed it; unknown place: everything after it).
    """
    anc = _ancestors(export.plain_model.graph)
    diff: set[str] = set()
    diff_after: int | None = None
    order = {tap: i for i, tap in enumerate(table)}
    graph_inputs = set(export.input_names)
    for tap, st in stats.items():
        if st.numel and st.grid > 1e-3 and export.tensors[tap] not in graph_inputs:
            diff.add(export.tensors[tap])
    for tap, g in unmapped_grid.items():
        if g <= 1e-3:
            fused = export.fused_into.get(tap)
            if fused in anc:
                diff.add(fused)
            else:
                diff_after = min(order.get(tap, 0), diff_after if diff_after is not None else 1 << 30)
    taps = []
    for tap, st in stats.items():
        if not st.numel:
            continue
        t = export.tensors[tap]
        q = runs.dq_info[runs.compared[tap]]
        same_graph = not (anc.get(t, {t}) & diff) and (diff_after is None or order.get(tap, 1 << 30) < diff_after)
        taps.append(TapComparison(
            tap=tap, tensor=q.dq, scale=q.scale, local_steps=st.local, local_mismatch=st.local_bad / st.numel,
            max_steps=st.steps, mismatch=st.bad / st.numel, ties=st.ties, flips=st.flips, same_graph=same_graph,
            simulated=st.grid <= 1e-3 or t in graph_inputs,
        ))
    return taps
