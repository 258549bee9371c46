"""Caffe ``.caffemodel`` files: the binary ``NetParameter``, read and written by hand.

Design notes and the facts behind them: ``docs/caffe.md``.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from ..errors import FileFormatError
from ..utils.io import atomic_write_bytes, read_bytes
from .prototxt import (
    V1_LAYER_TYPES,
    CaffeLayer,
    CaffeNet,
    EnumValue,
    Field,
    Message,
    _short_float32,
)

__all__ = [
    "CaffeModel",
    "MESSAGE_TYPES",
    "decode_caffemodel",
    "decode_message",
    "decode_varint",
    "encode_caffemodel",
    "encode_message",
    "encode_varint",
    "read_caffemodel",
    "write_caffemodel",
]

# ---------------------------------------------------------------------------------
# schema: the caffe.proto subset, checked against upstream BVLC caffe.proto

_ENUMS: dict[str, dict[str, int]] = {
    "Phase": {"TRAIN": 0, "TEST": 1},
    "DimCheckMode": {"STRICT": 0, "PERMISSIVE": 1},
    "VarianceNorm": {"FAN_IN": 0, "FAN_OUT": 1, "AVERAGE": 2},
    "Engine": {"DEFAULT": 0, "CAFFE": 1, "CUDNN": 2},
    "PoolMethod": {"MAX": 0, "AVE": 1, "STOCHASTIC": 2},
    "RoundMode": {"CEIL": 0, "FLOOR": 1},
    "EltwiseOp": {"PROD": 0, "SUM": 1, "MAX": 2},
    "NormRegion": {"ACROSS_CHANNELS": 0, "WITHIN_CHANNEL": 1},
    "ReductionOp": {"SUM": 1, "ASUM": 2, "SUMSQ": 3, "MEAN": 4},
    "NormalizationMode": {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3},
    "DB": {"LEVELDB": 0, "LMDB": 1},
    "LayerType": {name: number for name, (number, _) in V1_LAYER_TYPES.items()},
}
_ENUM_NAMES = {enum: {v: k for k, v in values.items()} for enum, values in _ENUMS.items()}

# One message per unindented line, then one field per indented line:
# ``name number kind [repeated] [packed]``; kind is a scalar type, ``enum:Name`` or a
# message type. ``BlobProto`` is decoded to / encoded from numpy arrays.
_SCHEMA_TEXT = """
NetParameter
  name 1 string
  input 3 string repeated
  input_shape 8 BlobShape repeated
  input_dim 4 int32 repeated
  force_backward 5 bool
  state 6 NetState
  debug_info 7 bool
  layer 100 LayerParameter repeated
  layers 2 V1LayerParameter repeated
BlobShape
  dim 1 int64 repeated packed
NetState
  phase 1 enum:Phase
  level 2 int32
  stage 3 string repeated
NetStateRule
  phase 1 enum:Phase
  min_level 2 int32
  max_level 3 int32
  stage 4 string repeated
  not_stage 5 string repeated
ParamSpec
  name 1 string
  share_mode 2 enum:DimCheckMode
  lr_mult 3 float
  decay_mult 4 float
FillerParameter
  type 1 string
  value 2 float
  min 3 float
  max 4 float
  mean 5 float
  std 6 float
  sparse 7 int32
  variance_norm 8 enum:VarianceNorm
LayerParameter
  name 1 string
  type 2 string
  bottom 3 string repeated
  top 4 string repeated
  phase 10 enum:Phase
  loss_weight 5 float repeated
  param 6 ParamSpec repeated
  blobs 7 BlobProto repeated
  propagate_down 11 bool repeated
  include 8 NetStateRule repeated
  exclude 9 NetStateRule repeated
  transform_param 100 TransformationParameter
  loss_param 101 LossParameter
  accuracy_param 102 AccuracyParameter
  argmax_param 103 ArgMaxParameter
  concat_param 104 ConcatParameter
  convolution_param 106 ConvolutionParameter
  data_param 107 DataParameter
  dropout_param 108 DropoutParameter
  eltwise_param 110 EltwiseParameter
  exp_param 111 ExpParameter
  inner_product_param 117 InnerProductParameter
  lrn_param 118 LRNParameter
  mvn_param 120 MVNParameter
  pooling_param 121 PoolingParameter
  power_param 122 PowerParameter
  relu_param 123 ReLUParameter
  sigmoid_param 124 SigmoidParameter
  softmax_param 125 SoftmaxParameter
  slice_param 126 SliceParameter
  tanh_param 127 TanHParameter
  threshold_param 128 ThresholdParameter
  python_param 130 PythonParameter
  prelu_param 131 PReLUParameter
  reshape_param 133 ReshapeParameter
  log_param 134 LogParameter
  flatten_param 135 FlattenParameter
  reduction_param 136 ReductionParameter
  embed_param 137 EmbedParameter
  tile_param 138 TileParameter
  batch_norm_param 139 BatchNormParameter
  elu_param 140 ELUParameter
  bias_param 141 BiasParameter
  scale_param 142 ScaleParameter
  input_param 143 InputParameter
  crop_param 144 CropParameter
  parameter_param 145 ParameterParameter
  swish_param 147 SwishParameter
  clip_param 148 ClipParameter
V1LayerParameter
  layer 1 V0LayerParameter
  bottom 2 string repeated
  top 3 string repeated
  name 4 string
  type 5 enum:LayerType
  blobs 6 BlobProto repeated
  blobs_lr 7 float repeated
  weight_decay 8 float repeated
  concat_param 9 ConcatParameter
  convolution_param 10 ConvolutionParameter
  data_param 11 DataParameter
  dropout_param 12 DropoutParameter
  inner_product_param 17 InnerProductParameter
  lrn_param 18 LRNParameter
  pooling_param 19 PoolingParameter
  power_param 21 PowerParameter
  argmax_param 23 ArgMaxParameter
  eltwise_param 24 EltwiseParameter
  threshold_param 25 ThresholdParameter
  accuracy_param 27 AccuracyParameter
  relu_param 30 ReLUParameter
  slice_param 31 SliceParameter
  include 32 NetStateRule repeated
  exclude 33 NetStateRule repeated
  mvn_param 34 MVNParameter
  loss_weight 35 float repeated
  transform_param 36 TransformationParameter
  tanh_param 37 TanHParameter
  sigmoid_param 38 SigmoidParameter
  softmax_param 39 SoftmaxParameter
  exp_param 41 ExpParameter
  loss_param 42 LossParameter
  param 1001 string repeated
  blob_share_mode 1002 enum:DimCheckMode repeated
V0LayerParameter
TransformationParameter
  scale 1 float
  mirror 2 bool
  crop_size 3 uint32
  mean_file 4 string
  mean_value 5 float repeated
  force_color 6 bool
  force_gray 7 bool
LossParameter
  ignore_label 1 int32
  normalize 2 bool
  normalization 3 enum:NormalizationMode
AccuracyParameter
  top_k 1 uint32
  axis 2 int32
  ignore_label 3 int32
ArgMaxParameter
  out_max_val 1 bool
  top_k 2 uint32
  axis 3 int32
BatchNormParameter
  use_global_stats 1 bool
  moving_average_fraction 2 float
  eps 3 float
BiasParameter
  axis 1 int32
  num_axes 2 int32
  filler 3 FillerParameter
ClipParameter
  min 1 float
  max 2 float
ConcatParameter
  concat_dim 1 uint32
  axis 2 int32
ConvolutionParameter
  num_output 1 uint32
  bias_term 2 bool
  pad 3 uint32 repeated
  kernel_size 4 uint32 repeated
  group 5 uint32
  stride 6 uint32 repeated
  weight_filler 7 FillerParameter
  bias_filler 8 FillerParameter
  pad_h 9 uint32
  pad_w 10 uint32
  kernel_h 11 uint32
  kernel_w 12 uint32
  stride_h 13 uint32
  stride_w 14 uint32
  engine 15 enum:Engine
  axis 16 int32
  force_nd_im2col 17 bool
  dilation 18 uint32 repeated
CropParameter
  axis 1 int32
  offset 2 uint32 repeated
DataParameter
  source 1 string
  scale 2 float
  mean_file 3 string
  batch_size 4 uint32
  crop_size 5 uint32
  mirror 6 bool
  rand_skip 7 uint32
  backend 8 enum:DB
  force_encoded_color 9 bool
  prefetch 10 uint32
DropoutParameter
  dropout_ratio 1 float
EltwiseParameter
  operation 1 enum:EltwiseOp
  coeff 2 float repeated
  stable_prod_grad 3 bool
ELUParameter
  alpha 1 float
EmbedParameter
  num_output 1 uint32
  input_dim 2 uint32
  bias_term 3 bool
  weight_filler 4 FillerParameter
  bias_filler 5 FillerParameter
ExpParameter
  base 1 float
  scale 2 float
  shift 3 float
FlattenParameter
  axis 1 int32
  end_axis 2 int32
InnerProductParameter
  num_output 1 uint32
  bias_term 2 bool
  weight_filler 3 FillerParameter
  bias_filler 4 FillerParameter
  axis 5 int32
  transpose 6 bool
InputParameter
  shape 1 BlobShape repeated
LogParameter
  base 1 float
  scale 2 float
  shift 3 float
LRNParameter
  local_size 1 uint32
  alpha 2 float
  beta 3 float
  norm_region 4 enum:NormRegion
  k 5 float
  engine 6 enum:Engine
MVNParameter
  normalize_variance 1 bool
  across_channels 2 bool
  eps 3 float
ParameterParameter
  shape 1 BlobShape
PoolingParameter
  pool 1 enum:PoolMethod
  kernel_size 2 uint32
  stride 3 uint32
  pad 4 uint32
  kernel_h 5 uint32
  kernel_w 6 uint32
  stride_h 7 uint32
  stride_w 8 uint32
  pad_h 9 uint32
  pad_w 10 uint32
  engine 11 enum:Engine
  global_pooling 12 bool
  round_mode 13 enum:RoundMode
PowerParameter
  power 1 float
  scale 2 float
  shift 3 float
PReLUParameter
  filler 1 FillerParameter
  channel_shared 2 bool
PythonParameter
  module 1 string
  layer 2 string
  param_str 3 string
  share_in_parallel 4 bool
ReductionParameter
  operation 1 enum:ReductionOp
  axis 2 int32
  coeff 3 float
ReLUParameter
  negative_slope 1 float
  engine 2 enum:Engine
ReshapeParameter
  shape 1 BlobShape
  axis 2 int32
  num_axes 3 int32
ScaleParameter
  axis 1 int32
  num_axes 2 int32
  filler 3 FillerParameter
  bias_term 4 bool
  bias_filler 5 FillerParameter
SigmoidParameter
  engine 1 enum:Engine
SliceParameter
  slice_dim 1 uint32
  slice_point 2 uint32 repeated
  axis 3 int32
SoftmaxParameter
  engine 1 enum:Engine
  axis 2 int32
SwishParameter
  beta 1 float
TanHParameter
  engine 1 enum:Engine
ThresholdParameter
  threshold 1 float
TileParameter
  axis 1 int32
  tiles 2 int32
"""

_VARINT_KINDS = frozenset({"bool", "int32", "int64", "uint32", "uint64", "enum"})
_SCALAR_KINDS = _VARINT_KINDS | {"float", "double", "string"}


class _Spec(NamedTuple):
    name: str
    number: int
    kind: str  # a scalar kind, "enum", "message" or "blob"
    ref: str  # enum name, message type, or ""
    repeated: bool
    packed: bool


def _build_schema(text: str) -> dict[str, dict[str, _Spec]]:
    schema: dict[str, dict[str, _Spec]] = {}
    current: dict[str, _Spec] | None = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if not raw.startswith(" "):
            current = schema.setdefault(raw.strip(), {})
            continue
        name, number, kind, *flags = raw.split()
        ref = ""
        if kind.startswith("enum:"):
            kind, ref = "enum", kind[5:]
        elif kind == "BlobProto":
            kind, ref = "blob", "BlobProto"
        elif kind not in _SCALAR_KINDS:
            kind, ref = "message", kind
        assert current is not None
        current[name] = _Spec(name, int(number), kind, ref, "repeated" in flags, "packed" in flags)
    for fields in schema.values():  # every reference resolves
        for spec in fields.values():
            assert spec.kind != "message" or spec.ref in schema, spec
            assert spec.kind != "enum" or spec.ref in _ENUMS, spec
    return schema


_SCHEMA = _build_schema(_SCHEMA_TEXT)
_BY_NUMBER = {m: {s.number: s for s in fields.values()} for m, fields in _SCHEMA.items()}

#: The message types this module can encode and decode (``caffe.proto`` names).
MESSAGE_TYPES: tuple[str, ...] = tuple(sorted(_SCHEMA))

_WIRE_NAMES = {
    0: "varint",
    1: "64-bit",
    2: "length-delimited",
    3: "start-group",
    4: "end-group",
    5: "32-bit",
}
_U64 = (1 << 64) - 1

# ---------------------------------------------------------------------------------
# wire primitives


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of ``value``.

    Negative values (int32/int64 fields) are written as their 64-bit two's
    complement, 10 bytes long, as protobuf does.

    Raises:
        ValueError: ``value`` is outside ``[-2**63, 2**64)``.
    """
    value = int(value)
    if value < 0:
        if value < -(1 << 63):
            raise ValueError(f"varint value {value} is below -2**63")
        value &= _U64
    elif value > _U64:
        raise ValueError(f"varint value {value} does not fit in 64 bits")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int, path: str) -> tuple[int, int]:
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise FileFormatError(path, f"truncated varint at byte offset {start}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise FileFormatError(path, f"varint longer than 10 bytes at byte offset {start}")


def decode_varint(data: bytes, pos: int = 0, path: str = "<bytes>") -> tuple[int, int]:
    """Read one varint from ``data[pos:]``; returns ``(unsigned value, next position)``.

    Raises:
        FileFormatError: the varint runs past the end or is longer than 10 bytes.
    """
    return _read_varint(bytes(data), pos, len(data), path)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


class _Raw(NamedTuple):
    number: int
    wire_type: int
    value: int  # the varint for type 0, else the payload start
    end: int  # the payload end (== value for type 0)
    at: int  # byte offset of the key


def _skip_group(buf: bytes, pos: int, end: int, number: int, path: str, at: int) -> int:
    """Skip a (deprecated) group whose start key for ``number`` was read; returns the end."""
    open_groups = [number]
    while open_groups:
        if pos >= end:
            raise FileFormatError(path, f"group started at byte offset {at} is never closed")
        key_at = pos
        key, pos = _read_varint(buf, pos, end, path)
        inner, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos, end, path)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise FileFormatError(
                    path, f"field at byte offset {key_at} runs past the end of its data"
                )
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end, path)
            if length > end - pos:
                raise FileFormatError(
                    path, f"field at byte offset {key_at} runs past the end of its data"
                )
            pos += length
        elif wire == 3:
            open_groups.append(inner)
        elif wire == 4:
            if inner != open_groups.pop():
                raise FileFormatError(path, f"mismatched end-group tag at byte offset {key_at}")
        else:
            raise FileFormatError(path, f"invalid wire type {wire} at byte offset {key_at}")
    return pos


def _iter_fields(buf: bytes, start: int, end: int, path: str) -> Iterator[_Raw]:
    """Yield every field of the message in ``buf[start:end]``; groups are skipped."""
    pos = start
    while pos < end:
        at = pos
        key, pos = _read_varint(buf, pos, end, path)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise FileFormatError(path, f"invalid field number 0 at byte offset {at}")
        if wire == 0:
            value, pos = _read_varint(buf, pos, end, path)
            yield _Raw(number, 0, value, value, at)
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end, path)
            if length > end - pos:
                raise FileFormatError(
                    path,
                    f"field {number} at byte offset {at} declares {length} bytes but only "
                    f"{end - pos} remain (file truncated or corrupt)",
                )
            yield _Raw(number, 2, pos, pos + length, at)
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if size > end - pos:
                raise FileFormatError(
                    path,
                    f"{size * 8}-bit field {number} at byte offset {at} runs past the end (file truncated)",
                )
            yield _Raw(number, wire, pos, pos + size, at)
            pos += size
        elif wire == 3:
            pos = _skip_group(buf, pos, end, number, path, at)
        elif wire == 4:
            raise FileFormatError(path, f"unexpected end-group tag at byte offset {at}")
        else:
            raise FileFormatError(path, f"invalid wire type {wire} at byte offset {at}")


def _unpack_varints(buf: bytes, start: int, end: int, path: str) -> list[int]:
    values = []
    pos = start
    while pos < end:
        value, pos = _read_varint(buf, pos, end, path)
        values.append(value)
    return values


# ---------------------------------------------------------------------------------
# decoding


def _wire_error(path: str, mtype: str, spec: _Spec, raw: _Raw, expected: str) -> FileFormatError:
    return FileFormatError(
        path,
        f"{mtype}.{spec.name} (field {spec.number}) at byte offset {raw.at} has wire type "
        f"{_WIRE_NAMES.get(raw.wire_type, raw.wire_type)}, expected {expected}",
    )


def _varint_value(spec: _Spec, raw_value: int) -> Any:
    kind = spec.kind
    if kind == "bool":
        return raw_value != 0
    if kind == "uint32":
        return raw_value & 0xFFFFFFFF
    if kind == "uint64":
        return raw_value
    if kind == "int64":
        return _signed64(raw_value)
    value = _signed32(raw_value)  # int32 and enum
    if kind == "enum":
        name = _ENUM_NAMES[spec.ref].get(value)
        return EnumValue(name) if name is not None else value
    return value


def _put(msg: Message, spec: _Spec, value: Any) -> None:
    """Store a decoded scalar: repeated fields append, a singular field's last value wins."""
    if not spec.repeated:
        for k, f in enumerate(msg._fields):
            if f.name == spec.name:
                msg._fields[k] = Field(spec.name, value, None)
                return
    msg._fields.append(Field(spec.name, value, None))


def _decode_field(msg: Message, buf: bytes, raw: _Raw, mtype: str, spec: _Spec, path: str) -> None:
    """Decode one raw field of ``mtype`` into ``msg`` (scalars, packed runs, messages).

    Follows protobuf's merge rules: a singular scalar seen twice keeps the last
    value, a singular message seen twice is merged into the first.
    """
    kind, wire = spec.kind, raw.wire_type
    if kind in _VARINT_KINDS:
        if wire == 0:
            _put(msg, spec, _varint_value(spec, raw.value))
        elif wire == 2 and spec.repeated:
            for v in _unpack_varints(buf, raw.value, raw.end, path):
                _put(msg, spec, _varint_value(spec, v))
        else:
            raise _wire_error(path, mtype, spec, raw, "varint")
    elif kind in ("float", "double"):
        fixed, fmt, size = (5, "<f", 4) if kind == "float" else (1, "<d", 8)
        if wire == fixed:
            values = [struct.unpack_from(fmt, buf, raw.value)[0]]
        elif wire == 2 and spec.repeated:
            if (raw.end - raw.value) % size:
                raise FileFormatError(
                    path,
                    f"packed {mtype}.{spec.name} at byte offset {raw.at} is not a whole number of {kind}s",
                )
            count = (raw.end - raw.value) // size
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, raw.value))
        else:
            raise _wire_error(path, mtype, spec, raw, f"{size * 8}-bit")
        for v in values:
            _put(msg, spec, _short_float32(v) if kind == "float" else v)
    elif wire != 2:
        raise _wire_error(path, mtype, spec, raw, "length-delimited")
    elif kind == "string":
        try:
            text = buf[raw.value : raw.end].decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(
                path, f"{mtype}.{spec.name} at byte offset {raw.at} is not valid UTF-8"
            ) from None
        _put(msg, spec, text)
    elif kind == "message":
        existing = None if spec.repeated else msg.get(spec.name)
        if isinstance(existing, Message):
            _decode_message(buf, raw.value, raw.end, spec.ref, path, into=existing)
        else:
            msg._fields.append(
                Field(spec.name, _decode_message(buf, raw.value, raw.end, spec.ref, path), None)
            )
    else:  # a blob outside a layer: not part of the subset
        raise FileFormatError(path, f"unexpected blob field in {mtype} at byte offset {raw.at}")


def _decode_message(
    buf: bytes, start: int, end: int, mtype: str, path: str, into: Message | None = None
) -> Message:
    by_number = _BY_NUMBER[mtype]
    msg = Message() if into is None else into
    for raw in _iter_fields(buf, start, end, path):
        spec = by_number.get(raw.number)
        if spec is not None:
            _decode_field(msg, buf, raw, mtype, spec, path)
    return msg


def decode_message(data: bytes, message_type: str, path: str = "<bytes>") -> Message:
    """Decode a serialized ``caffe.proto`` message of type ``message_type``.

    Unknown fields are skipped. ``BlobProto`` fields are not supported here (use
    :func:`decode_caffemodel`).

    Raises:
        KeyError: ``message_type`` is not in :data:`MESSAGE_TYPES`.
        FileFormatError: the bytes are truncated or malformed.
    """
    if message_type not in _SCHEMA:
        raise KeyError(f"unknown message type {message_type!r} (known: {', '.join(MESSAGE_TYPES)})")
    buf = bytes(data)
    return _decode_message(buf, 0, len(buf), message_type, path)


def _decode_blob(buf: bytes, start: int, end: int, path: str, at: int) -> np.ndarray:
    """Decode a ``BlobProto`` into a float32 array of its shape."""
    shape: tuple[int, ...] | None = None
    legacy: dict[int, int] = {}
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    for raw in _iter_fields(buf, start, end, path):
        number, wire = raw.number, raw.wire_type
        if number == 7:  # shape: BlobShape
            if wire != 2:
                raise FileFormatError(
                    path, f"BlobProto.shape at byte offset {raw.at} is not a message"
                )
            dims: list[int] = []
            for inner in _iter_fields(buf, raw.value, raw.end, path):
                if inner.number != 1:
                    continue
                if inner.wire_type == 0:
                    dims.append(_signed64(inner.value))
                elif inner.wire_type == 2:
                    dims.extend(
                        _signed64(v) for v in _unpack_varints(buf, inner.value, inner.end, path)
                    )
                else:
                    raise FileFormatError(
                        path, f"BlobShape.dim at byte offset {inner.at} is not a varint"
                    )
            shape = (shape or ()) + tuple(dims)  # a repeated shape field merges, as protobuf does
        elif number in (5, 8):  # data (float) / double_data
            size, dtype, fixed = (4, "<f4", 5) if number == 5 else (8, "<f8", 1)
            if wire not in (2, fixed):
                raise FileFormatError(
                    path,
                    f"BlobProto {'data' if number == 5 else 'double_data'} at byte offset {raw.at} "
                    f"has wire type {_WIRE_NAMES.get(wire, wire)}",
                )
            if (raw.end - raw.value) % size:
                raise FileFormatError(
                    path,
                    f"BlobProto data at byte offset {raw.at} is not a whole number of {size}-byte values",
                )
            chunk = np.frombuffer(
                buf, dtype=dtype, count=(raw.end - raw.value) // size, offset=raw.value
            )
            (floats if number == 5 else doubles).append(chunk)
        elif number in (1, 2, 3, 4):  # legacy num / channels / height / width
            if wire != 0:
                raise FileFormatError(
                    path, f"BlobProto legacy dimension at byte offset {raw.at} is not a varint"
                )
            legacy[number] = _signed64(raw.value)
        # diff (6), double_diff (9) and unknown fields are skipped
    if floats:
        data = np.concatenate(floats).astype(np.float32)
    elif doubles:
        data = np.concatenate(doubles).astype(np.float32)
    else:
        data = np.zeros(0, dtype=np.float32)
    if shape is None and legacy:
        shape = tuple(legacy.get(k, 0) for k in (1, 2, 3, 4))
    if shape is None:
        shape = (data.size,)
    if len(shape) > _MAX_BLOB_DIMS:
        raise FileFormatError(
            path, f"blob at byte offset {at} has {len(shape)} dimensions (at most {_MAX_BLOB_DIMS})"
        )
    if any(d < 0 for d in shape):
        raise FileFormatError(
            path, f"blob at byte offset {at} has a negative dimension in shape {shape}"
        )
    needed = math.prod(shape)
    if needed != data.size:
        raise FileFormatError(
            path,
            f"blob at byte offset {at}: shape {shape} needs {needed} values but the file holds {data.size}",
        )
    return data.reshape(shape)


#: More dimensions than any Caffe blob has (numpy's own limit is 64).
_MAX_BLOB_DIMS = 32


def _decode_layer(buf: bytes, raw: _Raw, legacy: bool, index: int, path: str) -> CaffeLayer:
    mtype = "V1LayerParameter" if legacy else "LayerParameter"
    by_number = _BY_NUMBER[mtype]
    msg = Message()
    blobs: list[np.ndarray] = []
    try:
        for field in _iter_fields(buf, raw.value, raw.end, path):
            spec = by_number.get(field.number)
            if spec is None:
                continue
            if spec.kind == "blob":
                if field.wire_type != 2:
                    raise _wire_error(path, mtype, spec, field, "length-delimited")
                blobs.append(_decode_blob(buf, field.value, field.end, path, field.at))
            else:
                _decode_field(msg, buf, field, mtype, spec, path)
        return CaffeLayer.from_message(msg, legacy=legacy, path=path, blobs=blobs)
    except FileFormatError as exc:
        name = msg.get("name")
        label = f"layer #{index}" + (f" ({name!r})" if isinstance(name, str) and name else "")
        raise FileFormatError(path, f"{label} at byte offset {raw.at}: {exc.problem}") from None


class CaffeModel(CaffeNet):
    """A net read from a ``.caffemodel``: a :class:`CaffeNet` whose layers carry blobs."""

    def blobs_by_layer(self) -> dict[str, list[np.ndarray]]:
        """Layer name -> its blobs, for every layer that has any, in file order."""
        return {layer.name: layer.blobs for layer in self.layers if layer.blobs}


def _looks_like_text(data: bytes) -> bool:
    head = data[:256]
    printable = all(b in b"\t\n\r" or 0x20 <= b < 0x7F for b in head)
    return printable and (b":" in head or b"{" in head)


def decode_caffemodel(data: bytes, path: str | os.PathLike = "<bytes>") -> CaffeModel:
    """Decode a binary ``NetParameter`` (a ``.caffemodel``).

    Args:
        data: the file's bytes.
        path: the name used in error messages.

    Raises:
        FileFormatError: empty, truncated or garbled bytes (naming the byte
            offset), a net with no layers, or layers that do not decode.
    """
    path = str(path)
    buf = bytes(data)
    if not buf:
        raise FileFormatError(path, "file is empty")
    try:
        header = Message()
        layers: list[CaffeLayer] = []
        kinds: set[str] = set()
        for raw in _iter_fields(buf, 0, len(buf), path):
            spec = _BY_NUMBER["NetParameter"].get(raw.number)
            if spec is None:
                continue
            if spec.name in ("layer", "layers"):
                if raw.wire_type != 2:
                    raise _wire_error(path, "NetParameter", spec, raw, "length-delimited")
                kinds.add(spec.name)
                layers.append(_decode_layer(buf, raw, spec.name == "layers", len(layers), path))
            else:
                _decode_field(header, buf, raw, "NetParameter", spec, path)
        if len(kinds) > 1:
            raise FileFormatError(
                path, "the net mixes new-style 'layer' and legacy 'layers' entries"
            )
        if not layers:
            raise FileFormatError(
                path, "no layers found: not a Caffe model, or the file is cut short"
            )
        model = CaffeModel._from_header(header, layers, path)
    except (ValueError, IndexError, OverflowError, MemoryError) as exc:
        if isinstance(exc, FileFormatError):
            if _looks_like_text(buf):
                raise FileFormatError(
                    path, f"{exc.problem} (this looks like a text prototxt, not a binary caffemodel)"
                ) from None
            raise
        raise FileFormatError(path, f"cannot decode: {exc}") from None
    assert isinstance(model, CaffeModel)
    return model


def read_caffemodel(path: str | os.PathLike) -> CaffeModel:
    """Read a ``.caffemodel`` file (see :func:`decode_caffemodel`).

    Raises:
        FileFormatError: the file is empty, truncated or garbled.
        FileNotFoundError: the file does not exist.
    """
    return decode_caffemodel(read_bytes(path, "caffemodel"), path)


# ---------------------------------------------------------------------------------
# encoding

_INT_RANGES = {
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1),
}


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{where}: expected an integer, got {value!r}")


def _encode_scalar(spec: _Spec, value: Any, where: str) -> bytes:
    """The payload of one scalar value (no key)."""
    kind = spec.kind
    if kind == "string":
        if not isinstance(value, str) or isinstance(value, EnumValue):
            raise ValueError(f"{where}: expected a quoted string, got {value!r}")
        data = value.encode("utf-8")
        return encode_varint(len(data)) + data
    if kind in ("float", "double"):
        if isinstance(value, str) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return struct.pack("<f" if kind == "float" else "<d", float(value))
        except OverflowError:
            raise ValueError(f"{where}: {value!r} does not fit in a float32") from None
    if kind == "bool":
        if isinstance(value, str) or _as_int(value, where) not in (0, 1):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return encode_varint(int(value))
    if kind == "enum":
        if isinstance(value, EnumValue):
            number = _ENUMS[spec.ref].get(str(value))
            if number is None:
                raise ValueError(
                    f"{where}: {str(value)!r} is not a {spec.ref} value (one of {', '.join(_ENUMS[spec.ref])})"
                )
            return encode_varint(number)
        if isinstance(value, str):
            raise ValueError(
                f"{where}: enum values must be EnumValue({value!r}) so prototxts write them unquoted"
            )
        return encode_varint(_signed32(_as_int(value, where)))
    if isinstance(value, str):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    number = _as_int(value, where)
    low, high = _INT_RANGES[kind]
    if not low <= number <= high:
        raise ValueError(f"{where}: {number} is out of range for {kind}")
    return encode_varint(number)


def _encode_records(msg: Message, mtype: str, where: str) -> list[tuple[int, bytes]]:
    """``(field number, encoded field)`` for every field of ``msg``, in message order."""
    specs = _SCHEMA[mtype]
    records: list[tuple[int, bytes]] = []
    packed: dict[str, tuple[int, list[bytes]]] = {}  # name -> (record index, payloads)
    counts: dict[str, int] = {}
    for f in msg._fields:
        counts[f.name] = counts.get(f.name, 0) + 1
    for f in msg._fields:
        spec = specs.get(f.name)
        here = f"{where}.{f.name}" if where else f.name
        if spec is None:
            raise ValueError(
                f"{here}: {mtype} has no field {f.name!r} known to torch_nvdla "
                f"(known: {', '.join(sorted(specs))})"
            )
        if not spec.repeated and counts[f.name] > 1:
            raise ValueError(
                f"{here}: {mtype}.{f.name} is not a repeated field but is given {counts[f.name]} times"
            )
        if spec.kind == "blob":
            raise ValueError(f"{here}: put blobs in CaffeLayer.blobs, not in params")
        if spec.kind == "message":
            if not isinstance(f.value, Message):
                raise ValueError(f"{here}: expected a message, got {f.value!r}")
            body = encode_message(f.value, spec.ref, _where=here)
            records.append((spec.number, _key(spec.number, 2) + encode_varint(len(body)) + body))
            continue
        if isinstance(f.value, Message):
            raise ValueError(f"{here}: expected a {spec.kind}, got a message")
        payload = _encode_scalar(spec, f.value, here)
        if spec.packed:
            if spec.name not in packed:
                packed[spec.name] = (len(records), [])
                records.append((spec.number, b""))  # filled in below
            packed[spec.name][1].append(payload)
            continue
        wire = (
            2
            if spec.kind == "string"
            else 5 if spec.kind == "float" else 1 if spec.kind == "double" else 0
        )
        records.append((spec.number, _key(spec.number, wire) + payload))
    for name, (index, payloads) in packed.items():
        number = specs[name].number
        body = b"".join(payloads)
        records[index] = (number, _key(number, 2) + encode_varint(len(body)) + body)
    return records


def encode_message(
    msg: Message | Mapping[str, Any], message_type: str, *, _where: str = ""
) -> bytes:
    """Serialize ``msg`` as a ``caffe.proto`` message of type ``message_type``.

    Fields are written in field-number order (the order within a repeated field is
    kept). Enum fields take :class:`EnumValue` names (or their numbers).

    Raises:
        KeyError: ``message_type`` is not in :data:`MESSAGE_TYPES`.
        ValueError: a field the type does not have, or a value of the wrong type or
            out of range; the message names the field path.
    """
    if message_type not in _SCHEMA:
        raise KeyError(f"unknown message type {message_type!r} (known: {', '.join(MESSAGE_TYPES)})")
    if not isinstance(msg, Message):
        msg = Message(msg)
    records = _encode_records(msg, message_type, _where)
    records.sort(key=lambda r: r[0])  # stable: repeated values keep their order
    return b"".join(data for _, data in records)


def _encode_blob(array: Any, where: str) -> bytes:
    a = np.asarray(array)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{where}: blob must be numeric, got dtype {a.dtype}")
    data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    dims = b"".join(encode_varint(int(d)) for d in a.shape)
    shape = _key(1, 2) + encode_varint(len(dims)) + dims if a.shape else b""
    return (
        _key(5, 2) + encode_varint(len(data)) + data
        + _key(7, 2) + encode_varint(len(shape)) + shape
    )  # fmt: skip


def _as_layer(obj: Any) -> CaffeLayer:
    if isinstance(obj, CaffeLayer):
        return obj
    get = (
        obj.get
        if isinstance(obj, Mapping)
        else lambda key, default=None: getattr(obj, key, default)
    )
    try:
        return CaffeLayer(
            get("name"), get("type"), get("bottoms", ()) or (), get("tops", ()) or (),
            get("params", None), get("blobs", ()) or (),
        )  # fmt: skip
    except TypeError as exc:
        raise TypeError(f"not a layer (needs name, type, bottoms, tops): {obj!r}: {exc}") from None


def _encode_layer(layer: CaffeLayer) -> bytes:
    where = f"layer {layer.name!r}"
    if not isinstance(layer.name, str) or not isinstance(layer.type, str):
        raise ValueError(f"{where}: name and type must be strings")
    records = _encode_records(layer.to_message(), "LayerParameter", where)
    for k, blob in enumerate(layer.blobs):
        body = _encode_blob(blob, f"{where} blob {k}")
        records.append((7, _key(7, 2) + encode_varint(len(body)) + body))
    records.sort(key=lambda r: r[0])
    return b"".join(data for _, data in records)


def encode_caffemodel(net_name: str, layers: Iterable[Any]) -> bytes:
    """Serialize a ``NetParameter`` holding ``net_name`` and ``layers``.

    Args:
        net_name: the net name.
        layers: :class:`CaffeLayer` objects, or objects/mappings with ``name``,
            ``type``, ``bottoms``, ``tops`` and optional ``params`` (a Message or
            mapping of ``LayerParameter`` fields such as ``convolution_param``) and
            ``blobs`` (arrays, written as float32 with their shapes).

    Raises:
        ValueError: a parameter field unknown to the schema or a mistyped value.
    """
    out = bytearray()
    name = net_name.encode("utf-8")
    out += _key(1, 2) + encode_varint(len(name)) + name
    for obj in layers:
        body = _encode_layer(_as_layer(obj))
        out += _key(100, 2) + encode_varint(len(body)) + body
    return bytes(out)


def write_caffemodel(path: str | os.PathLike, net_name: str, layers: Iterable[Any]) -> Path:
    """Write :func:`encode_caffemodel` of ``net_name`` and ``layers`` to ``path`` atomically.

    Returns:
        The path written.
    """
    return atomic_write_bytes(path, encode_caffemodel(net_name, layers))
