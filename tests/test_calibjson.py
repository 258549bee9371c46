"""calib.json: export (names, NVDLA rules, determinism), the validating reader, the checker,
and quantized weights -- on the real Caffe LeNet and on torchvision ResNets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch_nvdla.models.caffe_lenet import load_caffe_lenet

from torch_nvdla import CalibrationError, CalibrationTable, FileFormatError, TapRange
from torch_nvdla.caffe.prototxt import parse_prototxt
from torch_nvdla.nvdla.calibjson import (
    apply_nvdla_rules,
    check_calib_json,
    export_calib_json,
    nvdla_ranges,
    read_calib_json,
    scan_calib_json,
)
from torch_nvdla.nvdla.export_weights import export_quantized_weights
from torch_nvdla.nvdla.naming import (
    LayerName,
    NvdlaNames,
    caffe_lenet_names,
    calibrate_for_nvdla,
)
from torch_nvdla.nvdla.weights import quantize_bias, quantize_weight
from torch_nvdla.zoo.data import load_mnist_test, preprocess_mnist_caffe

LENET = ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]
# The hand-written table measured with the real compiler (shared/nvdla/COMPILER_FACTS.md).
FACTS_TABLE = {"data": 1 / 127, "conv1": 0.06, "pool1": 0.06, "conv2": 0.12, "pool2": 0.12,
               "ip1": 0.10, "relu1": 0.10, "ip2": 0.20, "prob": 1 / 127}
FACTS_M_T = {"conv1": (21272, 25), "conv2": (32065, 25), "ip1": (32583, 25), "ip2": (17596, 24)}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _calib(scales):
    return {k: {"scale": v, "min": 0, "max": 0, "offset": 0} for k, v in scales.items()}


def _table(amax: dict) -> CalibrationTable:
    return CalibrationTable({k: TapRange(k, v, "test") for k, v in amax.items()})


@pytest.fixture(scope="module")
def lenet_run(shared_data, tmp_path_factory):
    """Caffe LeNet calibrated on the first 500 MNIST test images, exported."""
    folder = shared_data / "caffe-lenet-mnist"
    model = load_caffe_lenet(folder / "lenet_iter_10000.npz")
    images, labels = load_mnist_test(shared_data)
    x = preprocess_mnist_caffe(images[:500])
    loader = [(x[i:i + 100], labels[i:i + 100]) for i in range(0, 500, 100)]
    table, names = calibrate_for_nvdla(model, loader, progress=False)
    out = tmp_path_factory.mktemp("lenet") / "calib.json"
    report = export_calib_json(table, out, names)
    return model, table, names, report, folder


def test_lenet_calib_json_keys_are_the_prototxt_layers_and_check_passes(lenet_run):
    model, table, names, report, folder = lenet_run
    net = parse_prototxt(folder / "lenet.prototxt")
    obj = json.loads(report.path.read_text())
    assert list(obj) == [layer.name for layer in net.layers] == LENET
    for v in obj.values():
        assert set(v) == {"scale", "min", "max", "offset"} and type(v["scale"]) is float and v["scale"] > 0
    assert obj["pool1"]["scale"] == obj["conv1"]["scale"] and obj["pool2"]["scale"] == obj["conv2"]["scale"]
    assert obj["data"]["scale"] == pytest.approx(table["data"].amax / 127)
    assert obj["data"]["scale"] * 127 <= 255 / 256 + 1e-7  # input is pixel/256
    assert read_calib_json(report.path) == {k: v["scale"] for k, v in obj.items()}
    result = check_calib_json(report.path, folder / "lenet.prototxt", blobs=folder / "lenet_iter_10000.npz")
    assert result.ok, [f for f in result.findings if f.level == "error"]
    assert not [f for f in result.findings if f.level == "warning"]
    requant = {f.layer for f in result.findings if f.rule == "requant"}
    assert requant == {"conv1", "conv2", "ip1", "ip2"}


def test_lenet_quantized_weights_use_the_compiler_formula(lenet_run, tmp_path):
    model, table, names, report, folder = lenet_run
    summary = export_quantized_weights(model, table, names, tmp_path / "w", weights="per-kernel")
    assert [s["layer"] for s in summary] == ["conv1", "conv2", "ip1", "ip2"]
    by = {s["layer"]: s for s in summary}
    # S_in of each layer is the calib.json entry of its producer (conv2 <- pool1, ip1 <- pool2)
    assert [by[n]["input"] for n in by] == ["data", "pool1", "pool2", "relu1"]
    assert by["conv2"]["s_in"] == report.scales["pool1"] and by["ip1"]["s_in"] == report.scales["pool2"]
    # Caffe LeNet weight scales measured from the compiler (COMPILER_FACTS.md)
    assert by["conv1"]["scales"] == pytest.approx(0.00483075, rel=1e-5)
    assert by["conv2"]["scales"] == pytest.approx(0.00191125, rel=1e-5)
    assert by["ip1"]["scales"] == pytest.approx(0.000809228, rel=1e-5)
    assert by["ip2"]["scales"] == pytest.approx(0.00209765, rel=1e-5)
    with np.load(tmp_path / "w" / "weights.npz") as z:
        qw = quantize_weight(model.conv2.weight, "per-kernel")
        assert np.array_equal(z["conv2.weight_q"], qw.q.numpy())
        assert np.array_equal(z["conv2.bias_q"], quantize_bias(model.conv2.bias, report.scales["pool1"], qw.scale).numpy())
    assert json.loads((tmp_path / "w" / "weights.json").read_text())[0]["module"] == "conv1"
    per_filter = export_quantized_weights(model, table, names, tmp_path / "pf", weights="per-filter")
    assert len(per_filter[0]["scales"]) == 20


def test_compiler_facts_golden_requantization(shared_data, tmp_path):
    folder = shared_data / "caffe-lenet-mnist"
    path = _write(tmp_path / "calib.json", _calib(FACTS_TABLE))
    result = check_calib_json(path, folder / "lenet.prototxt", blobs=folder / "lenet_iter_10000.npz")
    assert result.ok
    got = {}
    for f in result.findings:
        if f.rule == "requant" and "->" in f.message:
            m, t = f.message.rsplit("->", 1)[1].split("(")[0].split(">>")
            got[f.layer] = (int(m), int(t))
    assert got == FACTS_M_T
    basic = check_calib_json(path, folder / "lenet.prototxt", blobs=folder / "lenet_iter_10000.npz", profile="basic")
    relu = [f for f in basic.findings if f.layer == "relu1" and f.rule == "requant"]
    assert relu and relu[0].message.endswith("16384 >> 14")  # the extra SDP rescale, ratio 1


@pytest.fixture(scope="module")
def resnet50_run(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    table, names = calibrate_for_nvdla(model, [x], progress=False)
    return model, table, names, tmp_path_factory.mktemp("r50")


def test_resnet50_export_229_keys_in_caffe_order_pools_equal_inputs(resnet50_run):
    model, table, names, tmp = resnet50_run
    report = export_calib_json(table, tmp / "calib.json", names)
    obj = json.loads(report.path.read_text())
    assert list(obj) == names.names() and len(obj) == 229
    s = read_calib_json(report.path)
    assert s["pool1"] == s["conv1_relu"] and s["pool5"] == s["res5c_relu"]
    assert s["prob"] == 1 / 127
    assert s["bn_conv1"] == pytest.approx(table["bn1:normalized"].amax / 127)
    assert s["res2a"] == pytest.approx(table["layer1.0.relu#2:input"].amax / 127)
    assert report.ranges.resolution.missing == () and report.ranges.resolution.unnamed == ()
    eltwise = [f for f in report.findings if f.rule == "eltwise"]
    assert eltwise and all(f.level == "warning" and "overwrites the scale of" in f.message for f in eltwise)
    # The compiler's rule: the operand created earlier in the Caffe ResNet (branch1 comes
    # before branch2a in its prototxt) takes the later one's scale.
    res2a = next(f for f in eltwise if f.layer == "res2a")
    assert "overwrites the scale of scale2a_branch1 " in res2a.message, res2a.message
    # deterministic: the same table gives the same bytes
    again = export_calib_json(table, tmp / "calib2.json", names)
    assert again.path.read_bytes() == report.path.read_bytes()


def test_resnet50_eltwise_unify(resnet50_run):
    model, table, names, tmp = resnet50_run
    report = export_calib_json(table, tmp / "unified.json", names, eltwise="unify")
    s = report.scales
    for layer in names:
        if layer.kind == "eltwise":
            a, b = layer.inputs
            assert s[a] == s[b], layer.name
    assert s["pool1"] == s["conv1_relu"]  # the pool rule still holds after unifying
    assert any(adj[2] == "eltwise" for adj in report.ranges.adjusted.values())


def test_resnet18_export_and_folded_weights(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    table, names = calibrate_for_nvdla(model, [torch.randn(2, 3, 64, 64)], method="minmax", progress=False)
    report = export_calib_json(table, tmp_path / "r18.json", names)
    assert len(report.scales) == 90 and "res3a_branch1" in report.scales
    summary = export_quantized_weights(model, table, names, tmp_path / "w", fold_batchnorm=True)
    by = {s["layer"]: s for s in summary}
    assert len(by) == 21 and by["res2a_branch2a"]["folded_bn"] == "layer1.0.bn1"
    assert by["res2a_branch2a"]["input"] == "pool1" and by["res2a_branch2b"]["input"] == "res2a_branch2a_relu"
    assert by["fc1000"]["folded_bn"] is None and by["fc1000"]["input"] == "pool5"


def test_export_refuses_missing_layers_and_names_them(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    from torch_nvdla import calibrate

    table = calibrate(model, [torch.randn(2, 3, 32, 32)], method="minmax", progress=False)  # no preset taps
    names = NvdlaNames.for_model(model)
    with pytest.raises(CalibrationError, match="bn_conv1"):
        export_calib_json(table, tmp_path / "x.json", names)
    assert not (tmp_path / "x.json").exists()
    report = export_calib_json(table, tmp_path / "x.json", names, allow_missing=True)
    assert "bn_conv1" not in report.scales and any(f.rule == "missing" and f.layer == "bn_conv1" for f in report.errors)


def test_export_generic_names_mapping_and_uppercase_warning(tmp_path):
    table = _table({"data": 1.0, "conv": 2.0, "pool": 1.5})
    report = export_calib_json(table, tmp_path / "Calib.json", {"conv": "conv1"}, show=False)
    assert list(report.scales) == ["data", "conv1", "pool"]
    assert any(f.rule == "uppercase-path" for f in report.findings)


def test_export_rejects_unrepresentable_ranges(tmp_path):
    names = caffe_lenet_names()
    amax = {n: 1.0 for n in ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]}
    amax["relu1"] = 1e30
    with pytest.raises(CalibrationError, match="relu1|ip1"):
        export_calib_json(_table(amax), tmp_path / "bad.json", names)
    assert not (tmp_path / "bad.json").exists()


def test_concat_and_pool_rules():
    layers = [
        LayerName(name="data", kind="input"),
        LayerName(name="a", kind="conv", inputs=("data",)),
        LayerName(name="b", kind="conv", inputs=("data",)),
        LayerName(name="cat", kind="concat", inputs=("a", "b")),
        LayerName(name="pool", kind="pool", inputs=("cat",)),
        LayerName(name="pool2", kind="pool", inputs=("pool",)),
    ]
    vals = {"data": 1.0, "a": 2.0, "b": 3.0, "cat": 2.5, "pool": 0.5, "pool2": 0.1}
    fixed, findings, adjusted = apply_nvdla_rules(layers, vals)
    assert fixed == {"data": 1.0, "a": 3.0, "b": 3.0, "cat": 3.0, "pool": 3.0, "pool2": 3.0}
    assert adjusted["pool2"] == (0.1, 3.0, "pool") and adjusted["a"] == (2.0, 3.0, "concat")
    _, errs, _ = apply_nvdla_rules(layers, vals, fix=False)
    assert {(f.rule, f.layer) for f in errs} == {("concat", "cat"), ("pool", "pool"), ("pool", "pool2")}
    assert all(f.level == "error" for f in errs)


# -- the validating reader ---------------------------------------------------------------

BAD_FILES = [
    ("truncated", '{\n  "data": {"scale": 0.1},\n  "conv1": {"sca', 3, "truncated"),
    ("no-close", '{\n  "data": {"scale": 0.1}\n', 3, "truncated"),
    ("string-scale", '{\n  "data": {"scale": 0.1},\n  "conv1": {"scale": "0.2"}\n}', 3, "'conv1'.*string"),
    ("nan", '{\n  "data": {"scale": NaN}\n}', 2, "'data'.*nan"),
    ("infinity", '{\n  "data": {"scale": Infinity}\n}', 2, "'data'.*inf"),
    ("not-object", '{\n  "data": {"scale": 0.1},\n  "conv1": [0.2]\n}', 3, "'conv1'.*array, not an object"),
    ("zero", '{\n  "data": {"scale": 0.1},\n\n  "conv1": {"scale": 0}\n}', 4, "'conv1'.*scale is 0"),
    ("negative", '{"data": {"scale": -0.1}}', 1, "'data'.*negative"),
    ("bool", '{"data": {"scale": true}}', 1, "'data'.*true"),
    ("no-scale", '{"data": {"offset": 0}}', 1, "'data'.*neither scale nor min/max"),
    ("top-array", '[{"data": {"scale": 0.1}}]', 1, "top-level value is an array"),
    ("empty", '  \n', 2, "empty file"),
    ("empty-object", '{}', 1, "no entries"),
    ("garbage", '{"data": {"scale": 0.1}} x', 1, "extra data"),
    ("bad-key", '{\n data: 1}', 2, "quoted layer name"),
]


@pytest.mark.parametrize("name, text, line, pattern", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_reader_names_file_line_key_and_problem(tmp_path, name, text, line, pattern):
    path = tmp_path / f"{name}.json"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=pattern) as info:
        read_calib_json(path)
    assert info.value.path == str(path) and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_reader_non_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{\n  "d\xe9ta": {"scale": 0.1}\n}')
    with pytest.raises(FileFormatError, match="not UTF-8") as info:
        read_calib_json(path)
    assert info.value.line == 2


def test_reader_counts_other_problems_and_keeps_first_duplicate(tmp_path):
    path = tmp_path / "dups.json"
    path.write_text('{"a": {"scale": 0.5},\n"a": {"scale": 0.25},\n"b": {"min": -3.0, "max": 1.27}}')
    scan = scan_calib_json(path)
    assert scan.scales() == {"a": 0.5, "b": pytest.approx(3.0 / 127)}
    rules = [(f.rule, f.layer, f.line) for f in scan.findings]
    assert ("duplicate", "a", 2) in rules and ("minmax", "b", 3) in rules
    assert read_calib_json(path) == scan.scales()
    bad = _write(tmp_path / "two.json", {"a": {"scale": 0}, "b": {"scale": "x"}})
    with pytest.raises(FileFormatError, match=r"and 1 more problem"):
        read_calib_json(bad)
    with pytest.raises(FileNotFoundError):
        read_calib_json(tmp_path / "absent.json")


# -- the checker ---------------------------------------------------------------------------


def test_check_reports_missing_pool_unrepresentable_extra_and_uppercase(shared_data, tmp_path):
    proto = shared_data / "caffe-lenet-mnist" / "lenet.prototxt"
    scales = dict(FACTS_TABLE)
    del scales["relu1"]
    scales["pool1"] = 0.05
    scales["conv2"] = 1e30
    scales["extra"] = 0.1
    path = _write(tmp_path / "bad.json", _calib(scales))
    result = check_calib_json(path, proto)
    assert not result.ok
    errors = {(f.rule, f.layer) for f in result.errors}
    assert ("missing", "relu1") in errors
    assert ("pool", "pool1") in errors and ("pool", "pool2") in errors
    assert ("unrepresentable", "conv2") in errors
    missing = next(f for f in result.errors if f.rule == "missing")
    lines = proto.read_text().splitlines()
    assert missing.where == f"{proto}:{missing.line}"
    assert lines[missing.line - 1].strip() == "layer {" and lines[missing.line].strip() == 'name: "relu1"'
    assert any(f.rule == "unknown-key" and f.layer == "extra" and f.level == "warning" for f in result.findings)
    tiny = dict(FACTS_TABLE, ip2=1e-30)
    r2 = check_calib_json(_write(tmp_path / "tiny.json", _calib(tiny)), proto)
    assert {(f.rule, f.layer) for f in r2.errors} >= {("unrepresentable", "ip2")}
    upper = _write(tmp_path / "Upper.json", _calib(FACTS_TABLE))
    r3 = check_calib_json(upper, proto)
    assert [f.rule for f in r3.errors] == ["uppercase-path"]


def test_check_without_prototxt_flags_extreme_scales(tmp_path):
    path = _write(tmp_path / "x.json", _calib({"data": 0.1, "a": 1e30, "b": 1e-30}))
    result = check_calib_json(path)
    assert result.ok
    assert {f.layer for f in result.findings if f.rule == "extreme-scale"} == {"a", "b"}


def test_check_in_place_producers_from_a_resnet_style_prototxt(tmp_path):
    proto = tmp_path / "stem.prototxt"
    proto.write_text("""
name: "stem"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale_conv1" type: "Scale" bottom: "conv1" top: "conv1" }
layer { name: "conv1_relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
""")
    good = {"data": 0.02, "conv1": 0.5, "bn_conv1": 0.03, "scale_conv1": 0.04, "conv1_relu": 0.03, "pool1": 0.03}
    assert check_calib_json(_write(tmp_path / "good.json", _calib(good)), proto).ok
    bad = dict(good, pool1=0.5)  # equal to conv1, but the producer is conv1_relu
    result = check_calib_json(_write(tmp_path / "bad.json", _calib(bad)), proto)
    assert [(f.rule, f.layer) for f in result.errors] == [("pool", "pool1")]
    assert "conv1_relu" in result.errors[0].message


def test_nvdla_ranges_reports_unmatched_overrides():
    table = _table({"data": 1.0, "conv": 2.0})
    ranges = nvdla_ranges(table, NvdlaNames.from_table(table).with_overrides({"nothere": "x"}))
    assert [(f.rule, f.layer) for f in ranges.findings] == [("override", "nothere")]


def test_unify_raises_a_pool_through_its_producer():
    layers = [
        LayerName(name="data", kind="input"),
        LayerName(name="relu", kind="relu", inputs=("data",)),
        LayerName(name="pool", kind="pool", inputs=("relu",)),
        LayerName(name="branch", kind="scale", inputs=("pool",)),
        LayerName(name="sum", kind="eltwise", inputs=("pool", "branch")),
    ]
    vals = {"data": 1.0, "relu": 1.0, "pool": 1.0, "branch": 4.0, "sum": 4.0}
    fixed, findings, adjusted = apply_nvdla_rules(layers, vals, eltwise="unify")
    assert fixed["pool"] == fixed["relu"] == fixed["branch"] == 4.0
    assert adjusted["relu"] == (1.0, 4.0, "eltwise")
    assert not any(f.rule == "rules" for f in findings)


_CAFFE_TYPE = {"input": "Input", "conv": "Convolution", "bn": "BatchNorm", "scale": "Scale", "relu": "ReLU",
               "pool": "Pooling", "eltwise": "Eltwise", "fc": "InnerProduct", "softmax": "Softmax"}


def _deploy_prototxt(names) -> str:
    """A Caffe-style deploy text for the names: BatchNorm / Scale / ReLU in place, like He et al.'s."""
    blob, out = {}, ['name: "net"']
    for layer in names:
        in_place = layer.kind in ("bn", "scale", "relu")
        blob[layer.name] = blob[layer.inputs[0]] if in_place else layer.name
        bottoms = "".join(f' bottom: "{blob[i]}"' for i in layer.inputs)
        out.append(f'layer {{ name: "{layer.name}" type: "{_CAFFE_TYPE[layer.kind]}"{bottoms} top: "{blob[layer.name]}" }}')
    return "\n".join(out) + "\n"


def test_resnet50_export_passes_check_against_an_in_place_deploy_prototxt(resnet50_run):
    model, table, names, tmp = resnet50_run
    proto = tmp / "resnet50.prototxt"
    proto.write_text(_deploy_prototxt(names))
    assert 'name: "bn_conv1" type: "BatchNorm" bottom: "conv1" top: "conv1"' in proto.read_text()
    report = export_calib_json(table, tmp / "checked.json", names)
    result = check_calib_json(report.path, proto)
    assert result.ok, result.errors[:3]
    assert len(result.layers) == 229
    assert {f.rule for f in result.findings if f.level == "warning"} <= {"eltwise"}
    # the measured (unfixed) ranges: the checker rejects them
    raw = {n: table[layer.tap].amax / 127 if layer.tap else layer.amax / 127 for n, layer in
           ((layer.name, layer) for layer in names)}
    bad = check_calib_json(_write(tmp / "raw.json", _calib(raw)), proto)
    assert [(f.rule, f.layer) for f in bad.errors] == [("pool", "pool5")]  # the average pool's range shrank
