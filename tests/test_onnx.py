"""ONNX / TensorRT-DLA export: tap mapping, Q/DQ graph, TensorRT cache, onnxruntime vs int8_simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch_nvdla import calibrate  # noqa: E402
from torch_nvdla.errors import CalibrationError  # noqa: E402
from torch_nvdla.export.onnx import (  # noqa: E402
    _ties,
    capture_taps,
    compare_with_onnxruntime,
    export_onnx,
    quantize_onnx,
)
from torch_nvdla.nvdla.requant import fake_quant  # noqa: E402
from torch_nvdla.nvdla.weights import fold_batchnorm, quantize_weight  # noqa: E402


class _Add(nn.Module):
    def forward(self, a, b):
        return a + b


class Tiny(nn.Module):
    """conv-bn-relu, conv-bn + identity shortcut, add, the same ReLU again (``relu#1``),
    max pool, functional flatten, linear, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shortcut = nn.Identity()
        self.add = _Add()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.prob = nn.Softmax(dim=1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = self.relu(self.add(y, self.shortcut(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.prob(self.fc(x))


def _tiny():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    m.eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    table = calibrate(m, [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)], "minmax", progress=False)
    return m, table, x, y


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


# -------------------------------------------------------------------------------- mapping


def test_nvdla_placement_graph(tiny, tmp_path):
    m, table, x, _ = tiny
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = export_onnx(m, table, tmp_path / "tiny.onnx", example_input=x[:8], weights="per-filter")
    loaded = onnx.load(str(tmp_path / "tiny.onnx"))
    onnx.checker.check_model(loaded, full_check=True)
    # BatchNorm folded by the exporter: the pre-BN conv outputs are gone, and said so.
    assert set(res.unmapped) == {"conv1", "conv2"}
    assert all(r.startswith("fused: ") for r in res.unmapped.values())
    assert res.fused_into["conv1"] == res.tensors["bn1"]
    assert not _nodes(loaded, "BatchNormalization")
    # Second call of the same ReLU is its own tensor; the Identity shares the first's.
    assert res.tensors["relu#1"] != res.tensors["relu"]
    assert res.aliases["shortcut"] == "relu"
    # NVDLA placement: fused layers write once, the sum's earlier-created operand (the
    # block input ``relu``, read through the Identity shortcut) at the later one's scale
    # (``bn2``), the pool at its input's, softmax float.
    assert {q.tap: q.scale_tap for q in res.quantized} == {
        "data": "data", "relu": "bn2", "bn2": "bn2", "relu#1": "relu#1", "pool": "relu#1", "fc": "fc"}
    assert "softmax" in res.not_quantized["prob"]
    assert "fused" in res.not_quantized["bn1"]
    q, dq = _nodes(loaded, "QuantizeLinear"), _nodes(loaded, "DequantizeLinear")
    assert len(q) == 6 and len(dq) == 6 + 3  # + three weights
    # Weights: int8 per output channel = the compiler's formula on the folded weight.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in loaded.graph.initializer}
    w_f, _ = fold_batchnorm(m.conv1.weight, None, m.bn1.running_mean, m.bn1.running_var, m.bn1.eps,
                            m.bn1.weight, m.bn1.bias)
    ref = quantize_weight(w_f, "per-filter")
    conv1 = next(n for n in loaded.graph.node if n.op_type == "Conv" and n.input[0] == res.qdq_tensors["data"])
    wdq = next(n for n in dq if n.output[0] == conv1.input[1])
    assert inits[wdq.input[0]].dtype == np.int8 and inits[wdq.input[1]].shape == (8,)
    assert next(a.i for a in wdq.attribute if a.name == "axis") == 0
    assert np.abs(inits[wdq.input[0]].astype(int) - ref.q.numpy().astype(int)).max() <= 1
    assert np.allclose(inits[wdq.input[1]], ref.scale.numpy(), rtol=1e-5)
    # The model is left as it was.
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert not m.training


def test_all_placement_maps_every_tap(tiny):
    m, table, x, _ = tiny
    res = export_onnx(m, table, None, example_input=x[:8], placement="all")
    assert res.unmapped == {}  # BatchNorm kept: every tap has its tensor
    assert _nodes(res.plain_model, "BatchNormalization")
    assert res.tensors["conv1"] != res.tensors["bn1"]
    quantized = {q.tap for q in res.quantized}
    assert quantized == {t for t in table if t not in ("prob", "shortcut")}
    assert all(q.scale_tap == q.tap and q.amax == table[q.tap].amax for q in res.quantized)
    assert max(res.match_error.values()) < 1e-4


def test_unmapped_taps_are_reported(tiny, capsys):
    m, table, x, _ = tiny
    res = export_onnx(m, table, None, example_input=x[:4], show=True)
    out = capsys.readouterr().out
    assert "unmapped" in out and "conv1" in out and "conv2" in out
    export_onnx(m, table, None, example_input=x[:4])
    assert "conv1" in capsys.readouterr().err
    assert res.to_dict()["unmapped"] == res.unmapped
    json.dumps(res.to_dict())


def test_capture_taps_naming(tiny):
    m, table, x, _ = tiny
    with torch.no_grad(), capture_taps(m, ["data", "relu", "relu#1", "relu#1:input", "bn1:normalized"]) as cap:
        m(x[:2])
    assert set(cap) == {"data", "relu", "relu#1", "relu#1:input", "bn1:normalized"}
    assert torch.equal(cap["relu#1"], torch.relu(cap["relu#1:input"]))
    assert all(not mod._forward_hooks for mod in m.modules())


# -------------------------------------------------------------------------------- cache


def test_trt_cache(tiny, tmp_path):
    from torch_nvdla.nvdla.trtcache import read_trt_cache

    m, table, x, _ = tiny
    res = export_onnx(m, table, tmp_path / "m.onnx", example_input=x[:8], cache=tmp_path / "m.cache",
                      trt_version=8601)
    cache = read_trt_cache(tmp_path / "m.cache")
    assert (cache.version, cache.algorithm) == ("8601", "EntropyCalibration2")
    assert res.plain_path == tmp_path / "m.noqdq.onnx" and res.plain_path.exists()
    plain = onnx.load(str(res.plain_path))
    assert not _nodes(plain, "QuantizeLinear")
    names = {i.name for i in plain.graph.input} | {o for n in plain.graph.node for o in n.output}
    assert set(cache.scales) <= names
    for tap, tensor in res.tensors.items():
        owner = res.aliases.get(tap, tap)
        assert cache.scales[tensor] == pytest.approx(np.float32(table[owner].amax / 127), rel=1e-7)
    # torch.flatten is not a module: its tensor inherits the pool's range.
    flat = next(n.output[0] for n in plain.graph.node if n.op_type in ("Flatten", "Reshape"))
    assert res.propagated[flat] == res.tensors["pool"]
    assert cache.scales[flat] == cache.scales[res.tensors["pool"]]
    assert res.uncovered == ()
    # No Q/DQ: the written model is the one the cache names.
    res2 = export_onnx(m, table, tmp_path / "p.onnx", example_input=x[:8], qdq=False, cache=tmp_path / "p.cache")
    assert res2.plain_path == tmp_path / "p.onnx" and res2.quantized == ()
    assert read_trt_cache(tmp_path / "p.cache").scales == cache.scales


# -------------------------------------------------------------------------------- rounding


def test_quantizelinear_rounding_vs_nvdla():
    """QuantizeLinear rounds half to even, NVDLA half away from zero: they differ exactly at
    ``k + 0.5`` with ``k`` even, by one step; saturation to [-128, 127] is the same."""
    from onnx import TensorProto, helper

    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997, 0.7, -3.2, 126.5, 127.5, 200.0, -128.5,
                  -129.0, -500.0], np.float32)
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [len(x)])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    q_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q_nv = fake_quant(torch.from_numpy(x), 1.0).numpy()
    differ = {float(v) for v, a, b in zip(x, q_ort, q_nv) if a != b}
    assert differ == {-2.5, -0.5, 0.5, 2.5, 126.5, -128.5} - {-128.5}  # -128.5 saturates to -128 both ways
    assert np.abs(q_ort.astype(int) - q_nv.astype(int)).max() == 1
    assert q_ort.min() == -128 and q_ort.max() == 127
    assert _ties(x, 1.0) == (9, 5)  # 9 ties inside the range (-128.5 included), 5 round differently


# -------------------------------------------------------------------------------- vs simulation


@pytest.mark.parametrize("placement", ["nvdla", "all"])
def test_tiny_matches_simulation(tiny, placement):
    m, table, x, y = tiny
    res = compare_with_onnxruntime(m, table, [(x[:32], y[:32]), (x[32:], y[32:])], placement=placement,
                                   tensor_batches=2, show=False)
    assert res.samples == 64 and res.tensor_samples == 64
    assert res.taps and all(t.same_graph and t.simulated for t in res.taps)
    assert res.local_steps_same_graph <= 1.0 + 1e-3
    assert res.agreement >= 95.0
    assert res.top1_fp32 == pytest.approx(100.0 * float((m(x).argmax(1) == y).float().mean()))


def test_comparison_does_not_depend_on_host_int8_kernels(tiny):
    """The comparison's verdict runs the Q/DQ graph as written (float arithmetic on the
    dequantized values), whatever the CPU: a 1x1 conv over 64 channels of q = 127 with
    weights q = 127 sums 64 * 127 * 127 = 1032256 exactly (< 2**24, exact in float32),
    where int8 kernels on x86 without VNNI saturate u8 x s8 pair sums in int16."""
    from onnx import TensorProto, helper, numpy_helper

    from torch_nvdla.export.onnx import _session

    c = 64
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.full((1, c, 1, 1), 127, np.int8), "wq"),
             numpy_helper.from_array(np.array(0.25, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "z"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "sat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.full((1, c, 2, 2), 127 * 0.5, np.float32)
    ref = _session(model).run(None, {"x": x})[0]
    assert np.all(ref == np.float32(c * 127 * 127 * 0.5 * 0.25))
    _session(model, optimize=True).run(None, {"x": x})  # runs; its value depends on the CPU

    # Both session modes on a small model: the reference verdict, the optimized top-1 beside it.
    m, table, xs, ys = tiny
    res = compare_with_onnxruntime(m, table, [(xs, ys)], placement="all", optimized=True, show=True)
    assert res.top1_onnxruntime_optimized is not None and 0.0 <= res.top1_onnxruntime_optimized <= 100.0
    assert res.local_steps_same_graph <= 1.0 + 1e-3 and res.agreement >= 95.0
    assert res.to_dict()["top1_onnxruntime_optimized"] == res.top1_onnxruntime_optimized
    plain = compare_with_onnxruntime(m, table, [(xs, ys)], placement="all", show=False)
    assert plain.top1_onnxruntime_optimized is None and plain.top1_onnxruntime == res.top1_onnxruntime


def test_options_and_errors(tiny, tmp_path):
    m, table, x, _ = tiny
    with pytest.raises(CalibrationError, match="placement"):
        export_onnx(m, table, None, example_input=x[:4], placement="everything")
    with pytest.raises(CalibrationError, match="weights"):
        export_onnx(m, table, None, example_input=x[:4], weights="per-channel")
    with pytest.raises(CalibrationError, match="opset"):
        export_onnx(m, table, None, example_input=x[:4], opset=11)
    with pytest.raises(CalibrationError, match="path"):
        export_onnx(m, table, None, example_input=x[:4], cache=tmp_path / "c.cache")
    with pytest.raises(CalibrationError, match="example_input"):
        export_onnx(m, table, None, example_input="images")
    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.raises(CalibrationError, match="no tap of the table"):
        export_onnx(other, table, None, example_input=x[:4], qdq=False)
    res = export_onnx(m, table, None, example_input=x[:4], weights="per-kernel", dynamic_batch=False)
    weight_scales = [i for i in res.model.graph.initializer if i.name in {f"{w}_scale" for w in res.quantized_weights}]
    assert len(weight_scales) == 3 and all(len(s.dims) == 0 for s in weight_scales)  # per-kernel: one scale
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    with pytest.raises(CalibrationError, match="opset >= 13"):
        quantize_onnx(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                             opset_imports=[onnx.helper.make_opsetid("", 11)]), {})
    with pytest.raises(CalibrationError, match="not produced"):
        quantize_onnx(res.plain_model, {"nonexistent": 1.0})


# -------------------------------------------------------------------------------- real data


def _real(name, data, n_calib):
    from torch_nvdla.zoo.registry import get_dataset, get_model

    model = get_model(name)
    ds = get_dataset(data)
    table = calibrate(model, ds.loader("calibration", 100, limit=n_calib), "entropy", progress=False)
    return model, table, ds


def _balanced(ds, n, first=50, batch=250):
    """``n`` evaluation images spread over the whole (class-ordered) split; a small first
    batch for the per-tensor comparison."""
    from torch_nvdla.zoo.data import batches

    x, y = ds.split("evaluation")
    idx = torch.linspace(0, len(x) - 1, n).round().long()
    x, y = x[idx], y[idx]
    return [(x[:first], y[:first]), *batches(x[first:], y[first:], batch)]


@pytest.mark.slow
def test_caffe_lenet_onnxruntime_vs_simulation(shared_data):
    model, table, ds = _real("caffe-lenet", "mnist", 500)
    for placement in ("nvdla", "all"):
        res = compare_with_onnxruntime(model, table, _balanced(ds, 2000, batch=650), placement=placement,
                                       show=placement == "nvdla")
        assert res.samples == 2000 and res.top1_simulation > 98.0
        assert res.top1_gap <= 0.3, res.to_dict()
        assert res.taps and all(t.same_graph for t in res.taps)
        assert res.local_steps_same_graph <= 1.0 + 1e-3


@pytest.mark.slow
def test_resnet20_onnxruntime_vs_simulation(shared_data):
    model, table, ds = _real("cifar-resnet20", "cifar10", 100)
    # The simulation's own placement (every tap, BatchNorm unfolded).
    res = compare_with_onnxruntime(model, table, _balanced(ds, 500), placement="all", show=True)
    assert res.samples == 500 and res.top1_simulation > 75.0
    # QuantizeLinear's half-to-even ties are what separates the two (see the rounding notes):
    # with NVDLA's tie rule emulated, onnxruntime's reference run gives the simulation's top-1.
    assert res.agreement >= 98.5, res.to_dict()
    away = compare_with_onnxruntime(model, table, _balanced(ds, 500), placement="all", rounding="half-away",
                                    tensor_batches=0, show=False)
    assert away.top1_gap <= 0.3 and away.agreement >= 99.8, away.to_dict()
    assert res.unmapped == {} and len(res.taps) == len(table) and all(t.same_graph for t in res.taps)
    assert res.local_steps_same_graph <= 1.0 + 1e-3
    # NVDLA placement (BatchNorm folded, fused layers): the same graph as placement="nvdla",
    # every tensor within one step locally; with NVDLA's tie rule emulated in onnxruntime the
    # predictions agree as closely as above.
    res = compare_with_onnxruntime(model, table, _balanced(ds, 250, batch=200), placement="nvdla", rounding="half-away",
                                   show=False)
    assert len(res.unmapped) == 19 and all(r.startswith("fused: ") for r in res.unmapped.values())
    assert all(t.same_graph for t in res.taps) and res.local_steps_same_graph <= 1.0 + 1e-3
    assert sum(t.flips for t in res.taps) > 0  # ties exist (see the module docstring) ...
    assert res.agreement >= 98.5 and res.top1_gap <= 0.7  # ... and little else separates the two


def test_cli_export_onnx(tmp_path, capsys):
    pytest.importorskip("sklearn")  # the digits data set ships with scikit-learn
    from torch_nvdla.cli import main
    from torch_nvdla.nvdla.trtcache import read_trt_cache

    table = tmp_path / "table.json"
    assert main(["calibrate", "--model", "digits-lenet", "--num-images", "200", "-o", str(table)]) == 0
    out = tmp_path / "digits.onnx"
    capsys.readouterr()
    assert main(["export-onnx", "--model", "digits-lenet", "--table", str(table), "-o", str(out),
                 "--cache", str(tmp_path / "digits.cache"), "--compare", "--num-images", "300", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["export"]["unmapped"] == {} and report["comparison"]["samples"] == 300
    assert report["comparison"]["top1_gap"] <= 1.0 and report["comparison"]["local_steps_same_graph"] <= 1.001
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert (tmp_path / "digits.noqdq.onnx").exists()
    assert "data" in read_trt_cache(tmp_path / "digits.cache").scales
    assert main(["export-onnx", "--model", "digits-lenet", "--table", str(table), "-o", str(out),
                 "--placement", "all", "--no-qdq", "--input-shape", "1,8,8", "--strict"]) == 0
    assert "ONNX tap mapping" in capsys.readouterr().out
    assert main(["export-onnx", "--model", "digits-lenet", "--table", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
