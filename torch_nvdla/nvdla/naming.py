"""Tap -> NVDLA layer names: which calib.json key takes which tap's range.

Design notes and the facts behind them: ``docs/nvdla.md``.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import torch
from torch import nn

from ..calib.taps import (
    BN_NORMALIZED,
    CallSites,
    TapSelection,
    TensorMemo,
    first_tensor,
    tensor_args,
)
from ..errors import CalibrationError

__all__ = [
    "PAD_SHORTCUT",
    "KINDS",
    "PRESETS",
    "SOFTMAX_AMAX",
    "LayerName",
    "NameResolution",
    "NvdlaNames",
    "TraceCall",
    "caffe_lenet_names",
    "calibrate_for_nvdla",
    "detect_preset",
    "generic_layer_name",
    "generic_names",
    "resnet_caffe_names",
    "trace_producers",
    "unique_name",
]

#: A module whose ``nvdla_export`` attribute is this value is a channel-padding strided
#: shortcut (``in_planes``, ``out_planes``, ``stride``): keep every ``stride``-th pixel and
#: zero-pad the channels evenly before and after (the CIFAR ResNets' option A). The Caffe
#: export writes it as a fixed 1x1 convolution: a layer, and a tensor, of its own.
PAD_SHORTCUT = "pad-shortcut"

#: Layer kinds; they decide which NVDLA consistency rule applies to an entry.
KINDS = ("input", "conv", "fc", "bn", "scale", "relu", "pool", "eltwise", "concat", "softmax", "other")
#: Preset names accepted by :meth:`NvdlaNames.for_model` (plus ``"auto"``).
PRESETS = ("caffe-lenet", "resnet-caffe", "generic")
#: Range of a softmax output with no tap: softmax values lie in [0, 1].
SOFTMAX_AMAX = 1.0

Overrides = Union[Mapping[str, Union[str, None]], Callable[[str, Union[str, None]], Union[str, None]]]


@dataclass(frozen=True, kw_only=True)
class LayerName:
    """One NVDLA layer: one calib.json key and where its range comes from.

    Attributes:
        name: the Caffe / NVDLA layer name (the calib.json key).
        tap: the tap whose range is this layer's output range, or ``None``.
        amax: a fixed range used when no tap measures the tensor (e.g. a softmax with no
            module: :data:`SOFTMAX_AMAX`); at most one of ``tap`` / ``amax`` is set. With
            neither, the layer is known to exist but has no range (reported as missing).
        kind: one of :data:`KINDS`.
        inputs: NVDLA names of the layers producing its inputs (Caffe bottom order);
            empty when unknown.
        module: the module path holding its parameters (conv / fc weights, BatchNorm
            statistics), when there is one.
        note: why the range is what it is, for reports.
    """

    name: str
    tap: str | None = None
    amax: float | None = None
    kind: str = "other"
    inputs: tuple[str, ...] = ()
    module: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CalibrationError(f"layer name must be a non-empty string, got {self.name!r}")
        if self.tap is not None and self.amax is not None:
            raise CalibrationError(f"layer {self.name!r}: give a tap or a fixed amax, not both")
        if self.amax is not None:
            amax = float(self.amax)
            if not (math.isfinite(amax) and amax > 0):
                raise CalibrationError(f"layer {self.name!r}: fixed amax must be finite and > 0, got {self.amax!r}")
            object.__setattr__(self, "amax", amax)
        if self.kind not in KINDS:
            raise CalibrationError(f"layer {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if isinstance(self.inputs, str):
            raise CalibrationError(f"layer {self.name!r}: inputs is a tuple of layer names, not one string")
        object.__setattr__(self, "inputs", tuple(self.inputs))


@dataclass(frozen=True)
class NameResolution:
    """Layer names applied to one calibration table.

    Attributes:
        amax: NVDLA name -> amax, network order, for every layer that has a range.
        sources: NVDLA name -> the tap it came from, or ``"fixed: <note>"``.
        missing: names whose tap is not in the table (or that have no source at all).
        unnamed: taps of the table that no layer uses.
        unmatched_overrides: override keys that matched no tap and no layer.
    """

    amax: dict[str, float]
    sources: dict[str, str]
    missing: tuple[str, ...]
    unnamed: tuple[str, ...]
    unmatched_overrides: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class NvdlaNames:
    """The NVDLA layers of one network, in network order, and the taps they need.

    Build one with :meth:`for_model`, :meth:`from_table` or the preset functions; pass
    :attr:`selection` to :func:`~torch_nvdla.calibrate` (``taps=names.selection``) so the
    extra taps a preset relies on (``<bn>:normalized``, residual sums) are observed.

    Attributes:
        layers: the layers in network order (names unique).
        selection: what a calibration pass must observe for these names.
        preset: the preset that produced them (``"custom"`` otherwise).
        unmatched_overrides: override keys that matched no tap and no layer.
        dropped: taps whose layer an override removed (``None`` value).
        traced: the producers were traced by running the model, so a layer with no
            ``inputs`` reads a tensor no module produced (a functional op's result).
    """

    layers: tuple[LayerName, ...]
    selection: TapSelection = field(default_factory=TapSelection)
    preset: str = "custom"
    unmatched_overrides: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    traced: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        seen: dict[str, LayerName] = {}
        for layer in self.layers:
            if not isinstance(layer, LayerName):
                raise CalibrationError(f"NvdlaNames.layers holds a {type(layer).__name__}, not a LayerName")
            if layer.name in seen:
                raise CalibrationError(
                    f"two layers are named {layer.name!r} (taps {seen[layer.name].tap!r} and {layer.tap!r}); "
                    "names must be unique"
                )
            seen[layer.name] = layer
        if not isinstance(self.selection, TapSelection):
            raise CalibrationError(f"selection must be a TapSelection, got {type(self.selection).__name__}")
        object.__setattr__(self, "unmatched_overrides", tuple(self.unmatched_overrides))
        object.__setattr__(self, "dropped", tuple(self.dropped))

    # -- sequence-like access -------------------------------------------------------------
    def __iter__(self) -> Iterator[LayerName]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return any(layer.name == name for layer in self.layers)

    def __getitem__(self, name: str) -> LayerName:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no NVDLA layer named {name!r} (preset {self.preset!r}, {len(self.layers)} layers)")

    def names(self) -> list[str]:
        """The layer names (calib.json keys) in network order."""
        return [layer.name for layer in self.layers]

    def tap_to_name(self) -> dict[str, str]:
        """Tap -> layer name for every layer measured by a tap."""
        return {layer.tap: layer.name for layer in self.layers if layer.tap is not None}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, preset: str = "auto", *, overrides: Overrides | None = None,
                  example_input: Any = None,
                  forward: Callable[[nn.Module, Any], Any] | None = None) -> "NvdlaNames":
        """Names for ``model`` from a preset, with user overrides applied.

        Args:
            model: the model that will be calibrated.
            preset: ``"auto"`` (detect Caffe LeNet, then a torchvision-style ResNet, else
                generic), or one of :data:`PRESETS`.
            overrides: a mapping keyed by tap or layer name (``None`` drops the layer), or
                a callable ``(name, tap) -> new name | None``; it wins over the preset.
            example_input: one batch (as the calibration loader yields it); needed by the
                generic preset, which runs it once to find the taps and their producers.

        Raises:
            CalibrationError: unknown preset, a preset that does not fit the model (the
                message says which module is missing), or generic naming without
                ``example_input``.
        """
        if preset == "auto":
            preset = detect_preset(model)
        if preset == "caffe-lenet":
            names = caffe_lenet_names(model)
        elif preset == "resnet-caffe":
            names = resnet_caffe_names(model)
        elif preset == "generic":
            if example_input is None:
                raise CalibrationError(
                    "generic NVDLA names need example_input (one batch) to find the taps and their producers; "
                    "or calibrate first and use NvdlaNames.from_table(table)"
                )
            names = generic_names(model, example_input, forward=forward)
        else:
            raise CalibrationError(f"unknown naming preset {preset!r}; choose auto or one of {', '.join(PRESETS)}")
        return names.with_overrides(overrides) if overrides is not None else names

    @classmethod
    def from_table(cls, table, overrides: Overrides | None = None) -> "NvdlaNames":
        """Generic names for every tap of a calibration table (no model needed).

        Layer kinds come from the taps' module types; producers only where the table
        knows them (a ReLU / ``:input`` tap that reused its producer's histogram,
        ``table.meta["reused"]``). ``<tap>:input`` taps get no name; a BatchNorm with a
        ``:normalized`` tap becomes ``<path>_normalized`` + ``<path>``.
        """
        reused = dict(table.meta.get("reused") or {}) if hasattr(table, "meta") else {}
        infos = getattr(table, "infos", {}) or {}
        taps = list(table)
        present = set(taps)
        layers: list[LayerName] = []
        tap_name: dict[str, str] = {}
        emitted: set[str] = set()

        def emit(tap: str) -> None:
            if tap in emitted:
                return
            emitted.add(tap)
            info = infos.get(tap)
            mtype = info.module_type if info else ""
            norm = f"{tap}:normalized"
            if norm in present and norm not in emitted:
                emitted.add(norm)
                nname = generic_layer_name(norm)
                producer = reused.get(f"{tap}:input")
                inputs = (tap_name[producer],) if producer in tap_name else ()
                layers.append(LayerName(name=nname, tap=norm, kind="bn", inputs=inputs,
                                        module=info.module if info else None))
                tap_name[norm] = nname
                kind, inputs = "scale", (nname,)
            elif tap == "data":
                kind, inputs = "input", ()
            elif tap.endswith(":normalized"):
                kind, inputs = "bn", ()
            else:
                kind = _kind_from_type_name(mtype)
                src = reused.get(tap) or reused.get(f"{tap}:input")
                inputs = (tap_name[src],) if src in tap_name else ()
            name = generic_layer_name(tap)
            layers.append(LayerName(name=name, tap=tap, kind=kind, inputs=inputs,
                                    module=(info.module or None) if info else None))
            tap_name[tap] = name

        for tap in taps:
            if tap.endswith(":input"):
                continue
            if tap.endswith(":normalized"):
                base = tap[: -len(":normalized")]
                if base in present:
                    continue  # emitted just before its BatchNorm output
            emit(tap)
        derived = (BN_NORMALIZED,) if any(t.endswith(":normalized") for t in taps) else ()
        names = cls(layers=layers, selection=TapSelection(derived=derived), preset="generic")
        return names.with_overrides(overrides) if overrides is not None else names

    def with_overrides(self, overrides: Overrides | None) -> "NvdlaNames":
        """A copy with user names applied (they win over the preset).

        Args:
            overrides: a mapping whose keys are taps or current layer names (a tap match
                wins) and whose values are new names or ``None`` (drop the layer); or a
                callable ``(name, tap) -> new name | None``. Keys that match nothing are
                kept in :attr:`unmatched_overrides` and reported, never ignored.

        Raises:
            CalibrationError: two layers end up with one name, or a value is not a string.
        """
        if overrides is None:
            return self
        rename: dict[str, str | None] = {}
        unmatched: list[str] = list(self.unmatched_overrides)
        if callable(overrides) and not isinstance(overrides, Mapping):
            for layer in self.layers:
                rename[layer.name] = overrides(layer.name, layer.tap)
        elif isinstance(overrides, Mapping):
            by_tap = {layer.tap: layer for layer in self.layers if layer.tap is not None}
            by_name = {layer.name: layer for layer in self.layers}
            for key, value in overrides.items():
                if key in by_tap:
                    rename[by_tap[key].name] = value
                elif key in by_name:
                    rename.setdefault(key, value)
                else:
                    unmatched.append(str(key))
        else:
            raise CalibrationError(f"overrides must be a mapping or a callable, got {type(overrides).__name__}")
        for old, new in rename.items():
            if new is not None and (not isinstance(new, str) or not new):
                raise CalibrationError(f"override for layer {old!r} must be a non-empty string or None, got {new!r}")
        new_name = {layer.name: rename.get(layer.name, layer.name) for layer in self.layers}
        layers, dropped = [], list(self.dropped)
        for layer in self.layers:
            target = new_name[layer.name]
            if target is None:
                dropped.append(layer.tap or layer.name)
                continue
            inputs = tuple(new_name.get(i) or "" for i in layer.inputs)
            inputs = () if "" in inputs else inputs
            layers.append(replace(layer, name=target, inputs=inputs))
        return replace(self, layers=tuple(layers), unmatched_overrides=tuple(dict.fromkeys(unmatched)),
                       dropped=tuple(dropped))

    # -- use --------------------------------------------------------------------------------
    def resolve(self, table) -> NameResolution:
        """Each layer's amax from ``table``; reports names with no tap and taps with no name."""
        amax: dict[str, float] = {}
        sources: dict[str, str] = {}
        missing: list[str] = []
        for layer in self.layers:
            if layer.amax is not None:
                amax[layer.name] = layer.amax
                sources[layer.name] = f"fixed: {layer.note}" if layer.note else "fixed"
            elif layer.tap is not None and layer.tap in table:
                amax[layer.name] = float(table[layer.tap].amax)
                sources[layer.name] = layer.tap
            else:
                missing.append(layer.name)
        used = {layer.tap for layer in self.layers}
        unnamed = tuple(t for t in table if t not in used)
        return NameResolution(amax, sources, tuple(missing), unnamed, self.unmatched_overrides)

    def require(self, table) -> None:
        """Raise unless ``table`` has every tap these names use.

        Raises:
            CalibrationError: naming the layers whose taps are missing and how to get them.
        """
        missing = [(layer.name, layer.tap) for layer in self.layers
                   if layer.amax is None and (layer.tap is None or layer.tap not in table)]
        if missing:
            shown = ", ".join(f"{n} (tap {t!r})" if t else f"{n} (no tap)" for n, t in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise CalibrationError(
                f"{len(missing)} NVDLA layer(s) have no range in the table: {shown}{more}; "
                f"calibrate with taps=names.selection (preset {self.preset!r}) or map them to other taps"
            )


# ------------------------------------------------------------------------------------------
# Generic naming
# ------------------------------------------------------------------------------------------


def unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... -- the first not in ``used``, which it joins."""
    candidate, k = name, 1
    while candidate in used:
        candidate = f"{name}_{k}"
        k += 1
    used.add(candidate)
    return candidate


def generic_layer_name(tap: str) -> str:
    """The generic NVDLA name of a tap: the module path, ``#k`` -> ``_k``, ``:x`` -> ``_x``.

    ``data`` -> ``data``; ``features.0`` -> ``features.0``; ``block.relu#2`` ->
    ``block.relu_2``; ``bn1:normalized`` -> ``bn1_normalized``.
    """
    return tap.replace("#", "_").replace(":", "_")


_TYPE_KINDS = (
    (("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"), "conv"),
    (("Linear",), "fc"),
    (("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"), "scale"),
    (("ReLU", "ReLU6"), "relu"),
    (("MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
      "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d"), "pool"),
    (("Softmax",), "softmax"),
)


def _kind_from_type_name(type_name: str) -> str:
    """A layer kind from a module class name (custom ``*Add*`` / ``*Concat*`` modules included)."""
    for types, kind in _TYPE_KINDS:
        if type_name in types:
            return kind
    if "Concat" in type_name or type_name in ("Cat", "CatModule"):
        return "concat"
    if type_name.endswith(("Add", "Sum")) or "Eltwise" in type_name:
        return "eltwise"
    return "other"


@dataclass(frozen=True)
class TraceCall:
    """One leaf-module call seen by :func:`trace_producers`.

    Attributes:
        tap: the call's tap name (``path`` or ``path#k``).
        module: the module path.
        module_type: its class name.
        producers: per tensor argument, the tap whose output it is (``data`` for the model
            input), or ``None`` when unknown (made by a functional op, modified in place).
        normalized: the module is a BatchNorm with running statistics (Caffe splits it).
    """

    tap: str
    module: str
    module_type: str
    producers: tuple[str | None, ...]
    normalized: bool = False


def trace_producers(model: nn.Module, example: Any, *, forward: Callable[[nn.Module, Any], Any] | None = None
                    ) -> list[TraceCall]:
    """Run ``model`` once on ``example`` and record, per leaf call, which tap made each input.

    A tensor argument is attributed to the tap whose output it is, or whose elements it
    spans as a view, as long as that output has not been modified in place since (same
    version counter; :class:`~torch_nvdla.calib.taps.TensorMemo`). So ``torch.flatten(pool2)`` feeding ``ip1`` is
    traced to ``pool2``; ``out += identity`` feeding a ReLU is not traced to ``bn3`` (the
    in-place add bumped the version): that producer is unknown (``None``).

    The model runs in eval mode under ``torch.no_grad()``; every hook is removed and every
    module's train flag restored afterwards.

    Args:
        model: the model.
        example: one batch, as :func:`~torch_nvdla.calibrate`'s loader yields it.
        forward: ``forward(model, batch)`` for batches :func:`run_batch` cannot call.
    """
    from ..model.batch import run_batch
    from ..model.state import eval_mode, model_device

    made = TensorMemo()
    calls: list[TraceCall] = []

    def remember(t: torch.Tensor, tap: str) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            made.remember(t, tap)

    def producer(t: torch.Tensor) -> str | None:
        return made.get(t) if t.numel() else None

    def on_input(module, args, kwargs):
        made.clear()
        ts = tensor_args(tuple(args) + tuple(kwargs.values()))
        if ts:
            remember(ts[0], "data")

    def on_call(tap, path, call, mod, args):
        calls.append(TraceCall(tap, path, type(mod).__name__, tuple(producer(t) for t in tensor_args(args)),
                               BN_NORMALIZED.applies(mod)))

    def on_output(tap, path, call, mod, args, output):
        out = output if isinstance(output, torch.Tensor) else first_tensor([output])
        if out is not None:
            remember(out, tap)

    with CallSites(model, on_input=on_input, on_call=on_call, on_output=on_output), torch.no_grad(), eval_mode(model):
        if forward is not None:
            forward(model, example)
        else:
            run_batch(model, example, model_device(model))
    return calls


def generic_names(model: nn.Module, example: Any, *, forward: Callable[[nn.Module, Any], Any] | None = None
                  ) -> NvdlaNames:
    """Generic names: one layer per tap, named by :func:`generic_layer_name`, traced producers.

    A BatchNorm with running statistics becomes two layers (Caffe's BatchNorm + Scale):
    ``<path>_normalized`` (tap ``<path>:normalized``) then ``<path>`` (the output).
    Conv / fc / pool calls whose input producer cannot be traced get their ``:input``
    tapped, so a weight export still has the input range (reported as such).
    """
    calls = trace_producers(model, example, forward=forward)
    layers = [LayerName(name="data", tap="data", kind="input")]
    tap_name = {"data": "data"}
    need_inputs: list[str] = []
    for call in calls:
        inputs = tuple(tap_name[p] for p in call.producers if p is not None and p in tap_name)
        if len(inputs) != len(call.producers):
            inputs = ()
        kind = _kind_from_type_name(call.module_type)
        if kind in ("conv", "fc", "pool") and not inputs:
            need_inputs.append(call.tap)
        if call.normalized:
            norm = f"{call.tap}:normalized"
            nname = generic_layer_name(norm)
            layers.append(LayerName(name=nname, tap=norm, kind="bn", inputs=inputs, module=call.module))
            tap_name[norm] = nname
            inputs, kind = (nname,), "scale"
        name = generic_layer_name(call.tap)
        layers.append(LayerName(name=name, tap=call.tap, kind=kind, inputs=inputs, module=call.module or None))
        tap_name[call.tap] = name
    derived = (BN_NORMALIZED,) if any(c.normalized for c in calls) else ()
    return NvdlaNames(layers=layers, selection=TapSelection(inputs=tuple(need_inputs), derived=derived),
                      preset="generic", traced=True)


# ------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------

_LENET = (
    # name, module type, kind, input
    ("conv1", nn.Conv2d, "conv", "data"),
    ("pool1", nn.MaxPool2d, "pool", "conv1"),
    ("conv2", nn.Conv2d, "conv", "pool1"),
    ("pool2", nn.MaxPool2d, "pool", "conv2"),
    ("ip1", nn.Linear, "fc", "pool2"),
    ("relu1", nn.ReLU, "relu", "ip1"),
    ("ip2", nn.Linear, "fc", "relu1"),
    ("prob", nn.Softmax, "softmax", "ip2"),
)


def _is_caffe_lenet(model: nn.Module) -> bool:
    children = dict(model.named_children())
    return all(isinstance(children.get(n), t) for n, t, _, _ in _LENET)


def caffe_lenet_names(model: nn.Module | None = None) -> NvdlaNames:
    """The BVLC Caffe LeNet layers: ``data, conv1, pool1, conv2, pool2, ip1, relu1, ip2, prob``.

    The modules of ``models.caffe_lenet.CaffeLeNet`` carry the prototxt names, so each
    layer's tap is its module path. ``relu1`` is in place in the prototxt (top ``ip1``)
    but is its own entry; ``ip1``'s entry is the FC output before the ReLU.

    Raises:
        CalibrationError: ``model`` lacks one of those modules (the message names it).
    """
    if model is not None and not _is_caffe_lenet(model):
        children = dict(model.named_children())
        bad = [f"{n} ({t.__name__})" for n, t, _, _ in _LENET if not isinstance(children.get(n), t)]
        raise CalibrationError(f"model {type(model).__name__} is not a Caffe LeNet: missing or mistyped {', '.join(bad)}")
    layers = [LayerName(name="data", tap="data", kind="input")]
    for name, _, kind, src in _LENET:
        layers.append(LayerName(name=name, tap=name, kind=kind, inputs=(src,),
                                module=name if kind in ("conv", "fc") else None))
    return NvdlaNames(layers=layers, selection=TapSelection(), preset="caffe-lenet")


_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


def _is_resnet(model: nn.Module) -> bool:
    children = dict(model.named_children())
    if not all(n in children for n in _RESNET_STEM):
        return False
    return all(isinstance(children[f"layer{i}"], nn.Sequential) and len(children[f"layer{i}"]) > 0 for i in range(1, 5))


def _block_suffixes(count: int, numbered: bool) -> list[str]:
    """Block names of one stage: ``a, b, c, ...`` or ``a, b1, b2, ...``."""
    if numbered or count > len(string.ascii_lowercase):
        return ["a"] + [f"b{i}" for i in range(1, count)]
    return list(string.ascii_lowercase[:count])


def detect_preset(model: nn.Module) -> str:
    """The preset ``"auto"`` picks: Caffe LeNet, a torchvision-style ResNet, else generic."""
    if _is_caffe_lenet(model):
        return "caffe-lenet"
    if _is_resnet(model):
        return "resnet-caffe"
    return "generic"


def resnet_caffe_names(model: nn.Module) -> NvdlaNames:
    """Original Caffe ResNet deploy names for a torchvision ResNet (see the module docstring).

    The block type is read from the modules (a block with ``conv3`` is a Bottleneck);
    stages res3/res4 are numbered ``a, b1, b2, ...`` when ``layer3`` has more than six
    blocks (ResNet-101/152), as in He et al.'s ``ResNet-101/152-deploy.prototxt``. The
    classifier is ``fc<out_features>`` (``fc1000`` for ImageNet).

    The returned :attr:`NvdlaNames.selection` adds BN_NORMALIZED and the residual-sum
    taps (``layer*.relu#2:input`` / ``layer*.relu#1:input``).

    Raises:
        CalibrationError: the model does not have the torchvision ResNet layout (names the
            missing module).
    """
    if not _is_resnet(model):
        children = dict(model.named_children())
        missing = [n for n in _RESNET_STEM if n not in children]
        raise CalibrationError(
            f"model {type(model).__name__} is not a torchvision-style ResNet"
            + (f": missing {', '.join(missing)}" if missing else ": layer1..layer4 must be non-empty nn.Sequential")
        )
    L = LayerName
    layers = [
        L(name="data", tap="data", kind="input"),
        L(name="conv1", tap="conv1", kind="conv", inputs=("data",), module="conv1"),
        L(name="bn_conv1", tap="bn1:normalized", kind="bn", inputs=("conv1",), module="bn1"),
        L(name="scale_conv1", tap="bn1", kind="scale", inputs=("bn_conv1",), module="bn1"),
        L(name="conv1_relu", tap="relu", kind="relu", inputs=("scale_conv1",)),
        L(name="pool1", tap="maxpool", kind="pool", inputs=("conv1_relu",)),
    ]
    numbered = len(model.layer3) > 6
    prev = "pool1"
    bottleneck = None
    for stage in range(1, 5):
        seq = getattr(model, f"layer{stage}")
        caffe_stage = stage + 1
        suffixes = _block_suffixes(len(seq), numbered and caffe_stage in (3, 4))
        for j, (block, suffix) in enumerate(zip(seq, suffixes)):
            is_bottleneck = hasattr(block, "conv3")
            for attr in ("conv1", "bn1", "conv2", "bn2", "relu") + (("conv3", "bn3") if is_bottleneck else ()):
                if not hasattr(block, attr):
                    raise CalibrationError(f"layer{stage}.{j} ({type(block).__name__}) has no {attr}: not a torchvision ResNet block")
            bottleneck = is_bottleneck if bottleneck is None else bottleneck
            p = f"layer{stage}.{j}"
            b = f"{caffe_stage}{suffix}"
            if getattr(block, "downsample", None) is not None:
                layers += [
                    L(name=f"res{b}_branch1", tap=f"{p}.downsample.0", kind="conv", inputs=(prev,),
                      module=f"{p}.downsample.0"),
                    L(name=f"bn{b}_branch1", tap=f"{p}.downsample.1:normalized", kind="bn",
                      inputs=(f"res{b}_branch1",), module=f"{p}.downsample.1"),
                    L(name=f"scale{b}_branch1", tap=f"{p}.downsample.1", kind="scale",
                      inputs=(f"bn{b}_branch1",), module=f"{p}.downsample.1"),
                ]
                shortcut = f"scale{b}_branch1"
            else:
                shortcut = prev
            branches = ("2a", "2b", "2c") if is_bottleneck else ("2a", "2b")
            x = prev
            for k, br in enumerate(branches, start=1):
                layers += [
                    L(name=f"res{b}_branch{br}", tap=f"{p}.conv{k}", kind="conv", inputs=(x,), module=f"{p}.conv{k}"),
                    L(name=f"bn{b}_branch{br}", tap=f"{p}.bn{k}:normalized", kind="bn",
                      inputs=(f"res{b}_branch{br}",), module=f"{p}.bn{k}"),
                    L(name=f"scale{b}_branch{br}", tap=f"{p}.bn{k}", kind="scale",
                      inputs=(f"bn{b}_branch{br}",), module=f"{p}.bn{k}"),
                ]
                x = f"scale{b}_branch{br}"
                if k < len(branches):
                    relu_tap = f"{p}.relu" if k == 1 else f"{p}.relu#{k - 1}"
                    layers.append(L(name=f"res{b}_branch{br}_relu", tap=relu_tap, kind="relu", inputs=(x,)))
                    x = f"res{b}_branch{br}_relu"
            last = len(branches) - 1  # call index of the block's last ReLU
            layers += [
                L(name=f"res{b}", tap=f"{p}.relu#{last}:input", kind="eltwise", inputs=(shortcut, x)),
                L(name=f"res{b}_relu", tap=f"{p}.relu#{last}", kind="relu", inputs=(f"res{b}",)),
            ]
            prev = f"res{b}_relu"
    fc = f"fc{model.fc.out_features}" if isinstance(model.fc, nn.Linear) else "fc1000"
    layers += [
        L(name="pool5", tap="avgpool", kind="pool", inputs=(prev,)),
        L(name=fc, tap="fc", kind="fc", inputs=("pool5",), module="fc"),
        L(name="prob", amax=SOFTMAX_AMAX, kind="softmax", inputs=(fc,),
          note="softmax output lies in [0, 1]; torchvision has no softmax module"),
    ]
    pattern = "layer*.relu#2" if bottleneck else "layer*.relu#1"
    return NvdlaNames(layers=layers, selection=TapSelection(inputs=(pattern,), derived=(BN_NORMALIZED,)),
                      preset="resnet-caffe")


# ------------------------------------------------------------------------------------------
# Calibrate with the taps a preset needs
# ------------------------------------------------------------------------------------------


def _peek(loader: Iterable) -> tuple[Any, Iterable]:
    """The first batch of ``loader`` and an iterable that still yields every batch."""
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise CalibrationError("the loader yielded no batches: nothing to calibrate on") from None
    if it is loader:  # a one-shot iterator: put the batch back
        return first, itertools.chain([first], it)
    return first, loader


def calibrate_for_nvdla(model: nn.Module, loader: Iterable, preset: str = "auto", *,
                        overrides: Overrides | None = None, taps: TapSelection | None = None,
                        forward: Callable[[nn.Module, Any], Any] | None = None, **kwargs):
    """Calibrate ``model`` observing every tap the NVDLA names need.

    Args:
        model: the model.
        loader: calibration batches (a one-shot iterator is fine).
        preset: naming preset (see :meth:`NvdlaNames.for_model`).
        overrides: user names (tap or layer name -> name, or a callable).
        taps: extra taps to observe, merged with the preset's selection.
        forward: ``forward(model, batch)`` for unusual batches.
        **kwargs: passed to :func:`~torch_nvdla.calibrate` (``method``, ``num_batches``,
            ``bins``, ``cache``, ``progress`` ...).

    Returns:
        ``(table, names)``: the :class:`~torch_nvdla.CalibrationTable` and the
        :class:`NvdlaNames` to pass to :func:`~torch_nvdla.nvdla.calibjson.export_calib_json`.

    Raises:
        CalibrationError: as :func:`~torch_nvdla.calibrate`, or when the table lacks a tap
            the names need (names the layers).
    """
    from ..calib.calibrate import calibrate

    if preset == "auto":
        preset = detect_preset(model)
    example = None
    if preset == "generic":
        example, loader = _peek(loader)
    names = NvdlaNames.for_model(model, preset, overrides=overrides, example_input=example, forward=forward)
    selection = names.selection if taps is None else names.selection.merged(taps)
    table = calibrate(model, loader, taps=selection, forward=forward, **kwargs)
    names.require(table)
    return table, names
