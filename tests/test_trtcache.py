"""TensorRT calibration caches: write, read, round trip, bad files, conversion to NVDLA names."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from torch_nvdla import CalibrationError, CalibrationTable, FileFormatError, TapRange
from torch_nvdla.nvdla.calibjson import read_calib_json
from torch_nvdla.nvdla.naming import caffe_lenet_names
from torch_nvdla.nvdla.trtcache import (
    caffe_trt_names,
    convert_trt_cache,
    float32_hex,
    hex_float32,
    read_name_map,
    read_trt_cache,
    trt_cache_text,
    trt_cache_to_calib_json,
    trt_tensor_names,
    write_trt_cache,
)

LENET = ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]

LENET_PROTOTXT = """name: "LeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: 1 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 20 kernel_size: 5 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 50 kernel_size: 5 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" inner_product_param { num_output: 500 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

# NVDLA table of LeNet (amax) -- pools equal their producers.
AMAX = {"data": 0.99609375, "conv1": 2.48, "pool1": 2.48, "conv2": 11.8, "pool2": 11.8,
        "ip1": 13.2, "relu1": 12.9, "ip2": 26.8, "prob": 1.0}


@pytest.fixture
def lenet_proto(tmp_path):
    path = tmp_path / "lenet.prototxt"
    path.write_text(LENET_PROTOTXT)
    return path


def _f32(x: float) -> float:
    return float(np.float32(x))


def test_hex_is_big_endian_float32_of_the_scale():
    # the first line of TensorRT sampleINT8's LeNet cache
    assert hex_float32("3c008912") == struct.unpack(">f", bytes.fromhex("3c008912"))[0]
    assert hex_float32("3c008912") == pytest.approx(0.0078452, rel=1e-4)
    assert float32_hex(hex_float32("3c008912")) == "3c008912"
    assert float32_hex(1.0) == "3f800000" and hex_float32("3F800000") == 1.0
    assert float32_hex(2.0**-130) == "80000"  # no leading zeros, as TensorRT writes
    with pytest.raises(ValueError):
        hex_float32("123456789")


def test_sample_int8_line_reads(tmp_path):
    path = tmp_path / "sample.cache"
    path.write_text("TRT-7000-EntropyCalibration2\ndata: 3c008912\n")
    cache = read_trt_cache(path)
    assert (cache.version, cache.algorithm) == ("7000", "EntropyCalibration2")
    assert cache.scales == {"data": hex_float32("3c008912")} and cache.lines == {"data": 2}
    assert cache.amax()["data"] == pytest.approx(0.9963, abs=1e-4)


def test_round_trip_table_to_cache_to_calib_json(tmp_path, lenet_proto):
    table = CalibrationTable({k: TapRange(k, v, "entropy") for k, v in AMAX.items()})
    cache_path = write_trt_cache(table, tmp_path / "lenet.cache", names=caffe_lenet_names(), version=7000)
    text = cache_path.read_text()
    assert text.splitlines()[0] == "TRT-7000-EntropyCalibration2" and text.endswith("\n")
    cache = read_trt_cache(cache_path)
    assert list(cache.scales) == LENET
    for k, v in AMAX.items():
        assert cache.scales[k] == _f32(v / 127.0)
    conv = trt_cache_to_calib_json(cache_path, tmp_path / "calib.json")  # names kept as written
    back = read_calib_json(tmp_path / "calib.json")
    assert list(back) == LENET and back == {k: _f32(v / 127.0) for k, v in AMAX.items()}
    assert conv.unplaced == {} and conv.missing == ()
    # a mapping of tensor -> amax (what the ONNX exporter passes), default version header
    plain = write_trt_cache({"input": 1.0, "/conv1/Conv_output_0": 3.5}, tmp_path / "plain.cache")
    assert plain.read_text() == (f"TRT-8601-EntropyCalibration2\ninput: {float32_hex(1 / 127)}\n"
                                 f"/conv1/Conv_output_0: {float32_hex(3.5 / 127)}\n")


def test_writer_rejects_bad_values():
    with pytest.raises(CalibrationError, match="'x'.*finite and > 0"):
        trt_cache_text({"x": 0.0})
    with pytest.raises(CalibrationError, match="'y'.*finite"):
        trt_cache_text({"y": float("nan")})
    with pytest.raises(CalibrationError, match="line break"):
        trt_cache_text({"a\nb": 1.0})
    with pytest.raises(CalibrationError, match="calibrator"):
        trt_cache_text({"a": 1.0}, algorithm="Percentile")
    with pytest.raises(CalibrationError, match="digits"):
        trt_cache_text({"a": 1.0}, version="8.6")


BAD_CACHES = [
    ("foreign-header", "PK\x03\x04 not a cache\ndata: 3c008912\n", 1, "not a TensorRT calibration cache"),
    ("unknown-calibrator", "TRT-8601-PercentileCalibration\n", 1, "not a TensorRT calibration cache"),
    ("empty", "", 1, "empty"),
    ("malformed-hex", "TRT-7000-EntropyCalibration2\ndata: 3c008912\nconv1: 3c0g8912\n", 3, "'conv1': malformed hex"),
    ("too-long-hex", "TRT-7000-EntropyCalibration2\ndata: 3c0089120\n", 2, "malformed hex"),
    ("no-colon", "TRT-7000-EntropyCalibration2\n\ndata 3c008912\n", 3, "expected '<tensor>: <hex>'"),
    ("nan-bits", "TRT-7000-EntropyCalibration2\ndata: 7fc00000\n", 2, "not a finite float32"),
    ("duplicate", "TRT-7000-EntropyCalibration2\ndata: 3c008912\ndata: 3c008912\n", 3, "twice"),
]


@pytest.mark.parametrize("name, text, line, pattern", BAD_CACHES, ids=[b[0] for b in BAD_CACHES])
def test_bad_caches_name_file_and_line(tmp_path, name, text, line, pattern):
    path = tmp_path / f"{name}.cache"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=pattern) as info:
        read_trt_cache(path)
    assert info.value.line == line and info.value.path == str(path)


def test_non_utf8_and_missing_cache(tmp_path):
    path = tmp_path / "bin.cache"
    path.write_bytes(b"TRT-7000-EntropyCalibration2\n\xff\xfe: 0\n")
    with pytest.raises(FileFormatError, match="UTF-8") as info:
        read_trt_cache(path)
    assert info.value.line == 2
    with pytest.raises(FileNotFoundError):
        read_trt_cache(tmp_path / "absent.cache")


def test_crlf_and_names_with_colons_and_spaces(tmp_path):
    path = tmp_path / "crlf.cache"
    path.write_bytes(b"TRT-8601-MinMaxCalibration\r\n(Unnamed Layer* 3) [Scale]_output: 3c008912\r\na:b: 3f800000\r\n")
    cache = read_trt_cache(path)
    assert cache.algorithm == "MinMaxCalibration"
    assert list(cache.scales) == ["(Unnamed Layer* 3) [Scale]_output", "a:b"]


def _trt_lenet_cache(path, *, with_unnamed=True, unnamed_type="Fully Connected"):
    """A cache as TensorRT names LeNet's tensors: blob ip1 is relu1's output, ip1's is unnamed."""
    lines = ["TRT-7000-EntropyCalibration2"]
    for k in ["data", "conv1", "pool1", "conv2", "pool2"]:
        lines.append(f"{k}: {float32_hex(AMAX[k] / 127)}")
    if with_unnamed:
        lines.append(f"(Unnamed Layer* 4) [{unnamed_type}]_output: {float32_hex(AMAX['ip1'] / 127)}")
    lines += [f"ip1: {float32_hex(AMAX['relu1'] / 127)}", f"ip2: {float32_hex(AMAX['ip2'] / 127)}",
              f"prob: {float32_hex(AMAX['prob'] / 127)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_caffe_trt_names_of_lenet(lenet_proto):
    named, unnamed = caffe_trt_names(lenet_proto)
    assert named["ip1"] == "relu1" and named["conv1"] == "conv1" and named["data"] == "data"
    assert unnamed == {4: ("ip1", "InnerProduct")}


def test_convert_with_prototxt_renames_in_place_tensors(tmp_path, lenet_proto):
    cache = _trt_lenet_cache(tmp_path / "trt.cache")
    conv = convert_trt_cache(cache, prototxt=lenet_proto)
    assert list(conv.scales) == LENET
    assert conv.scales == {k: _f32(v / 127) for k, v in AMAX.items()}
    assert conv.placed["ip1"] == "relu1" and conv.placed["(Unnamed Layer* 4) [Fully Connected]_output"] == "ip1"
    assert conv.unplaced == {} and conv.missing == () and conv.filled == {}
    # calib_txt_to_json would have written TensorRT's ip1 (= relu1's range) as ip1, and no relu1:
    naive = convert_trt_cache(cache)
    assert naive.scales["ip1"] == conv.scales["relu1"] and "relu1" not in naive.scales
    assert "(Unnamed Layer* 4) [Fully Connected]_output" in naive.unplaced


def test_convert_fills_unnamed_in_place_writers_and_reports(tmp_path, lenet_proto):
    cache = _trt_lenet_cache(tmp_path / "trt.cache", with_unnamed=False)
    conv = convert_trt_cache(cache, prototxt=lenet_proto)
    assert conv.filled == {"ip1": "relu1"} and conv.scales["ip1"] == conv.scales["relu1"]
    assert any(f.rule == "filled" and f.layer == "ip1" for f in conv.findings)
    strict = convert_trt_cache(cache, prototxt=lenet_proto, fill_inplace=False)
    assert strict.missing == ("ip1",)
    with pytest.raises(CalibrationError, match="ip1"):
        trt_cache_to_calib_json(cache, tmp_path / "x.json", prototxt=lenet_proto, fill_inplace=False)
    assert not (tmp_path / "x.json").exists()


def test_convert_reports_what_it_cannot_place(tmp_path, lenet_proto):
    cache = _trt_lenet_cache(tmp_path / "trt.cache", unnamed_type="Pooling")
    with open(cache, "a") as f:
        f.write(f"(Unnamed Layer* 42) [Scale]_output: {float32_hex(0.1)}\nmystery: {float32_hex(0.1)}\n")
    conv = convert_trt_cache(cache, prototxt=lenet_proto)
    assert set(conv.unplaced) == {"(Unnamed Layer* 4) [Pooling]_output", "(Unnamed Layer* 42) [Scale]_output", "mystery"}
    assert "InnerProduct" in conv.unplaced["(Unnamed Layer* 4) [Pooling]_output"]
    warned = {f.layer for f in conv.findings if f.rule == "unplaced"}
    assert warned == set(conv.unplaced)
    # a user map places them (and null drops one on purpose)
    mapped = convert_trt_cache(cache, prototxt=lenet_proto,
                               names={"(Unnamed Layer* 4) [Pooling]_output": "ip1", "mystery": None})
    assert mapped.placed["(Unnamed Layer* 4) [Pooling]_output"] == "ip1" and mapped.filled == {}
    assert mapped.unplaced["mystery"] == "dropped by the name map"


def test_convert_resnet_stem_in_place_chain(tmp_path):
    proto = tmp_path / "stem.prototxt"
    proto.write_text("""name: "stem"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale_conv1" type: "Scale" bottom: "conv1" top: "conv1" }
layer { name: "conv1_relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
""")
    cache = tmp_path / "stem.cache"
    cache.write_text("TRT-8601-EntropyCalibration2\n"
                     f"data: {float32_hex(0.02)}\n"
                     f"(Unnamed Layer* 0) [Convolution]_output: {float32_hex(0.5)}\n"
                     f"(Unnamed Layer* 1) [Scale]_output: {float32_hex(0.03)}\n"
                     f"(Unnamed Layer* 2) [Scale]_output: {float32_hex(0.04)}\n"
                     f"conv1: {float32_hex(0.035)}\n"
                     f"pool1: {float32_hex(0.036)}\n")
    conv = convert_trt_cache(cache, prototxt=proto)
    assert list(conv.scales) == ["data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    assert conv.placed["conv1"] == "conv1_relu"
    assert conv.scales["conv1"] == _f32(0.5) and conv.scales["conv1_relu"] == _f32(0.035)
    assert conv.scales["pool1"] == conv.scales["conv1_relu"]  # NVDLA rule applied and reported
    assert any(f.rule == "pool" and f.layer == "pool1" for f in conv.findings)


def test_zero_scale_in_cache_is_a_named_error(tmp_path):
    path = tmp_path / "zero.cache"
    path.write_text("TRT-7000-EntropyCalibration2\ndata: 3c008912\nconv1: 0\n")
    assert read_trt_cache(path).scales["conv1"] == 0.0
    with pytest.raises(FileFormatError, match="'conv1'.*not > 0") as info:
        convert_trt_cache(path)
    assert info.value.line == 3


def test_name_map_file(tmp_path):
    good = tmp_path / "map.json"
    good.write_text(json.dumps({"ip1": "relu1", "x": None}))
    assert read_name_map(good) == {"ip1": "relu1", "x": None}
    bad = tmp_path / "bad.json"
    bad.write_text('{"ip1": 3}')
    with pytest.raises(FileFormatError, match="'ip1'"):
        read_name_map(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n"ip1": ')
    with pytest.raises(FileFormatError) as info:
        read_name_map(broken)
    assert info.value.line == 2


def test_write_with_prototxt_uses_tensorrt_names_and_converts_back(tmp_path, lenet_proto):
    assert trt_tensor_names(lenet_proto)["relu1"] == "ip1"
    assert trt_tensor_names(lenet_proto)["ip1"] == "(Unnamed Layer* 4) [Fully Connected]_output"
    table = CalibrationTable({k: TapRange(k, v, "entropy") for k, v in AMAX.items()})
    path = write_trt_cache(table, tmp_path / "trt.cache", names=caffe_lenet_names(), prototxt=lenet_proto)
    cache = read_trt_cache(path)
    assert cache.scales["ip1"] == _f32(AMAX["relu1"] / 127)
    assert cache.scales["(Unnamed Layer* 4) [Fully Connected]_output"] == _f32(AMAX["ip1"] / 127)
    assert path.read_text() == _trt_lenet_cache(tmp_path / "expected.cache").read_text().replace("7000", "8601")
    conv = convert_trt_cache(path, prototxt=lenet_proto)
    assert conv.scales == {k: _f32(v / 127) for k, v in AMAX.items()} and conv.filled == {}
