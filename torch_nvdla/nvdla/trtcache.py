"""TensorRT INT8 calibration caches: write, read, convert to NVDLA calib.json.

Design notes and the facts behind them: ``docs/nvdla.md``.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, FileFormatError
from ..utils.io import atomic_write_json, atomic_write_text, read_json, read_text

__all__ = [
    "DEFAULT_TRT_VERSION",
    "TRT_ALGORITHMS",
    "TrtCache",
    "TrtConversion",
    "caffe_trt_names",
    "convert_trt_cache",
    "float32_hex",
    "hex_float32",
    "read_name_map",
    "read_trt_cache",
    "trt_cache_text",
    "trt_cache_to_calib_json",
    "trt_tensor_names",
    "write_trt_cache",
]

#: Calibrator names TensorRT writes in the header.
TRT_ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
#: Header version written by default (TensorRT 8.6.1).
DEFAULT_TRT_VERSION = "8601"

_HEADER = re.compile(r"TRT-(\d+)-([A-Za-z0-9_]+)")
_HEX = re.compile(r"[0-9A-Fa-f]{1,8}")
_UNNAMED = re.compile(r"\(Unnamed Layer\* (\d+)\) \[([^\]]+)\]_output")

#: Caffe layer type -> TensorRT layer type names its Caffe parser creates.
_TRT_TYPES = {
    "Convolution": {"Convolution"},
    "Deconvolution": {"Deconvolution"},
    "InnerProduct": {"Fully Connected", "FullyConnected", "Matrix Multiply", "Convolution"},
    "ReLU": {"Activation"}, "Sigmoid": {"Activation"}, "TanH": {"Activation"}, "ELU": {"Activation"},
    "BatchNorm": {"Scale"}, "Scale": {"Scale"}, "Power": {"Scale"},
    "Pooling": {"Pooling"},
    "Eltwise": {"ElementWise"},
    "Concat": {"Concatenation"},
    "Softmax": {"Softmax", "SoftMax"},
    "LRN": {"LRN"},
}  # fmt: skip
_NOT_TRT_LAYERS = ("Input", "Data", "DummyData", "ImageData", "MemoryData", "HDF5Data")


def float32_hex(scale: float) -> str:
    """The cache's hex for a scale: the float32 bit pattern, lowercase, no leading zeros."""
    bits = struct.unpack(">I", struct.pack(">f", float(np.float32(scale))))[0]
    return f"{bits:x}"


def hex_float32(text: str) -> float:
    """The scale a cache hex stands for (big-endian float32 bits), as a Python float.

    Raises:
        ValueError: not 1-8 hex digits.
    """
    if not _HEX.fullmatch(text):
        raise ValueError(f"{text!r} is not 1 to 8 hex digits")
    return struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0]


def _check_version(version: Any) -> str:
    v = str(version)
    if not v.isdigit():
        raise CalibrationError(f"TensorRT cache version must be digits (e.g. 8601 for 8.6.1), got {version!r}")
    return v


def trt_cache_text(amax: Mapping[str, float], *, version: str | int = DEFAULT_TRT_VERSION,
                   algorithm: str = "EntropyCalibration2") -> str:
    """The text of a TensorRT calibration cache for ``tensor -> amax`` (given order).

    Raises:
        CalibrationError: an amax that is not finite and > 0, a name with a line break,
            an unknown calibrator name or a non-numeric version.
    """
    if algorithm not in TRT_ALGORITHMS:
        raise CalibrationError(f"unknown calibrator {algorithm!r}; choose one of {', '.join(TRT_ALGORITHMS)}")
    lines = [f"TRT-{_check_version(version)}-{algorithm}"]
    for name, a in amax.items():
        name = str(name)
        if not name or "\n" in name or "\r" in name:
            raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT cache (empty or line break)")
        a = float(a)
        scale = float(np.float32(a / 127.0)) if math.isfinite(a) else a
        if not (math.isfinite(a) and a > 0 and math.isfinite(scale) and scale > 0):
            raise CalibrationError(f"tensor {name!r}: amax must be finite and > 0 (and fit float32), got {a!r}")
        lines.append(f"{name}: {float32_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_trt_cache(amax, path: str | os.PathLike, *, names=None, prototxt=None,
                    version: str | int = DEFAULT_TRT_VERSION, algorithm: str = "EntropyCalibration2") -> Path:
    """Write a TensorRT calibration cache, atomically.

    Args:
        amax: ``tensor -> amax`` (the scale written is ``amax / 127`` rounded to float32),
            or a :class:`~torch_nvdla.CalibrationTable`: its taps, or with ``names`` its
            NVDLA layer names after the NVDLA rules (:func:`~torch_nvdla.nvdla.calibjson.nvdla_ranges`).
        path: the cache file.
        names: with a table: :class:`~torch_nvdla.nvdla.naming.NvdlaNames`, a mapping or a
            callable of names.
        prototxt: the deploy prototxt TensorRT will parse: NVDLA layer names are written
            as TensorRT's tensor names (:func:`trt_tensor_names`: ``conv1_relu`` ->
            ``conv1``, an earlier in-place writer -> ``(Unnamed Layer* N) [Type]_output``);
            names not in it are written unchanged.
        version: the TensorRT version in the header (``8601`` = 8.6.1, ``7000`` = 7.0).
        algorithm: the calibrator in the header.

    Returns:
        The path written.
    """
    from ..calib.table import CalibrationTable

    if isinstance(amax, CalibrationTable):
        if names is not None:
            from .calibjson import nvdla_ranges

            amax = nvdla_ranges(amax, names).amax
        else:
            amax = amax.amaxes()
    elif names is not None:
        raise CalibrationError("names apply to a CalibrationTable; pass a mapping already keyed by tensor name")
    if prototxt is not None:
        rename = trt_tensor_names(prototxt)
        amax = {rename.get(k, k): v for k, v in dict(amax).items()}
    return atomic_write_text(path, trt_cache_text(amax, version=version, algorithm=algorithm))


@dataclass(frozen=True)
class TrtCache:
    """A TensorRT calibration cache as read.

    Attributes:
        path: the file.
        version: header version digits (``"7000"``).
        algorithm: header calibrator (``"EntropyCalibration2"``).
        scales: tensor name -> scale (float32 value), file order.
        lines: tensor name -> 1-based line.
    """

    path: Path
    version: str
    algorithm: str
    scales: dict[str, float]
    lines: dict[str, int]

    def amax(self) -> dict[str, float]:
        """Tensor name -> ``127 * scale``."""
        return {k: 127.0 * v for k, v in self.scales.items()}


def read_trt_cache(path: str | os.PathLike) -> TrtCache:
    """Read a TensorRT calibration cache.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: naming the file and line: not UTF-8, empty, a header that is not
            ``TRT-<digits>-<known calibrator>`` (a foreign file), a line without
            ``name: hex``, hex that is not 1-8 digits, a NaN / Inf bit pattern, a
            duplicate tensor name.
    """
    path = Path(path)
    text = read_text(path, "TensorRT calibration cache")
    # Newlines only: str.splitlines would also split on \x0c, \u2028... and shift names and lines.
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if not lines or not lines[0].strip():
        raise FileFormatError(path, "empty: expected a 'TRT-<version>-<calibrator>' header", line=1)
    header = lines[0].strip().lstrip("\ufeff")
    m = _HEADER.fullmatch(header)
    if m is None or m.group(2) not in TRT_ALGORITHMS:
        raise FileFormatError(path, f"not a TensorRT calibration cache: header {header[:60]!r} is not "
                                    f"'TRT-<version>-<{'|'.join(TRT_ALGORITHMS)}>'", line=1)
    scales: dict[str, float] = {}
    where: dict[str, int] = {}
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, hexpart = line.rstrip().rpartition(": ")
        if not sep or not name:
            raise FileFormatError(path, f"expected '<tensor>: <hex>', got {line[:80]!r}", line=i)
        try:
            scale = hex_float32(hexpart.strip())
        except ValueError:
            raise FileFormatError(path, f"tensor {name!r}: malformed hex {hexpart.strip()[:20]!r} "
                                        "(expected the 1-8 digit float32 bit pattern of the scale)", line=i) from None
        if not math.isfinite(scale):
            raise FileFormatError(path, f"tensor {name!r}: hex {hexpart.strip()} is {scale!r}, not a finite float32", line=i)
        if name in scales:
            raise FileFormatError(path, f"tensor {name!r} appears twice (first on line {where[name]})", line=i)
        scales[name] = scale
        where[name] = i
    return TrtCache(path, m.group(1), m.group(2), scales, where)


# ------------------------------------------------------------------------------------------
# TensorRT names <-> Caffe layers
# ------------------------------------------------------------------------------------------


def caffe_trt_names(net) -> tuple[dict[str, str], dict[int, tuple[str, str]]]:
    """How TensorRT's Caffe parser names each layer's output tensor.

    Args:
        net: a parsed prototxt (:func:`torch_nvdla.caffe.prototxt.parse_prototxt`) or a path.

    Returns:
        ``(named, unnamed)``: ``named`` maps a TensorRT tensor name (a blob) to the
        NVDLA layer whose output it is -- the blob's **last** writer (legacy inputs map to
        themselves); ``unnamed`` maps a TensorRT layer index ``N`` to
        ``(layer name, Caffe type)`` for every **earlier** writer of an in-place blob,
        whose tensor TensorRT calls ``(Unnamed Layer* N) [Type]_output``. ``N`` assumes
        one TensorRT layer per Caffe layer, data layers excluded (what the Caffe parser
        does for the layers NVDLA supports); :func:`convert_trt_cache` also checks
        ``[Type]`` against the Caffe type before trusting it.
    """
    if isinstance(net, (str, os.PathLike)):
        from ..caffe.prototxt import parse_prototxt

        net = parse_prototxt(Path(net))
    writers: dict[str, list[str]] = {}
    for blob in getattr(net, "declared_inputs", {}) or {}:
        writers[blob] = [blob]
    index: dict[str, int] = {}
    types: dict[str, str] = {}
    n = 0
    for layer in net.layers:
        types[layer.name] = layer.type
        if layer.type not in _NOT_TRT_LAYERS:
            index[layer.name] = n
            n += 1
        for top in layer.tops:
            writers.setdefault(top, []).append(layer.name)
    named = {blob: ws[-1] for blob, ws in writers.items()}
    unnamed = {}
    for ws in writers.values():
        for w in ws[:-1]:
            if w in index:
                unnamed[index[w]] = (w, types.get(w, ""))
    return named, unnamed


#: The ``[Type]`` TensorRT prints for a Caffe layer type (first of :data:`_TRT_TYPES`).
_TRT_TYPE_NAME = {
    "Convolution": "Convolution", "Deconvolution": "Deconvolution", "InnerProduct": "Fully Connected",
    "ReLU": "Activation", "Sigmoid": "Activation", "TanH": "Activation", "ELU": "Activation",
    "BatchNorm": "Scale", "Scale": "Scale", "Power": "Scale", "Pooling": "Pooling", "Eltwise": "ElementWise",
    "Concat": "Concatenation", "Softmax": "Softmax", "LRN": "LRN",
}  # fmt: skip


def trt_tensor_names(net) -> dict[str, str]:
    """NVDLA layer -> the name TensorRT's Caffe parser gives its output tensor.

    The inverse of :func:`caffe_trt_names`: a blob's last writer gets the blob name, an
    earlier in-place writer ``(Unnamed Layer* N) [Type]_output``.
    """
    if isinstance(net, (str, os.PathLike)):
        from ..caffe.prototxt import parse_prototxt

        net = parse_prototxt(Path(net))
    named, unnamed = caffe_trt_names(net)
    out = {layer: blob for blob, layer in named.items()}
    for idx, (layer, ctype) in unnamed.items():
        out[layer] = f"(Unnamed Layer* {idx}) [{_TRT_TYPE_NAME.get(ctype, ctype)}]_output"
    return out


def read_name_map(path: str | os.PathLike) -> dict[str, str | None]:
    """A name map file: a JSON object ``{"<TensorRT name>": "<NVDLA name>" | null}``.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not JSON, not an object, or a value that is not a string / null
            (names the key).
    """
    path = Path(path)
    obj = read_json(path, "name map")
    if not isinstance(obj, dict):
        raise FileFormatError(path, f"a name map is a JSON object {{\"trt name\": \"nvdla name\"}}, got {type(obj).__name__}")
    for k, v in obj.items():
        if v is not None and (not isinstance(v, str) or not v):
            raise FileFormatError(path, f"key {k!r}: value must be a layer name or null, got {v!r}")
    return obj


@dataclass(frozen=True)
class TrtConversion:
    """A TensorRT cache converted to NVDLA names.

    Attributes:
        scales: NVDLA layer -> scale, prototxt order (cache order without a prototxt).
        placed: TensorRT name -> NVDLA layer it was written as.
        unplaced: TensorRT name -> why it could not be placed (not written).
        missing: prototxt layers left without an entry.
        filled: NVDLA layer -> the layer whose scale it was given (in-place writers
            TensorRT did not name take their blob's final scale).
        findings: all of it as :class:`~torch_nvdla.nvdla.calibjson.Finding` s (rules included).
        cache: the cache read.
    """

    scales: dict[str, float]
    placed: dict[str, str]
    unplaced: dict[str, str]
    missing: tuple[str, ...]
    filled: dict[str, str]
    findings: list = field(default_factory=list)
    cache: TrtCache | None = None


def convert_trt_cache(cache: TrtCache | str | os.PathLike, *, names: Mapping[str, str | None] | None = None,
                      prototxt=None, fill_inplace: bool = True) -> TrtConversion:
    """Rename a TensorRT cache's tensors to NVDLA layers.

    Placement, first match wins: the user map ``names`` (``None`` drops a tensor on
    purpose); with a ``prototxt``, a blob name -> its last writer and
    ``(Unnamed Layer* N) [Type]_output`` -> the in-place writer with TensorRT index
    ``N`` when ``Type`` fits its Caffe type (:func:`caffe_trt_names`); without one, a name
    is kept as is unless it is an ``(Unnamed Layer* ...)``. With a prototxt, in-place
    writers still without a scale take their blob's final scale (``fill_inplace``), and
    the NVDLA rules are applied (a pool takes its producer's scale) and reported.

    Raises:
        FileFormatError: a zero or negative scale (naming the cache line), or a cache /
            prototxt that cannot be read.
    """
    from .calibjson import Finding

    if not isinstance(cache, TrtCache):
        cache = read_trt_cache(cache)
    names = dict(names or {})
    net = None
    named: dict[str, str] = {}
    unnamed: dict[int, tuple[str, str]] = {}
    if prototxt is not None:
        from ..caffe.prototxt import parse_prototxt

        net = prototxt if hasattr(prototxt, "layers") else parse_prototxt(Path(prototxt))
        named, unnamed = caffe_trt_names(net)
    scales, placed, unplaced, findings = _place_all(cache, names, net, named, unnamed)
    filled: dict[str, str] = {}
    missing: tuple[str, ...] = ()
    if net is None and not names:
        findings.append(Finding("info", "no-prototxt", "",
                                "names kept as TensorRT wrote them: an in-place blob carries its LAST writer's range "
                                "(LeNet's 'ip1' is relu1's output); pass the prototxt or a name map to rename"))
    if net is not None:
        scales, filled, missing = _against_prototxt(net, named, scales, fill_inplace, findings)
    return TrtConversion(scales, placed, unplaced, missing, filled, findings, cache)


def _place(trt: str, names: Mapping[str, str | None], net, named: Mapping[str, str],
           unnamed: Mapping[int, tuple[str, str]]) -> tuple[str | None, str | None]:
    """The NVDLA layer a TensorRT tensor goes to, or ``(None, why not)``."""
    if trt in names:
        target = names[trt]
        return (None, "dropped by the name map") if target is None else (target, None)
    if net is None:
        if _UNNAMED.fullmatch(trt):
            return None, "an unnamed TensorRT tensor: give a name map or a prototxt to place it"
        return trt, None
    target = named.get(trt)
    if target is not None:
        return target, None
    m = _UNNAMED.fullmatch(trt)
    if not m:
        return None, "matches no blob of the prototxt; add it to the name map"
    idx, ttype = int(m.group(1)), m.group(2)
    cand = unnamed.get(idx)
    if cand is None:
        return None, f"TensorRT layer {idx} is no in-place writer of the prototxt; add it to the name map"
    allowed = _TRT_TYPES.get(cand[1])
    if allowed is not None and ttype not in allowed:
        return None, (f"TensorRT layer {idx} is [{ttype}] but prototxt layer {cand[0]!r} is a {cand[1]}; "
                      "add it to the name map")
    return cand[0], None


def _place_all(cache: TrtCache, names, net, named, unnamed):
    """Every cache tensor placed (first match wins; a layer takes one scale): the scales by
    layer, TensorRT name -> layer, TensorRT name -> why not placed, and the findings."""
    from .calibjson import Finding

    scales: dict[str, float] = {}
    placed: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    findings: list = []
    for trt, scale in cache.scales.items():
        line = cache.lines.get(trt)
        if not scale > 0:
            raise FileFormatError(cache.path, f"tensor {trt!r}: scale {scale!r} is not > 0 (the NVDLA compiler fails "
                                              "on it)", line=line)
        target, why = _place(trt, names, net, named, unnamed)
        if target is not None and target in scales:
            why = f"{target!r} already has a scale (from {next(k for k, v in placed.items() if v == target)!r})"
        if why is not None:
            unplaced[trt] = why
            continue
        scales[target] = scale
        placed[trt] = target
        if target != trt:
            findings.append(Finding("info", "renamed", target, f"from TensorRT {trt!r}", f"{cache.path}:{line}", line))
    for trt, why in unplaced.items():
        line = cache.lines.get(trt)
        findings.append(Finding("warning", "unplaced", trt, f"not written: {why}", f"{cache.path}:{line}", line))
    return scales, placed, unplaced, findings


def _against_prototxt(net, last_writer: Mapping[str, str], scales: dict[str, float], fill_inplace: bool,
                      findings: list) -> tuple[dict[str, float], dict[str, str], tuple[str, ...]]:
    """Scales in prototxt order: in-place writers filled from their blob's final range
    (``fill_inplace``), unknown keys and missing layers reported, the NVDLA rules applied."""
    from .calibjson import Finding, apply_nvdla_rules, layers_from_prototxt

    layers, _ = layers_from_prototxt(net)
    filled: dict[str, str] = {}
    if fill_inplace:
        tops = {layer.name: list(layer.tops) for layer in net.layers}
        for layer in layers:
            if layer.name in scales:
                continue
            for blob in tops.get(layer.name, []):
                src = last_writer.get(blob)
                if src is not None and src != layer.name and src in scales:
                    scales[layer.name] = scales[src]
                    filled[layer.name] = src
                    findings.append(Finding("warning", "filled", layer.name,
                                            f"no TensorRT tensor for this in-place writer of blob {blob!r}: "
                                            f"given {src}'s scale (the blob's final range)"))
                    break
    order = [layer.name for layer in layers]
    known = set(order)
    extra = [k for k in scales if k not in known]
    for k in extra:
        findings.append(Finding("warning", "unknown-key", k, "matches no layer of the prototxt (written; the compiler "
                                                              "ignores it)"))
    scales = {**{k: scales[k] for k in order if k in scales}, **{k: scales[k] for k in extra}}
    missing = tuple(k for k in order if k not in scales)
    for k in missing:
        findings.append(Finding("error", "missing", k, "no scale for this layer: the compiler aborts on a missing key"))
    fixed, rule_findings, _ = apply_nvdla_rules(layers, {k: v for k, v in scales.items() if k in known}, fix=True)
    scales.update(fixed)
    findings.extend(rule_findings)
    return scales, filled, missing


def trt_cache_to_calib_json(cache: TrtCache | str | os.PathLike, out: str | os.PathLike, *,
                            names: Mapping[str, str | None] | None = None, prototxt=None,
                            fill_inplace: bool = True, allow_missing: bool = False) -> TrtConversion:
    """Convert a TensorRT cache to an NVDLA calib.json (what ``calib_txt_to_json.py`` does, renamed).

    Raises:
        CalibrationError: prototxt layers without a scale (the compiler would abort),
            unless ``allow_missing``; nothing is written then.
        FileFormatError: a bad cache / prototxt / scale.
    """
    from .calibjson import calib_json_object

    conv = convert_trt_cache(cache, names=names, prototxt=prototxt, fill_inplace=fill_inplace)
    if conv.missing and not allow_missing:
        shown = ", ".join(conv.missing[:10]) + (" ..." if len(conv.missing) > 10 else "")
        raise CalibrationError(
            f"{len(conv.missing)} prototxt layer(s) get no scale from the cache: {shown}; "
            "map them with --names (TensorRT name -> layer) or pass --allow-missing"
        )
    if not conv.scales:
        raise CalibrationError(f"no tensor of {conv.cache.path} could be placed; give a name map or a prototxt")
    atomic_write_json(out, calib_json_object(conv.scales))
    return conv
