"""calib.json for the NVDLA compiler's ``--calibtable``: write, read, check.

Design notes and the facts behind them: ``docs/nvdla.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CalibrationError, FileFormatError
from ..utils.io import (
    JsonProblem,
    atomic_write_json,
    check_strings,
    json_decoder,
    read_npz,
    read_text,
)
from .naming import LayerName, NameResolution, NvdlaNames

__all__ = [
    "CAFFE_KINDS",
    "UNKNOWN_FACTOR_RANGE",
    "CalibEntry",
    "CalibScan",
    "CheckResult",
    "ExportReport",
    "Finding",
    "NvdlaRanges",
    "apply_nvdla_rules",
    "calib_json_object",
    "check_calib_json",
    "export_calib_json",
    "layers_from_prototxt",
    "load_weight_blobs",
    "nvdla_ranges",
    "print_findings",
    "read_calib_json",
    "representability_findings",
    "scan_calib_json",
    "uppercase_path_finding",
]

#: Caffe layer type -> layer kind (see :data:`torch_nvdla.nvdla.naming.KINDS`).
CAFFE_KINDS = {
    "Input": "input", "Data": "input", "DummyData": "input",
    "Convolution": "conv", "Deconvolution": "conv",
    "InnerProduct": "fc",
    "BatchNorm": "bn", "Scale": "scale",
    "ReLU": "relu",
    "Pooling": "pool",
    "Eltwise": "eltwise",
    "Concat": "concat",
    "Softmax": "softmax",
}  # fmt: skip

#: Heuristic bounds of a factor the checker cannot see (a weight scale ``max|W|/127``, a
#: BatchNorm ``1/sqrt(var + eps)``, a Scale ``gamma``, a folded product of those). Without
#: weights, a layer is reported unrepresentable only when **no** factor in this range
#: could bring ``r = factor * S_in / S_out`` into ``[2^-49, 2^15)``.
UNKNOWN_FACTOR_RANGE = (2.0**-40, 2.0**20)
_R_MIN = 2.0**-49  # t = 63
_R_MAX = 2.0**15  # t = 0
_REL_TOL = 1e-6  # two ranges differing by less than this count as equal
_EXTREME = (2.0**-64, 2.0**64)  # without a prototxt: scales outside are reported


@dataclass(frozen=True)
class Finding:
    """One result of an export or a check.

    Attributes:
        level: ``"error"`` (the compiler fails or the network is mis-scaled),
            ``"warning"`` or ``"info"``.
        rule: a short rule id (``missing``, ``pool``, ``zero-scale`` ...).
        layer: the layer / key concerned, or ``""``.
        message: what is wrong and what to do.
        where: ``file:line`` (or the file) when known.
        line: the 1-based line in the file of ``where``, when known.
    """

    level: str
    rule: str
    layer: str
    message: str
    where: str = ""
    line: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _where(path: Any, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


# ------------------------------------------------------------------------------------------
# NVDLA rules
# ------------------------------------------------------------------------------------------


def _differ(a: float, b: float) -> bool:
    return abs(a - b) > _REL_TOL * max(abs(a), abs(b))


def apply_nvdla_rules(layers: Sequence[LayerName], values: Mapping[str, float], *, fix: bool = True,
                      eltwise: str = "report") -> tuple[dict[str, float], list[Finding], dict[str, tuple[float, float, str]]]:
    """Apply (or, with ``fix=False``, check) the compiler's no-rescale rules.

    Rules (``COMPILER_FACTS.md``): a pool's range equals its producer's; a concat's inputs
    and output share one range (the largest, so nothing clips); an element-wise layer's
    inputs with different ranges are reported (the compiler gives the input created
    earlier in the network the scale of the one created later) or, with
    ``eltwise="unify"``, all set to the largest. Fixes
    are applied until nothing changes, pools last, so a pool always ends equal to its
    producer.

    Args:
        layers: the layers in network order (kind and inputs are used).
        values: layer name -> amax (or scale: only ratios matter).
        fix: change ``values`` (export) or only report mismatches as errors (check).
        eltwise: ``"report"`` or ``"unify"`` (only with ``fix``).

    Returns:
        ``(values, findings, adjusted)`` where ``adjusted`` maps a changed layer to
        ``(old, new, rule)``.
    """
    if eltwise not in ("report", "unify"):
        raise CalibrationError(f"eltwise must be 'report' or 'unify', got {eltwise!r}")
    state = _Rules(layers, values, fix=fix, eltwise=eltwise)
    for _ in range(10):
        changed = False
        for layer in layers:
            if layer.name in state.vals and layer.kind == "eltwise":
                changed |= state.eltwise_rule(layer)
            elif layer.name in state.vals and layer.kind == "concat":
                changed |= state.concat_rule(layer)
        for layer in layers:  # pools last: a pool always ends equal to its producer
            if layer.kind == "pool" and layer.name in state.vals:
                changed |= state.pool_rule(layer)
        if not fix or not changed:
            break
    else:
        state.findings.append(Finding("warning", "rules", "", "the pool / concat / element-wise rules did not settle "
                                      "after 10 passes (conflicting constraints); check the result with "
                                      "`torch-nvdla check`"))
    return state.vals, state.findings, state.adjusted


class _Rules:
    """The values being fixed by :func:`apply_nvdla_rules`, what changed, and what was found."""

    def __init__(self, layers: Sequence[LayerName], values: Mapping[str, float], *, fix: bool, eltwise: str) -> None:
        self.vals = dict(values)
        self.fix, self.eltwise = fix, eltwise
        self.findings: list[Finding] = []
        self.adjusted: dict[str, tuple[float, float, str]] = {}
        self.by_name = {layer.name: layer for layer in layers}
        self.order = {layer.name: i for i, layer in enumerate(layers)}
        self._reported: set[tuple[str, str]] = set()

    def set_value(self, name: str, new: float, rule: str) -> bool:
        old = self.vals[name]
        if not _differ(old, new):
            return False
        first = self.adjusted.get(name, (old, old, rule))[0]
        self.adjusted[name] = (first, new, rule)
        self.vals[name] = new
        return True

    def known(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n in self.vals]

    def once(self, f: Finding) -> None:
        key = (f.rule, f.layer)
        if key not in self._reported:
            self._reported.add(key)
            self.findings.append(f)

    def anchor(self, name: str) -> str:
        """The layer a pool chain takes its range from (raising a pool means raising it)."""
        seen = set()
        while name in self.by_name and self.by_name[name].kind == "pool" and name not in seen:
            seen.add(name)
            ins = self.known(self.by_name[name].inputs)
            if not ins:
                break
            name = ins[0]
        return name

    def unify(self, group: Sequence[str], rule: str) -> tuple[float, bool]:
        """Raise every layer of ``group`` (and the producer a pool takes its range from) to
        the group's largest range, so nothing clips; returns that range and whether anything moved."""
        target = max(self.vals[i] for i in group)
        moved = False
        for i in group:
            moved |= self.set_value(self.anchor(i), target, rule)
            moved |= self.set_value(i, target, rule)
        return target, moved

    def eltwise_rule(self, layer: LayerName) -> bool:
        ins = self.known(layer.inputs)
        if len(ins) < 2:
            self.once(Finding("warning", "eltwise-inputs", layer.name,
                              "element-wise layer with unknown inputs: cannot compare their ranges"))
            return False
        if not any(_differ(self.vals[i], self.vals[ins[0]]) for i in ins):
            return False
        desc = ", ".join(f"{i} {self.vals[i]:.6g}" for i in ins)
        if self.fix and self.eltwise == "unify":
            target, moved = self.unify(ins, "eltwise")
            self.once(Finding("info", "eltwise", layer.name, f"inputs unified to the largest range {target:.6g} "
                                                             f"(were {desc})"))
            return moved
        early, late = sorted(ins[:2], key=lambda n: self.order.get(n, -1))
        self.once(Finding("warning", "eltwise", layer.name,
                          f"inputs have different ranges ({desc}); the compiler overwrites the scale of {early} "
                          f"(created earlier in the network) with {late}'s, for every reader of {early} "
                          "(--eltwise unify avoids it)"))
        return False

    def concat_rule(self, layer: LayerName) -> bool:
        ins = self.known(layer.inputs)
        if not ins:
            self.once(Finding("warning", "concat-inputs", layer.name,
                              "concat with unknown inputs: cannot check one shared scale"))
            return False
        group = ins + [layer.name]
        if not any(_differ(self.vals[i], self.vals[group[0]]) for i in group):
            return False
        desc = ", ".join(f"{i} {self.vals[i]:.6g}" for i in group)
        if self.fix:
            target, moved = self.unify(group, "concat")
            self.once(Finding("info", "concat", layer.name, f"inputs and output share the largest range {target:.6g} "
                                                            f"(were {desc})"))
            return moved
        self.findings.append(Finding("error", "concat", layer.name, "concat is not rescaled by the hardware: its "
                                                                    f"inputs and output must share one scale ({desc})"))
        return False

    def pool_rule(self, layer: LayerName) -> bool:
        ins = self.known(layer.inputs)
        if not ins:
            self.once(Finding("warning", "pool-input", layer.name,
                              "pool with an unknown producer: its entry must equal the producer's entry "
                              "(check the file with `torch-nvdla check --prototxt`)"))
            return False
        src = ins[0]
        if not _differ(self.vals[layer.name], self.vals[src]):
            return False
        if self.fix:
            old = self.vals[layer.name]
            moved = self.set_value(layer.name, self.vals[src], "pool")
            self.once(Finding("info", "pool", layer.name, f"set to its producer {src}'s range {self.vals[src]:.6g} "
                                                          f"(measured {old:.6g}): the pooling engine does not rescale"))
            return moved
        self.findings.append(Finding("error", "pool", layer.name,
                                     f"scale {self.vals[layer.name]:.6g} differs from its producer {src}'s "
                                     f"{self.vals[src]:.6g}: pooling is not rescaled, the network would be mis-scaled "
                                     "(the compiler does not warn)"))
        return False


def _consumers(layers: Sequence[LayerName]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for layer in layers:
        for i in layer.inputs:
            out.setdefault(i, []).append(layer.name)
    return out


def _window_ok(q: float, lo: float, hi: float) -> bool:
    """Whether some factor f in [lo, hi] puts q * f into [2^-49, 2^15)."""
    return q * hi >= _R_MIN and q * lo < _R_MAX


def representability_findings(layers: Sequence[LayerName], scales: Mapping[str, float], *,
                              weight_scales: Mapping[str, float] | None = None, profile: str = "fast-math"
                              ) -> list[Finding]:
    """Report layers whose requantization ratio the compiler cannot represent.

    Every rescaling SDP operation needs ``r = factor * S_in / S_out`` in ``[2^-49, 2^15)``
    (``m in [2^14, 2^15)``, ``t in [0, 63]``; :func:`torch_nvdla.nvdla.requant.multiplier_shift`).
    ``factor`` is the weight scale for conv / fc, unknown for BatchNorm / Scale, 1 for
    ReLU and each element-wise input.

    In the ``"fast-math"`` profile (the compiler's default) a conv / fc followed by its
    BatchNorm / Scale / ReLU (a chain of sole consumers) is one operation writing at the
    chain's **last** entry; in ``"basic"`` every layer rescales on its own.

    With a conv / fc's weight scale known (``weight_scales``) and no BatchNorm / Scale in
    its chain, ``r`` is computed exactly as the compiler does (float32) and the resulting
    ``m >> t`` is reported as info; otherwise a layer is an error only when no factor in
    :data:`UNKNOWN_FACTOR_RANGE` makes ``r`` representable.
    """
    from .requant import multiplier_shift, rescale_ratio

    if profile not in ("fast-math", "basic"):
        raise CalibrationError(f"profile must be 'fast-math' or 'basic', got {profile!r}")
    weight_scales = dict(weight_scales or {})
    consumers = _consumers(layers)
    by_name = {layer.name: layer for layer in layers}
    absorbed: set[str] = set()
    findings: list[Finding] = []

    def exact(name: str, r: float, what: str) -> None:
        try:
            m, t = multiplier_shift(r, float32=True)
        except ValueError as e:
            findings.append(Finding("error", "unrepresentable", name, f"{what} = {r:.4g}: {e}"))
        else:
            findings.append(Finding("info", "requant", name, f"{what} = {r:.6g} -> {m} >> {t}"))
            if t >= 32:
                findings.append(Finding("warning", "large-shift", name,
                                        f"{what} = {r:.4g} needs a right shift of {t} (32..63): the compiler reports "
                                        "it; the output scale is very large against the input's"))

    def chain_of(layer: LayerName) -> list[LayerName]:
        chain = [layer]
        if profile != "fast-math":
            return chain
        cur = layer
        while True:
            nxt = consumers.get(cur.name, [])
            if len(nxt) != 1:
                break
            follower = by_name[nxt[0]]
            if follower.kind not in ("bn", "scale", "relu") or follower.inputs != (cur.name,):
                break
            chain.append(follower)
            cur = follower
            if follower.kind == "relu":
                break
        return chain

    for layer in layers:
        if layer.name in absorbed or layer.kind not in ("conv", "fc", "bn", "scale", "relu", "eltwise"):
            continue
        if layer.kind == "eltwise":
            if layer.name not in scales:
                continue
            for i in layer.inputs:
                if i in scales:
                    exact(layer.name, scales[i] / scales[layer.name], f"input {i}: r = S_in / S_out")
            continue
        chain = chain_of(layer) if layer.kind in ("conv", "fc") else [layer]
        absorbed.update(c.name for c in chain[1:])
        out = chain[-1].name
        if not layer.inputs or layer.inputs[0] not in scales or out not in scales:
            continue
        s_in, s_out = scales[layer.inputs[0]], scales[out]
        q = s_in / s_out
        via = f" (fused with {', '.join(c.name for c in chain[1:])}: output scale of {out})" if len(chain) > 1 else ""
        has_unknown = any(c.kind in ("bn", "scale") for c in chain)
        if layer.kind in ("conv", "fc") and layer.name in weight_scales and not has_unknown:
            s_w = weight_scales[layer.name]
            try:
                r = rescale_ratio(s_in, s_w, s_out, float32=True)
                m, t = multiplier_shift(r, float32=True)
            except ValueError as e:
                findings.append(Finding("error", "unrepresentable", layer.name,
                                        f"r = S_in*S_w/S_out = {s_in:.4g}*{s_w:.4g}/{s_out:.4g}{via}: {e}"))
            else:
                findings.append(Finding("info", "requant", layer.name,
                                        f"r = {r:.6g} -> {m} >> {t}{via}"))
            continue
        if layer.kind == "relu":
            exact(layer.name, q, f"r = S_in / S_out ({layer.inputs[0]} / {layer.name})")
            continue
        if layer.kind in ("conv", "fc") and layer.name in weight_scales:
            lo, hi = UNKNOWN_FACTOR_RANGE
            what = "r = S_in * (folded weight scale) / S_out"
        else:
            lo, hi = UNKNOWN_FACTOR_RANGE
            what = {"conv": "r = S_in * S_w / S_out", "fc": "r = S_in * S_w / S_out"}.get(layer.kind, "r = S_in * factor / S_out")
        if not _window_ok(q, lo, hi):
            extra = " for any plausible weight / BatchNorm factor"
            findings.append(Finding("error", "unrepresentable", layer.name,
                                    f"{what} with S_in {s_in:.4g} ({layer.inputs[0]}), S_out {s_out:.4g}{via}: "
                                    f"cannot lie in [2^-49, 2^15){extra}; the compiler fails "
                                    "(\"Truncate value ... out of range [0,63]\" / \"Couldn't converge\")"))
    return findings


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvdlaRanges:
    """A table's ranges under NVDLA names, after the NVDLA rules.

    Attributes:
        amax: NVDLA name -> amax, network order.
        names: the :class:`NvdlaNames` used.
        resolution: what :meth:`NvdlaNames.resolve` reported (missing names, unnamed taps).
        findings: rule findings and naming reports.
        adjusted: layer -> ``(measured, written, rule)`` for every range a rule changed.
    """

    amax: dict[str, float]
    names: NvdlaNames
    resolution: NameResolution
    findings: list[Finding]
    adjusted: dict[str, tuple[float, float, str]]

    def scales(self) -> dict[str, float]:
        """NVDLA name -> scale (``amax / 127``)."""
        return {n: a / 127.0 for n, a in self.amax.items()}


def _as_names(table, names) -> NvdlaNames:
    if names is None:
        return NvdlaNames.from_table(table)
    if isinstance(names, NvdlaNames):
        return names
    if isinstance(names, Mapping) or callable(names):
        return NvdlaNames.from_table(table, overrides=names)
    raise CalibrationError(f"names must be NvdlaNames, a mapping, a callable or None, got {type(names).__name__}")


def nvdla_ranges(table, names: NvdlaNames | Mapping | Callable | None = None, *, eltwise: str = "report",
                 allow_missing: bool = False) -> NvdlaRanges:
    """Map a calibration table to NVDLA layer names and apply the NVDLA rules.

    Args:
        table: a :class:`~torch_nvdla.CalibrationTable` (or any mapping tap -> object
            with ``.amax``).
        names: :class:`NvdlaNames`; a mapping / callable of user names applied over
            generic names; ``None`` for generic names from the table's taps.
        eltwise: ``"report"`` or ``"unify"`` element-wise inputs with different ranges.
        allow_missing: leave out names with no tap instead of raising.

    Raises:
        CalibrationError: a layer has no tap in the table (the compiler aborts on a
            missing key; the message names them), unless ``allow_missing``.
    """
    names = _as_names(table, names)
    res = names.resolve(table)
    findings: list[Finding] = []
    if res.missing and not allow_missing:
        names.require(table)
    for n in res.missing:
        findings.append(Finding("error", "missing", n, "no tap measures this layer: the compiler aborts on a missing key"))
    for t in res.unnamed:
        if t.endswith(":input") and names.preset in ("generic", "custom"):
            # The tap's module is fed by a functional op (a residual +, torch.cat, F.relu ...):
            # in a Caffe net that op is a layer of its own, whose key this file lacks.
            findings.append(Finding(
                "warning", "functional-op", t,
                f"{t[: -len(':input')]} reads a functional op's result (a +, cat, F.relu ... in forward): in the "
                "deploy prototxt that op is a layer whose calib.json key is missing here (the compiler aborts on a "
                "missing key); export with export_caffe (its calib.json names every layer) or name it with --names"))
        else:
            findings.append(Finding("info", "unnamed-tap", t, "tap has no NVDLA name: not written"))
    if names.traced:
        for layer in names.layers:
            reported = f"{layer.tap}:input" in res.unnamed  # (the warning above)
            if layer.kind != "input" and not layer.inputs and layer.name not in res.missing and not reported:
                # Its input was made by no module (a +, torch.cat, F.relu ... in forward, or an
                # in-place change): in a Caffe net that op is a layer of its own.
                findings.append(Finding(
                    "warning", "functional-op", layer.name,
                    f"{layer.name} reads a tensor no module produced (a +, cat, F.relu ... in forward): in the deploy "
                    "prototxt that op is a layer whose calib.json key is missing here (the compiler aborts on a "
                    "missing key); export with export_caffe (its calib.json names every layer), or check this "
                    "file against the deploy prototxt"))
    for k in res.unmatched_overrides:
        findings.append(Finding("warning", "override", k, "name override matched no tap and no layer"))
    for t in names.dropped:
        findings.append(Finding("info", "dropped", t, "layer dropped by a name override: not written"))
    amax, rule_findings, adjusted = apply_nvdla_rules(names.layers, res.amax, fix=True, eltwise=eltwise)
    findings.extend(rule_findings)
    return NvdlaRanges(amax, names, res, findings, adjusted)


def calib_json_object(scales: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """The calib.json object for ``name -> scale`` (native floats, the given order).

    Raises:
        CalibrationError: a scale that is not finite and > 0 (names the layer).
    """
    obj = {}
    for name, s in scales.items():
        s = float(s)
        if not (math.isfinite(s) and s > 0):
            raise CalibrationError(f"layer {name!r}: scale must be finite and > 0, got {s!r} (the compiler fails on it)")
        obj[str(name)] = {"scale": s, "min": 0, "max": 0, "offset": 0}
    return obj


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_calib_json` wrote and found.

    Attributes:
        path: the file written.
        scales: NVDLA name -> scale written, in file order.
        ranges: the :class:`NvdlaRanges` behind it (sources, adjustments).
        findings: every finding (rules, naming, path).
    """

    path: Path
    scales: dict[str, float]
    ranges: NvdlaRanges
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def print(self, title: str | None = None, limit: int | None = None) -> None:
        """Print the entries and the findings as rich tables (stdout)."""
        from rich.table import Table

        from ..utils.report import stdout

        t = Table(title=title or f"calib.json -> {self.path} ({len(self.scales)} layers)")
        for col, kw in [("#", {"justify": "right"}), ("layer", {}), ("source", {}), ("amax", {"justify": "right"}),
                        ("scale", {"justify": "right"}), ("rule", {})]:
            t.add_column(col, **kw)
        items = list(self.scales.items())
        shown = items if limit is None else items[:limit]
        for i, (name, s) in enumerate(shown):
            adj = self.ranges.adjusted.get(name)
            t.add_row(str(i), name, self.ranges.resolution.sources.get(name, ""), f"{s * 127.0:.5g}", f"{s:.5g}",
                      f"{adj[2]} (was {adj[0]:.4g})" if adj else "")
        if len(shown) < len(items):
            t.add_row("…", f"{len(items) - len(shown)} more", "", "", "", "")
        stdout.print(t)
        if self.findings:
            print_findings(self.findings, title="export findings")


def uppercase_path_finding(path: Any, level: str) -> Finding | None:
    """A finding when ``path`` has upper-case letters (the compiler lowercases it and aborts)."""
    text = str(path)
    if any(c.isupper() for c in text):
        return Finding(level, "uppercase-path", "",
                       f"path {text!r} has upper-case letters: the NVDLA compiler lowercases --calibtable paths "
                       "and then aborts (exit 134); pass it a lower-case path", text)
    return None


def export_calib_json(table, path: str | os.PathLike, names: NvdlaNames | Mapping | Callable | None = None, *,
                      eltwise: str = "report", allow_missing: bool = False, show: bool = True) -> ExportReport:
    """Write the calib.json the NVDLA compiler reads with ``--calibtable``.

    Deterministic: layers in network order, native Python floats (``scale = amax / 127``,
    ``min = max = offset = 0`` as in the compiler's own samples), written atomically.
    The NVDLA rules are applied (:func:`apply_nvdla_rules`) and every change reported;
    every scale is checked finite and > 0 and its requantization ratio representable
    (:func:`representability_findings`, without weights).

    Args:
        table: the calibration table (calibrate with ``taps=names.selection``).
        path: the file to write. Upper-case letters are reported (the compiler lowercases
            the path and crashes).
        names: :class:`NvdlaNames` (e.g. ``NvdlaNames.for_model(model)``); a mapping /
            callable of user names over generic names; ``None`` for generic names.
        eltwise: ``"report"`` element-wise inputs with different ranges, or ``"unify"``
            them to the largest.
        allow_missing: write without the layers that have no tap (the compiler will abort
            on them; they are reported as errors) instead of raising.
        show: print each warning (one line each: functional ops, element-wise ranges,
            an upper-case path ...); every finding is in the report either way.

    Returns:
        An :class:`ExportReport`.

    Raises:
        CalibrationError: layers without a tap (unless ``allow_missing``), or scales the
            compiler cannot use (the message names the layers); nothing is written then.
    """
    from ..utils.console import say

    ranges = nvdla_ranges(table, names, eltwise=eltwise, allow_missing=allow_missing)
    scales = ranges.scales()
    findings = list(ranges.findings)
    bad = representability_findings(ranges.names.layers, scales)
    findings.extend(f for f in bad if f.level != "info")
    errors = [f for f in bad if f.level == "error"]
    if errors:
        raise CalibrationError(
            f"{len(errors)} layer(s) would fail in the NVDLA compiler, nothing written: "
            + "; ".join(f"{f.layer}: {f.message}" for f in errors[:5])
        )
    obj = calib_json_object(scales)
    up = uppercase_path_finding(path, "warning")
    if up is not None:
        findings.append(up)
    written = atomic_write_json(path, obj)
    if show:
        for f in findings:
            if f.level == "warning":
                say(f"[yellow]warning:[/] {f.message} [dim]({f.rule})[/]")
    return ExportReport(written, scales, ranges, findings)


# ------------------------------------------------------------------------------------------
# Read
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibEntry:
    """One calib.json entry as the compiler would use it.

    Attributes:
        name: the key.
        scale: the effective scale (``scale``, or ``max(|min|, |max|) / 127``), ``None``
            when unusable.
        line: 1-based line of the key.
        from_minmax: the scale came from ``min`` / ``max``.
    """

    name: str
    scale: float | None
    line: int
    from_minmax: bool = False


@dataclass(frozen=True)
class CalibScan:
    """A calib.json read without stopping at the first problem.

    Attributes:
        path: the file.
        entries: key -> :class:`CalibEntry` (first occurrence of a duplicate key, as the
            compiler does), file order.
        findings: every problem, with its line.
    """

    path: Path
    entries: dict[str, CalibEntry]
    findings: list[Finding]

    def scales(self) -> dict[str, float]:
        """Key -> usable scale (entries with problems left out)."""
        return {k: e.scale for k, e in self.entries.items() if e.scale is not None}


_WS = " \t\n\r"


def _describe(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _entry_findings(name: str, value: Any, path: Path, line: int) -> tuple[CalibEntry, list[Finding]]:
    where = _where(path, line)
    out: list[Finding] = []

    def err(rule: str, msg: str) -> tuple[CalibEntry, list[Finding]]:
        out.append(Finding("error", rule, name, msg, where, line))
        return CalibEntry(name, None, line), out

    if not isinstance(value, dict):
        return err("entry-type", f"entry is {_describe(value)}, not an object {{\"scale\": s}} (the compiler aborts)")
    if "scale" in value:
        s = value["scale"]
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            return err("scale-type", f"scale is {_describe(s)}, not a number (the compiler aborts)")
        s = float(s)
        if math.isnan(s):
            return err("non-finite", f"scale is {s!r}: NaN is not a JSON number and no usable scale")
        if math.isinf(s) or abs(s) >= 1e300:
            return err("non-finite", "scale is infinite or out of range (Infinity, or a number too large to be a "
                                     "scale): the compiler cannot represent it")
        if s == 0:
            return err("zero-scale", "scale is 0: the compiler fails (EngineEdge.cpp, layer not named)")
        if s < 0:
            return err("negative-scale", f"scale is negative ({s!r}): the compiler accepts it silently and flips signs")
        for k in ("min", "max", "offset"):
            if k in value and (isinstance(value[k], bool) or not isinstance(value[k], (int, float))):
                out.append(Finding("warning", "field-type", name, f"{k} is {_describe(value[k])}, not a number", where, line))
        return CalibEntry(name, s, line), out
    if "min" in value or "max" in value:
        vals = []
        for k in ("min", "max"):
            v = value.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                return err("scale-type", f"no scale, and {k} is {_describe(v)}, not a finite number")
            vals.append(abs(float(v)))
        s = max(vals) / 127.0
        if s == 0:
            return err("zero-scale", "no scale, and min = max = 0: a zero range (the compiler fails)")
        out.append(Finding("warning", "minmax", name,
                           f"no scale: the compiler uses min/max symmetrically (scale {s:.6g}); any asymmetry is dropped", where, line))
        return CalibEntry(name, s, line, from_minmax=True), out
    return err("no-scale", "entry has neither scale nor min/max")


def scan_calib_json(path: str | os.PathLike) -> CalibScan:
    """Read a calib.json, collecting every per-entry problem with its line.

    Structural problems (unreadable, not UTF-8, invalid or truncated JSON, a top-level
    value that is not an object) raise at once; per-entry ones (wrong types, NaN, zero /
    negative scales, duplicates) become findings.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: naming the file, the line and the problem.
    """
    path = Path(path)
    text = read_text(path, "calib.json")
    dec = json_decoder(constants=True)  # NaN / Infinity become per-entry findings
    n = len(text)
    counted = [0, 1]  # position, line there: lines are counted once, front to back

    def line_at(pos: int) -> int:
        if pos < counted[0]:
            return text.count("\n", 0, pos) + 1
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def ws(pos: int) -> int:
        while pos < n and text[pos] in _WS:
            pos += 1
        return pos

    def fail(pos: int, problem: str):
        raise FileFormatError(path, problem, line=line_at(min(pos, n)))

    def value_at(pos: int, what: str):
        try:
            value, end = dec.raw_decode(text, pos)
            check_strings(value)
            return value, end
        except json.JSONDecodeError as e:
            if e.pos >= n or ws(pos) >= n:
                fail(e.pos, f"truncated: the file ends inside {what}")
            raise FileFormatError(path, f"invalid JSON in {what}: {e.msg}", line=e.lineno) from None
        except RecursionError:
            fail(pos, f"invalid JSON in {what}: nested too deeply")
        except JsonProblem as e:
            fail(pos, f"invalid JSON in {what}: {e.problem}")

    pos = ws(0)
    if pos >= n:
        fail(pos, "empty file: expected a JSON object {\"layer\": {\"scale\": s}, ...}")
    if text[pos] != "{":
        top, _ = value_at(pos, "the top-level value")
        fail(pos, f"top-level value is {_describe(top)}, not an object {{\"layer\": {{\"scale\": s}}}} (the compiler aborts)")
    pos = ws(pos + 1)
    entries: dict[str, CalibEntry] = {}
    findings: list[Finding] = []
    if pos < n and text[pos] == "}":
        pos += 1
        findings.append(Finding("error", "empty", "", "the object has no entries", _where(path, line_at(pos)), line_at(pos)))
    else:
        while True:
            if pos >= n:
                fail(pos, "truncated: the file ends before the closing '}'")
            if text[pos] != '"':
                fail(pos, f"expected a quoted layer name, found {text[pos]!r}")
            key_pos = pos
            key, pos = value_at(pos, "a key")
            pos = ws(pos)
            if pos >= n:
                fail(pos, f"truncated: the file ends after key {key!r}")
            if text[pos] != ":":
                fail(pos, f"expected ':' after key {key!r}, found {text[pos]!r}")
            value, pos = value_at(ws(pos + 1), f"the entry of {key!r}")
            line = line_at(key_pos)
            entry, problems = _entry_findings(key, value, path, line)
            if key in entries:
                findings.append(Finding("warning", "duplicate", key,
                                        f"duplicate key: the compiler uses the first one (line {entries[key].line})",
                                        _where(path, line), line))
            else:
                entries[key] = entry
                findings.extend(problems)
            pos = ws(pos)
            if pos >= n:
                fail(pos, "truncated: the file ends before the closing '}'")
            if text[pos] == ",":
                pos = ws(pos + 1)
                continue
            if text[pos] == "}":
                pos += 1
                break
            fail(pos, f"expected ',' or '}}' after the entry of {key!r}, found {text[pos]!r}")
    pos = ws(pos)
    if pos < n:
        fail(pos, "extra data after the top-level object")
    return CalibScan(path, entries, findings)


def read_calib_json(path: str | os.PathLike) -> dict[str, float]:
    """Read and validate a calib.json: layer name -> scale, file order.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: truncated / invalid JSON, not UTF-8, a top-level value that is
            not an object, an entry that is not an object, a scale that is not a number,
            NaN / Infinity, zero or negative scales, no scale nor min/max. The message
            names the file, the line, the key and the problem (and counts the others).
    """
    scan = scan_calib_json(path)
    errors = [f for f in scan.findings if f.level == "error"]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        key = f"key {first.layer!r}: " if first.layer else ""
        raise FileFormatError(scan.path, f"{key}{first.message}{more}", line=first.line)
    return scan.scales()


# ------------------------------------------------------------------------------------------
# Check against a prototxt
# ------------------------------------------------------------------------------------------


def layers_from_prototxt(net) -> tuple[list[LayerName], dict[str, int | None]]:
    """The network's NVDLA layers (kind, producers) from a parsed prototxt.

    A layer's input is the **last writer** of its bottom blob before it (in-place layers
    included: in ResNet, ``pool1``'s producer is ``conv1_relu``, not ``conv1``). Inputs
    declared the legacy way (``input: "data"``) are layers named after the blob.

    Returns:
        ``(layers, lines)``: the layers in file order and layer name -> prototxt line.
    """
    from ..caffe.prototxt import is_test_phase

    layers: list[LayerName] = []
    lines: dict[str, int | None] = {}
    writer: dict[str, str] = {}
    for blob in getattr(net, "declared_inputs", {}) or {}:
        layers.append(LayerName(name=blob, kind="input"))
        lines[blob] = None
        writer[blob] = blob
    for layer in net.layers:
        if is_test_phase(layer) or not layer.name:
            continue
        if layer.type == "Input":  # the compiler keys a network input by its blob name
            for top in layer.tops:
                layers.append(LayerName(name=top, kind="input"))
                lines[top] = layer.line
                writer[top] = top
            continue
        if layer.type in _PASS_THROUGH:  # the compiler makes no layer: the top is the bottom's tensor
            if layer.bottoms and layer.bottoms[0] in writer:
                for top in layer.tops:
                    writer[top] = writer[layer.bottoms[0]]
            continue
        inputs = tuple(writer[b] for b in layer.bottoms if b in writer)
        if len(inputs) != len(layer.bottoms):
            inputs = ()
        layers.append(LayerName(name=layer.name, kind=CAFFE_KINDS.get(layer.type, "other"), inputs=inputs))
        lines[layer.name] = layer.line
        for top in layer.tops:
            writer[top] = layer.name
    return layers, lines


#: Layers the compiler's Caffe parser skips (no layer, no calib.json key).
_PASS_THROUGH = frozenset({"Dropout", "Flatten"})


def load_weight_blobs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Layer name -> weight array from an ``.npz`` of Caffe blobs (keys ``<layer>.weight``).

    Keys without ``.weight`` are ignored except bare layer names holding arrays of 2 or
    more dimensions.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not a readable ``.npz``.
    """
    path = Path(path)
    out = {}
    for key, arr in read_npz(path, "weights .npz").items():
        if key.endswith(".weight"):
            out[key[: -len(".weight")]] = _weight_array(path, key, arr)
        elif "." not in key and arr.ndim >= 2:
            out.setdefault(key, _weight_array(path, key, arr))
    return out


def _weight_array(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise FileFormatError(path, f"array {key!r} is {arr.dtype} ({'complex' if arr.dtype.kind == 'c' else 'not real numbers'}): "
                                    "weights must be real numbers")
    if arr.size == 0:
        raise FileFormatError(path, f"array {key!r} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise FileFormatError(path, f"array {key!r} holds NaN or Inf")
    return arr


def _weight_scale(w: np.ndarray) -> float:
    """Per-kernel weight scale as the compiler computes it: float32 ``max|W| / 127``."""
    a = np.float32(np.max(np.abs(np.asarray(w, dtype=np.float32))))
    return float(a / np.float32(127.0))


@dataclass(frozen=True)
class CheckResult:
    """The outcome of :func:`check_calib_json`.

    Attributes:
        path: the calib.json.
        findings: errors, warnings and info, in file / network order.
        entries: the file's usable scales.
        layers: the prototxt's layers (empty without a prototxt).
    """

    path: Path
    findings: list[Finding]
    entries: dict[str, float]
    layers: list[LayerName]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"path": str(self.path), "ok": self.ok, "entries": len(self.entries), "layers": len(self.layers),
                "errors": len(self.errors), "findings": [f.to_dict() for f in self.findings]}


def check_calib_json(path: str | os.PathLike, prototxt: str | os.PathLike | None = None, *,
                     blobs: Mapping[str, Any] | str | os.PathLike | None = None,
                     profile: str = "fast-math", target: str = "nv_full") -> CheckResult:
    """Check a calib.json the way the NVDLA compiler will use it.

    Reported as **errors** (the compiler fails, or the network comes out mis-scaled):
    every prototxt layer (and legacy input) with no entry; zero, negative, non-finite or
    wrong-typed scales and non-object entries; requantization ratios the compiler cannot
    represent (:func:`representability_findings`; exact with ``blobs``); a pool whose
    entry differs from its producer's; a concat whose inputs / output differ; a path with
    upper-case letters (the compiler lowercases it and aborts). **Warnings**: keys that
    match no layer (ignored by the compiler), duplicate keys, min/max entries,
    element-wise inputs with different scales; without a prototxt, scales outside
    ``[2^-64, 2^64]``. **Info**: the ``m >> t`` of every layer whose weights are given.

    Args:
        path: the calib.json, as it will be passed to the compiler (checked for
            upper-case letters as given).
        prototxt: the deploy prototxt the compiler will read (a path, or a parsed
            :class:`~torch_nvdla.caffe.prototxt.CaffeNet`, e.g. ``convert_to_caffe(model).net``).
        blobs: layer name -> weight array, or an ``.npz`` of Caffe blobs
            (:func:`load_weight_blobs`), for exact ``m >> t``.
        profile: ``"fast-math"`` (the compiler's default) or ``"basic"``.
        target: ``nv_full``, ``nv_large`` or ``nv_small``: layers it cannot run are
            errors (:func:`~torch_nvdla.nvdla.rules.hardware_issues`).

    Raises:
        FileNotFoundError / FileFormatError: the calib.json or prototxt cannot be read
            at all (structural problems; per-entry problems are findings).
    """
    if isinstance(blobs, (str, os.PathLike)):
        blobs = load_weight_blobs(blobs)  # a bad file is an error even without a prototxt
    scan = scan_calib_json(path)
    findings = list(scan.findings)
    up = uppercase_path_finding(path, "error")
    if up is not None:
        findings.insert(0, up)
    scales = scan.scales()
    layers: list[LayerName] = []
    if prototxt is None:
        for name, s in scales.items():
            if not (_EXTREME[0] <= s <= _EXTREME[1]):
                findings.append(Finding("warning", "extreme-scale", name,
                                        f"scale {s:.4g} is outside [2^-64, 2^64]: almost certainly unrepresentable "
                                        "(pass --prototxt to check the ratios)", _where(scan.path, scan.entries[name].line),
                                        scan.entries[name].line))
        return CheckResult(scan.path, findings, scales, layers)
    from ..caffe.prototxt import (
        COMPILER_LAYER_TYPES,
        parse_prototxt,
        structure_problems,
    )
    from .rules import hardware_issues

    net = prototxt if hasattr(prototxt, "layers") else parse_prototxt(Path(prototxt))
    if net is prototxt:
        prototxt = net.source or "<net>"
    for p in structure_problems(net, COMPILER_LAYER_TYPES):
        findings.append(Finding("error", "structure", p.layer, f"{p.problem} (the compiler fails)",
                                _where(prototxt, p.line), p.line))
    for h in hardware_issues(net, target):
        findings.append(Finding(h.level, h.rule, h.layer, h.message, _where(prototxt, h.line), h.line))
    layers, lines = layers_from_prototxt(net)
    names = {layer.name for layer in layers}
    for layer in layers:
        if layer.name not in scan.entries:
            findings.append(Finding("error", "missing", layer.name,
                                    "layer has no entry: the compiler aborts (exit 134) without naming it",
                                    _where(prototxt, lines.get(layer.name)), lines.get(layer.name)))
    for key, entry in scan.entries.items():
        if key not in names:
            findings.append(Finding("warning", "unknown-key", key, "key matches no layer of the prototxt (ignored by the compiler)",
                                    _where(scan.path, entry.line), entry.line))
    _, rule_findings, _ = apply_nvdla_rules(layers, scales, fix=False)
    wmap: dict[str, float] = {}
    if blobs is not None:
        blobs = dict(blobs)
        wmap = {k: _weight_scale(v) for k, v in blobs.items() if k in names}
    rep = representability_findings(layers, scales, weight_scales=wmap, profile=profile)
    for f in rule_findings + rep:
        line = scan.entries[f.layer].line if f.layer in scan.entries else None
        findings.append(Finding(f.level, f.rule, f.layer, f.message, f.where or _where(scan.path, line),
                                f.line if f.where else line))
    return CheckResult(scan.path, findings, scales, layers)


_LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def print_findings(findings: Sequence[Finding], title: str | None = None, *, show_info: bool = True) -> None:
    """Findings as a rich table on stdout (level, layer, rule, message, where)."""
    from rich.table import Table

    from ..utils.report import stdout

    t = Table(title=title)
    for col in ("level", "layer", "rule", "message", "where"):
        t.add_column(col, overflow="fold")
    for f in findings:
        if f.level == "info" and not show_info:
            continue
        t.add_row(f"[{_LEVEL_STYLE.get(f.level, '')}]{f.level}[/]", f.layer, f.rule, f.message, f.where)
    stdout.print(t)
