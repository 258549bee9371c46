"""Taps: which tensors of a model a calibration pass observes, and the hooks that observe them.

Design notes and the facts behind them: ``docs/calib.md``.
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .histogram import HistogramObserver

__all__ = [
    "BN_NORMALIZED",
    "CallSites",
    "DerivedTap",
    "TapHooks",
    "TapInfo",
    "TapSelection",
    "TensorMemo",
    "first_tensor",
    "is_leaf",
    "leaf_modules",
    "tap_name",
    "tensor_args",
]

_SAME_VALUES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten)


@dataclass(frozen=True, kw_only=True)
class DerivedTap:
    """A tensor computed from one module call, observed as ``<tap>:<name>``.

    Attributes:
        name: suffix of the tap name.
        applies: which modules it applies to.
        fn: ``fn(module, inputs, output) -> Tensor``.
    """

    name: str
    applies: Callable[[nn.Module], bool]
    fn: Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or "#" in self.name:
            raise ValueError(f"derived tap name must be non-empty without ':' or '#': {self.name!r}")


def _bn_normalized(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = module.running_mean.view(shape)
    inv = torch.rsqrt(module.running_var.view(shape) + module.eps)
    return (x - mean).mul_(inv)  # in place: one activation-sized allocation, not two


#: Caffe splits BatchNorm into ``BatchNorm`` ((x - mean) / sqrt(var + eps)) and ``Scale``
#: (the affine); this tap observes the first one's output.
BN_NORMALIZED = DerivedTap(
    name="normalized",
    applies=lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None,
    fn=_bn_normalized,
)


@dataclass(frozen=True, kw_only=True)
class TapSelection:
    """What a calibration pass observes.

    Attributes:
        model_input: observe the model input as ``data``.
        outputs: observe every leaf module's output (True), none (False), or those whose
            module path a predicate ``(path, module) -> bool`` accepts.
        inputs: tap names (fnmatch patterns allowed, e.g. ``"layer*.relu#2"``) whose
            input is also observed, as ``<tap>:input``.
        unseen_inputs: also observe, as ``<tap>:input``, the input of every leaf call that
            no tap of the pass has observed as it is: a functional op's result (a residual
            ``+``, ``torch.cat``, ``F.relu`` in ``forward``) or a tensor changed in place
            after it was observed. These are the tensors the simulation, the Caffe export
            and the ONNX Q/DQ placement read that no module output holds.
        unfolded_batchnorms: also observe ``<bn>:normalized`` (:data:`BN_NORMALIZED`) for
            every BatchNorm whose input is not an unchanged convolution output: it cannot
            be folded into a convolution, so NVDLA runs it (and the Caffe export writes it)
            as BatchNorm + Scale, whose first half needs that range.
        derived: extra derived tensors, e.g. :data:`BN_NORMALIZED`.
        reuse: derive ReLU / value-preserving taps from their producer's histogram.
    """

    model_input: bool = True
    outputs: bool | Callable[[str, nn.Module], bool] = True
    inputs: tuple[str, ...] = ()
    unseen_inputs: bool = True
    unfolded_batchnorms: bool = True
    derived: tuple[DerivedTap, ...] = ()
    reuse: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            raise TypeError("TapSelection.inputs is a tuple of tap names, not one string")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "derived", tuple(self.derived))

    def merged(self, other: "TapSelection") -> "TapSelection":
        """The union of two selections (a naming preset adds what it needs)."""
        if callable(self.outputs) or callable(other.outputs):
            outputs = self.outputs if callable(self.outputs) else other.outputs
            if self.outputs is True or other.outputs is True:
                outputs = True
        else:
            outputs = self.outputs or other.outputs
        return TapSelection(
            model_input=self.model_input or other.model_input,
            outputs=outputs,
            inputs=tuple(dict.fromkeys(self.inputs + other.inputs)),
            unseen_inputs=self.unseen_inputs or other.unseen_inputs,
            unfolded_batchnorms=self.unfolded_batchnorms or other.unfolded_batchnorms,
            derived=tuple(dict.fromkeys(self.derived + other.derived)),
            reuse=self.reuse and other.reuse,
        )

    def wants_output(self, path: str, module: nn.Module) -> bool:
        if callable(self.outputs):
            return bool(self.outputs(path, module))
        return bool(self.outputs)

    def wants_input(self, tap: str) -> bool:
        return any(fnmatch.fnmatchcase(tap, pattern) for pattern in self.inputs)


@dataclass(frozen=True)
class _Site:
    """What a pass does with every call of one leaf module."""

    output: bool  # its output is a tap
    copies: str  # "relu" (a ReLU), "same" (value-preserving) or ""
    conv: bool  # a Conv2d (a BatchNorm fed by it can fold)
    derived: tuple  # the selection's derived taps that apply to it
    unfolded_batchnorm: bool  # BN_NORMALIZED applies unless the input is a convolution's output
    module_type: str


@dataclass(frozen=True)
class TapInfo:
    """Where a tap's tensor comes from.

    Attributes:
        name: the tap name (see the module docstring for the scheme).
        module: the module path ('' for the model input).
        call: which call of the module in one forward pass (0-based).
        kind: ``"input"`` for the model input, ``"output"``, ``"module-input"`` or
            ``"derived"``.
        module_type: the module's class name.
        order: position in network order (first observation in the first forward).
        derived: name of the :class:`DerivedTap` for derived taps, else ``""``.
    """

    name: str
    module: str
    call: int
    kind: str
    module_type: str
    order: int
    derived: str = ""


def is_leaf(module: nn.Module) -> bool:
    """A module without children: its calls are the taps."""
    return next(module.children(), None) is None


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every leaf, in registration order (the model itself if it is one)."""
    if is_leaf(model):
        return [("", model)]
    return [(p, m) for p, m in model.named_modules() if p and is_leaf(m)]


def tap_name(path: str, call: int) -> str:
    """The tap of call ``call`` (0-based) of the module at ``path``: ``path`` or ``path#call``."""
    return path if call == 0 else f"{path}#{call}"


def tensor_args(args) -> list[torch.Tensor]:
    """The tensors among call arguments (looking one level into tuples/lists)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def first_tensor(args) -> torch.Tensor | None:
    """The first tensor among call arguments, or None."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]  # (the usual call: no list built)
    tensors = tensor_args(args)
    return tensors[0] if tensors else None


def _observable(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.layout == torch.strided


def _why_not(x) -> str:
    if isinstance(x, torch.Tensor) and x.layout != torch.strided:
        return f"a {str(x.layout).replace('torch.', '')} tensor (only dense tensors are observed)"
    return f"{type(x).__name__}, not a floating tensor"


def _extent(x: torch.Tensor) -> tuple | None:
    """The elements a dense tensor spans: its device, first element's address, count and
    dtype (a view that reorders or reshapes all of them has the same extent); None for a
    tensor with gaps or overlaps, whose elements its extent does not determine."""
    if not x.is_contiguous():
        expected = 1
        for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
            if stride != expected:
                return None
            expected *= size
    return (x.device, x.data_ptr(), x.numel(), x.dtype)


class TensorMemo:
    """What made (or observed) each tensor of one forward pass: found by identity, or by the
    elements a tensor spans (so a view of all of a remembered tensor's elements --
    ``flatten``, ``view``, ``permute`` -- is found too), each only while unmodified (its
    version counter unchanged). Holds weak references only; :meth:`clear` between passes.

    The one implementation of producer tracing: calibration (:class:`TapHooks`), the NVDLA
    name tracer and the simulation's graph discovery use it.
    """

    def __init__(self) -> None:
        # id / extent -> (weak reference, version when remembered, value)
        self._by_id: dict[int, tuple[weakref.ref, int, Any]] = {}
        self._by_extent: dict[tuple, tuple[weakref.ref, int, Any]] = {}

    def clear(self) -> None:
        self._by_id.clear()
        self._by_extent.clear()

    def remember(self, x: torch.Tensor, value: Any) -> None:
        """Record ``value`` for ``x`` as it is now."""
        p = (weakref.ref(x), x._version, value)
        self._by_id[id(x)] = p
        extent = _extent(x)
        if extent is not None:
            self._by_extent[extent] = p

    def get(self, x) -> Any:
        """The value ``x`` (or a tensor spanning the same elements) was remembered with, if
        unmodified since; else None."""
        if not isinstance(x, torch.Tensor):
            return None
        p = self._by_id.get(id(x))
        if p is None or p[0]() is not x:
            extent = _extent(x)
            p = self._by_extent.get(extent) if extent is not None else None
            origin = p[0]() if p is not None else None
            if origin is None or _extent(origin) != extent:
                return None
        return p[2] if x._version == p[1] else None


class CallSites:
    """Hooks that name every leaf-module call of a forward pass with its tap name.

    The one implementation of the naming scheme: calibration (:class:`TapHooks`), the
    NVDLA name tracer, the simulation and the ONNX tap capture build on it.

    Callbacks (all optional):
        ``on_input(module, args, kwargs)``: the model is called (a new forward pass).
        ``on_call(tap, path, call, module, args)``: a leaf call starts (before it runs).
        ``on_output(tap, path, call, module, args, output)``: a leaf call returned.

    Use as a context manager: hooks are registered on entry (after any already on the
    model) and removed on exit, whatever happened.
    """

    def __init__(self, model: nn.Module, *, on_input=None, on_call=None, on_output=None) -> None:
        self.model = model
        self._on_input, self._on_call, self._on_output = on_input, on_call, on_output
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self._running: dict[int, tuple] = {}  # id(module) -> (tap, call, the entry below it) stack

    def __enter__(self) -> "CallSites":
        try:
            add = self._handles.append
            # with_kwargs: a dict batch calls the model with keyword arguments only.
            add(self.model.register_forward_pre_hook(self._start_pass, with_kwargs=True))
            for path, module in leaf_modules(self.model):
                add(module.register_forward_pre_hook(self._make_start_call(path)))
                add(module.register_forward_hook(self._make_end_call(path)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this object registered."""
        while self._handles:
            self._handles.pop().remove()
        self._calls.clear()
        self._running.clear()

    def _start_pass(self, module, args, kwargs):
        self._calls.clear()
        self._running.clear()
        if self._on_input is not None:
            self._on_input(module, args, kwargs)

    def _make_start_call(self, path: str):
        calls, running, on_call = self._calls, self._running, self._on_call
        names = [path]  # tap_name(path, call) by call

        def start_call(module, args):
            call = calls.get(path, 0)
            calls[path] = call + 1
            if call == len(names):
                names.append(tap_name(path, call))
            tap = names[call]
            key = id(module)
            running[key] = (tap, call, running.get(key))  # (a stack: a module may run inside itself)
            if on_call is not None:
                on_call(tap, path, call, module, args)

        return start_call

    def _make_end_call(self, path: str):
        running, on_output = self._running, self._on_output

        def end_call(module, args, output):
            key = id(module)
            top = running.get(key)
            if top is None:  # (a call that started before the hooks were added)
                tap, call = path, 0
            else:
                tap, call, below = top
                if below is None:
                    del running[key]
                else:
                    running[key] = below
            if on_output is not None:
                on_output(tap, path, call, module, args, output)

        return end_call


class TapHooks:
    """Forward hooks that stream a model's taps into :class:`HistogramObserver` s.

    Use as a context manager; every hook is removed on exit, whatever happened.

    Args:
        model: the model (its instance is hooked; nothing global changes).
        selection: what to observe.
        bins: histogram bins per tap.
        device: where histograms live (default: each activation's own device).
    """

    def __init__(self, model: nn.Module, selection: TapSelection, bins: int = 2048,
                 device: torch.device | str | None = None) -> None:
        self.model = model
        self.selection = selection
        self.bins = bins
        self.device = device
        self.observers: dict[str, HistogramObserver] = {}
        self.infos: dict[str, TapInfo] = {}
        self.skipped: dict[str, str] = {}  # tap -> why it was not observed
        # tap -> the tap whose values it copies (its histogram reused where exact), or whose
        # histogram a ReLU's was derived from
        self.reused: dict[str, str] = {}
        self._sites = CallSites(model, on_input=self._on_input, on_call=self._on_call, on_output=self._on_output)
        self._source: dict[int, str | None] = {}  # id(module) -> tap its input reuses
        # tensor -> (the leaf call or "data" that made it, the tap that observed it), as
        # it is now: either may be None (made by a functional op; not observed).
        self._memo = TensorMemo()
        self._conv_taps: set[str] = set()  # taps of convolution calls
        self._sites_seen: dict[str, _Site] = {}  # module path -> its _Site

    # -- life cycle -------------------------------------------------------------------
    def __enter__(self) -> "TapHooks":
        self._sites.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this object registered."""
        self._sites.close()
        self._memo.clear()
        self._source.clear()
        self._sites_seen.clear()

    # -- bookkeeping --------------------------------------------------------------------
    def _observer(self, name: str, path: str, call: int, kind: str, module_type: str,
                  derived: str = "") -> HistogramObserver:
        obs = self.observers.get(name)
        if obs is None:
            obs = HistogramObserver(self.bins, self.device)
            self.observers[name] = obs
            self.infos[name] = TapInfo(name, path, call, kind, module_type, len(self.infos), derived)
        return obs

    def _record(self, x) -> tuple:
        """``(made by, observed as)`` of ``x`` in this pass, unmodified since; ``(None, None)``
        when neither."""
        return self._memo.get(x) or (None, None)

    def _observed_as(self, seen: str | None) -> str | None:
        """``seen`` (the tap that observed a tensor's values in this pass, unmodified, if any:
        the tensor itself or a view of all its elements) when that tap holds a histogram."""
        return seen if seen is not None and self.observers[seen].last is not None else None

    def _wants_input(self, tap: str, x, made: str | None, seen: str | None) -> bool:
        """Observe call ``tap``'s input ``x`` (made by ``made``, its values held by tap
        ``seen``, see :meth:`_observed_as`): asked for by name, or (``unseen_inputs``) no tap
        holds it as it is and no leaf made it unchanged (a functional op's result, or changed
        in place since), or it is held only as another call's ``:input`` (a functional result
        read by several calls: each gets its own name, sharing the one histogram)."""
        if self.selection.inputs and self.selection.wants_input(tap):
            return True
        if seen is None:
            unseen = made is None
        else:
            unseen = seen.endswith(":input")
        return unseen and self.selection.unseen_inputs and _observable(x)

    def _from_conv(self, x) -> bool:
        """``x`` is a Conv2d's output, unchanged since (a BatchNorm on it can fold)."""
        return self._record(x)[0] in self._conv_taps

    def _site(self, path: str, module: nn.Module) -> _Site:
        """What the selection does with every call of the leaf at ``path`` (fixed per pass)."""
        site = self._sites_seen.get(path)
        if site is None:
            copies = "relu" if isinstance(module, nn.ReLU) else "same" if isinstance(module, _SAME_VALUES) else ""
            derived = tuple(d for d in self.selection.derived if d.applies(module))
            unfolded = (BN_NORMALIZED not in derived and self.selection.unfolded_batchnorms
                        and BN_NORMALIZED.applies(module))
            site = _Site(self.selection.wants_output(path, module), copies, isinstance(module, nn.Conv2d), derived,
                         unfolded, type(module).__name__)
            self._sites_seen[path] = site
        return site

    # -- hooks ---------------------------------------------------------------------------
    def _on_input(self, module, args, kwargs):
        self._source.clear()
        self._memo.clear()
        x = first_tensor(tuple(args) + tuple(kwargs.values()))
        if self.selection.model_input and _observable(x):
            self._observer("data", "", 0, "input", type(module).__name__).update(x)
            self._memo.remember(x, ("data", "data"))
        elif isinstance(x, torch.Tensor):
            self._memo.remember(x, ("data", None))

    def _on_call(self, tap, path, call, module, args):
        x = first_tensor(args)
        made, seen = self._record(x)
        seen = self._observed_as(seen)
        if self._wants_input(tap, x, made, seen):
            name = f"{tap}:input"
            if _observable(x):
                obs = self._observer(name, path, call, "module-input", type(module).__name__)
                if seen is not None and self.selection.reuse:
                    # the same values: seen's histogram, or binned where that is not exact
                    last = self.observers[seen].last
                    if obs.takes(last):
                        obs.update_histogram(last)
                    else:
                        obs.update(x)
                    self.reused[name] = seen
                else:
                    obs.update(x)
                    self._memo.remember(x, (made, name))
                    seen = name
            else:
                self.skipped[name] = f"input is {_why_not(x)}"
        # A ReLU / value-preserving module fed the tensor just observed: remember it.
        self._source[id(module)] = seen if self.selection.reuse else None

    def _on_output(self, tap, path, call, module, args, output):
        src = self._source.pop(id(module), None)
        site = self._site(path, module)
        if site.conv:  # (what the Caffe export folds a BatchNorm into)
            self._conv_taps.add(tap)
        seen = None
        if site.output:
            if not _observable(output):
                self.skipped[tap] = f"output is {_why_not(output)}"
            else:
                obs = self._observer(tap, path, call, "output", site.module_type)
                last = self.observers[src].last if src is not None and site.copies else None
                # The producer's batch histogram (its relu()) stands in for the output where
                # merging it gives the same total (HistogramObserver.takes); otherwise the
                # output itself is observed. (Off the CPU a ReLU's test would read the device
                # once per batch: the output is binned there.)
                relu = site.copies == "relu"
                if last is not None and obs.takes(last, relu):
                    if relu:
                        obs.update_relu_of(last)
                    else:
                        obs.update_histogram(last)
                    self.reused[tap] = src
                else:
                    obs.update(output)
                    if last is not None and not relu:  # the same values, binned here
                        self.reused[tap] = src
                seen = tap
        derived = site.derived
        if site.unfolded_batchnorm:
            x = first_tensor(args)  # (an in-place module's output was made by it, not by a conv)
            if x is output or not self._from_conv(x):
                derived = (*derived, BN_NORMALIZED)
        if isinstance(output, torch.Tensor):
            self._memo.remember(output, (tap, seen))
        for d in derived:
            name = f"{tap}:{d.name}"
            with torch.no_grad():
                value = d.fn(module, args, output)
            self._observer(name, path, call, "derived", site.module_type, d.name).update(value)
