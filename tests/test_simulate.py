"""INT8 simulation: fake-quant against a plain reference, NVDLA integer against hand arithmetic,
exact restoration of the model, the NVDLA graph rules, bad tables, and real-data accuracy."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_nvdla.calib.calibrate import calibrate
from torch_nvdla.calib.table import CalibrationTable, TapRange
from torch_nvdla.calib.taps import BN_NORMALIZED, TapSelection, tap_name
from torch_nvdla.errors import CalibrationError
from torch_nvdla.nvdla.requant import fake_quant, quantize, requantize
from torch_nvdla.sim.simulate import (
    _fq,
    _q,
    _requant_f64,
    compare_modes,
    int8_simulation,
    plan_simulation,
)


def table_of(amaxes: dict[str, float], meta: dict | None = None) -> CalibrationTable:
    return CalibrationTable({k: TapRange(k, float(v), "test") for k, v in amaxes.items()}, meta=meta)


class Tiny(nn.Module):
    """conv -> relu -> maxpool -> flatten -> fc: every op a module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


class Residual(nn.Module):
    """conv-bn-relu, conv-bn, + shortcut (a module), relu; then avgpool and fc."""

    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.stem_relu = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.shortcut = nn.Identity()
        self.add = Residual.Add()
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem_relu(self.stem(x))
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out = self.relu2(self.add(out, self.shortcut(x)))
        return self.fc(self.flatten(self.pool(out)))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def tiny_data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 8, 8, generator=g)


def tiny_table():
    # ratios between scales far from simple fractions: no exact ties between grids
    return table_of({"data": 1.0, "conv": 1.53, "relu": 1.21, "pool": 1.37, "flatten": 1.37, "fc": 2.03})


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------


def ref_fq(x: torch.Tensor, amax: float) -> torch.Tensor:
    """sign(x) * floor(|x| / s + 1/2), saturated to [-128, 127], times s -- in float64."""
    s = amax / 127.0
    y = x.double() / s
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return q.clamp(-128, 127) * s


def ref_weight(w: torch.Tensor, per_filter: bool) -> torch.Tensor:
    """The compiler's formula in float64: S = max|W| / 127, q = clamp(floor(W / S + 1/2))."""
    w = w.double()
    amax = w.abs().reshape(w.shape[0], -1).amax(1).reshape([-1] + [1] * (w.dim() - 1)) if per_filter else w.abs().max()
    s = amax / 127.0
    return torch.clamp(torch.floor(w / s + 0.5), -128, 127) * s


# ------------------------------------------------------------------------------------------
# fake-quant
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["per-filter", "per-kernel"])
def test_fake_quant_equals_plain_reference(tiny, tiny_data, weights):
    t = tiny_table()
    with torch.no_grad(), int8_simulation(tiny, t, mode="fake", weights=weights):
        got = tiny(tiny_data)
    pf = weights == "per-filter"
    x = ref_fq(tiny_data, 1.0)
    y = ref_fq(F.conv2d(x, ref_weight(tiny.conv.weight, pf), tiny.conv.bias.double(), padding=1), 1.53)
    y = ref_fq(torch.relu(y), 1.21)
    y = ref_fq(F.max_pool2d(y, 2), 1.37)
    y = ref_fq(y.flatten(1), 1.37)
    ref = ref_fq(F.linear(y, ref_weight(tiny.fc.weight, pf), tiny.fc.bias.double()), 2.03)
    assert torch.allclose(got.double(), ref, atol=1e-5), (got.double() - ref).abs().max()
    # every output is an int8 multiple of its scale
    q = got.double() / (2.03 / 127)
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 128


def test_fake_quant_input_and_normalized_taps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    _randomize_bn(model)
    x = torch.randn(4, 2, 6, 6)
    table = calibrate(model, [x], "minmax", taps=TapSelection(inputs=("2",), derived=(BN_NORMALIZED,)), progress=False)
    assert "1:normalized" in table and "2:input" in table
    with torch.no_grad(), int8_simulation(model, table, mode="fake", weights="per-kernel"):
        got = model(x)
    bn = model[1]
    s = lambda t: table[t].amax  # noqa: E731
    y = ref_fq(F.conv2d(ref_fq(x, s("data")), ref_weight(model[0].weight, False), model[0].bias.double()), s("0"))
    xhat = (y - bn.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.double().view(1, -1, 1, 1) + bn.eps)
    y = ref_fq(xhat, s("1:normalized")) * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)
    y = ref_fq(y, s("1"))
    y = ref_fq(torch.relu(ref_fq(y, s("2:input"))), s("2"))
    assert torch.allclose(got.double(), y, atol=1e-5)


def test_modelopt_placement_quantizes_only_conv_fc_inputs_and_weights(tiny, tiny_data):
    t = tiny_table()
    with torch.no_grad(), int8_simulation(tiny, t, mode="fake", placement="modelopt", weights="per-filter"):
        got = tiny(tiny_data)
    x = ref_fq(tiny_data, 1.0)
    y = F.max_pool2d(torch.relu(F.conv2d(x, ref_weight(tiny.conv.weight, True), tiny.conv.bias.double(), padding=1)), 2)
    ref = F.linear(ref_fq(y.flatten(1), 1.37), ref_weight(tiny.fc.weight, True), tiny.fc.bias.double())
    assert torch.allclose(got.double(), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------
# restoring the model
# ------------------------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (p, p.data_ptr()) for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


def _assert_restored(model: nn.Module, snap) -> None:
    state, params, flags = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]) and state[k].dtype == now[k].dtype, k
    for n, p in model.named_parameters():
        assert p is params[n][0] and p.data_ptr() == params[n][1], n
    assert [m.training for m in model.modules()] == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
        assert "forward" not in m.__dict__


@pytest.mark.parametrize("mode,placement", [("fake", "all"), ("fake", "modelopt"), ("fake", "nvdla"), ("nvdla", None)])
def test_context_restores_model_exactly_even_when_forward_raises(tiny, tiny_data, mode, placement):
    tiny.relu.train()  # a mixed train/eval state must come back as it was
    snap = _snapshot(tiny)
    with pytest.raises(RuntimeError):
        with torch.no_grad(), int8_simulation(tiny, tiny_table(), mode=mode, placement=placement,
                                              example=tiny_data[:2]):
            assert not tiny.training or True
            tiny(tiny_data[:, :, :5, :5])  # wrong spatial size: the fc raises
    _assert_restored(tiny, snap)
    with torch.no_grad(), int8_simulation(tiny, tiny_table(), mode=mode, placement=placement):
        tiny(tiny_data)
        raise_inside = False
    _assert_restored(tiny, snap)
    with pytest.raises(KeyboardInterrupt):
        with int8_simulation(tiny, tiny_table(), mode=mode, placement=placement):
            tiny(tiny_data)
            raise KeyboardInterrupt
    _assert_restored(tiny, snap)
    assert raise_inside is False


def test_model_unchanged_outside_and_fp32_when_no_layer_selected(tiny, tiny_data):
    with torch.no_grad():
        before = tiny(tiny_data)
        with int8_simulation(tiny, tiny_table(), mode="nvdla", layers=()):
            same = tiny(tiny_data)
        after = tiny(tiny_data)
    assert torch.equal(before, same) and torch.equal(before, after)


# ------------------------------------------------------------------------------------------
# NVDLA integer arithmetic, by hand
# ------------------------------------------------------------------------------------------


def _mt(r: Fraction) -> tuple[int, int]:
    """m = trunc(r 2^t) with m in [2^14, 2^15) (COMPILER_FACTS.md)."""
    t = 0
    while r * 2**t < 2**14:
        t += 1
    return math.floor(r * 2**t), t


def _round_away(v: Fraction) -> int:
    return int(math.copysign(math.floor(abs(v) + Fraction(1, 2)), v))


@pytest.mark.parametrize("weights", ["per-kernel", "per-filter"])
def test_nvdla_conv_matches_hand_computed_integers(weights):
    conv = nn.Conv2d(1, 2, 2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.5, -0.25], [0.125, 1.0]]], [[[0.2, 0.1], [-0.3, 0.05]]]]))
        conv.bias.copy_(torch.tensor([0.3, -0.2]))
    model = nn.Sequential(conv)
    x = torch.tensor([[[[0.9, -0.4, 0.1], [0.33, 0.7, -1.2], [0.05, 0.5, 0.25]]]])
    amax_in, amax_out = 1.27, 2.54  # S_in = 0.01, S_out = 0.02
    table = table_of({"data": amax_in, "0": amax_out})
    with torch.no_grad(), int8_simulation(model, table, mode="nvdla", weights=weights):
        got = model(x)

    s_in = Fraction(float(torch.tensor(amax_in / 127, dtype=torch.float32)))
    s_out = Fraction(float(torch.tensor(amax_out / 127, dtype=torch.float32)))
    qx = [[_round_away(Fraction(float(v)) / Fraction(amax_in / 127)) for v in row] for row in x[0, 0].tolist()]
    expected = torch.zeros(1, 2, 2, 2)
    w = conv.weight.detach()
    for k in range(2):
        amax_w = float(w.abs().max()) if weights == "per-kernel" else float(w[k].abs().max())
        sw32 = torch.tensor(amax_w, dtype=torch.float32) / 127.0
        inv = 1.0 / sw32
        qw = torch.clamp(torch.floor(w[k, 0] * inv + 0.5), -128, 127).int().tolist()
        b = float(conv.bias[k].detach())
        bq = math.floor(float(torch.tensor(b, dtype=torch.float32) / (torch.tensor(float(s_in), dtype=torch.float32) * sw32)) + 0.5)
        r = Fraction(float(torch.tensor(float(s_in), dtype=torch.float32) / torch.tensor(float(s_out), dtype=torch.float32) * sw32))
        if weights == "per-filter":  # shared shift from the largest ratio
            r_all = []
            for kk in range(2):
                a = torch.tensor(float(w[kk].abs().max()), dtype=torch.float32) / 127.0
                r_all.append(Fraction(float(torch.tensor(float(s_in), dtype=torch.float32) / torch.tensor(float(s_out), dtype=torch.float32) * a)))
            _, t = _mt(max(r_all))
            m = math.floor(r * 2**t)
        else:
            m, t = _mt(r)
        assert 0 < m < 2**15
        for i in range(2):
            for j in range(2):
                acc = sum(qx[i + di][j + dj] * qw[di][dj] for di in range(2) for dj in range(2)) + bq
                y = max(-128, min(127, _round_away(Fraction(acc * m, 2**t))))
                expected[0, k, i, j] = y
    got_q = got / torch.tensor(amax_out / 127, dtype=torch.float32)
    assert torch.equal(got_q.round(), expected), (got_q, expected)
    assert torch.allclose(got_q, got_q.round(), atol=1e-4)


def test_requant_fast_path_equals_reference_requantize():
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-2**31, 2**31 - 1, (4000,), generator=g, dtype=torch.int64)
    acc[:8] = torch.tensor([0, 1, -1, 2**31 - 1, -2**31, 12345, -12345, 7])
    for m, t in [(16384, 14), (21272, 25), (32767, 40), (17596, 24), (16385, 63), (30000, 1)]:
        ref = requantize(acc, m, t, channel_dim=0).to(torch.float64)
        fast = _requant_f64(acc.to(torch.float64), math.ldexp(m, -t), -128.0)
        assert torch.equal(ref, fast), (m, t)
        relu = _requant_f64(acc.to(torch.float64), math.ldexp(m, -t), 0.0)
        assert torch.equal(requantize(acc.clamp_min(0), m, t, channel_dim=0).to(torch.float64), relu)
    # ties: acc * m / 2^t = k + 1/2 exactly rounds away from zero
    acc = torch.tensor([1, -1, 3, -3], dtype=torch.float64)
    assert _requant_f64(acc, 0.5, -128.0).tolist() == [1.0, -1.0, 2.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fast_quantize_equals_reference_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(5)
    s = 0.037
    y = torch.randn(20000, generator=g, dtype=torch.float64) * 60
    ties = torch.arange(-140, 140, dtype=torch.float64) + 0.5
    below = torch.tensor([0.5 - 2**-25, -(0.5 - 2**-25), 0.5 - 2**-54, 2.5 - 2**-22, 127.5, -128.5, 128.49, 1e30,
                          -1e30, 0.0, -0.0, float("inf"), float("-inf")], dtype=torch.float64)
    for vals in (y * s, ties * s, below * s, below, ties):
        x = vals.to(dtype)
        assert torch.equal(_fq(x, s), fake_quant(x, s))
        assert torch.equal(_q(x, s), quantize(x, s).to(torch.float32))
        assert _fq(x, s).dtype == dtype


def test_nvdla_agrees_with_fake_quant_within_one_step(tiny, tiny_data):
    result = compare_modes(tiny, tiny_table(), tiny_data)
    assert set(result) == {"conv", "pool", "fc"}
    for layer, r in result.items():
        assert r["within_one"] >= 0.99, (layer, r)
        assert r["equal"] >= 0.85, (layer, r)


# ------------------------------------------------------------------------------------------
# the NVDLA graph: fusion, pools, the element-wise rule
# ------------------------------------------------------------------------------------------


def test_plan_fuses_and_applies_pool_and_eltwise_rules():
    torch.manual_seed(0)
    model = _randomize_bn(Residual())
    x = torch.randn(8, 2, 6, 6)
    table = calibrate(model, [x], "minmax", progress=False)
    plan = plan_simulation(model, table, x, mode="nvdla")
    layers = {layer.name: layer for layer in plan.layers}
    # The sum's operand created earlier (the block input, stem+relu, read through the
    # Identity shortcut) is written at the later one's scale (conv2+bn2), for every
    # reader: conv1 reads it at that scale too (the compiler's rule).
    assert layers["stem"].taps == ("stem", "stem_relu") and layers["stem"].output_tap == "bn2"
    assert layers["conv1"].taps == ("conv1", "bn1", "relu1") and layers["conv1"].output_tap == "relu1"
    assert layers["conv1"].input_taps == ("bn2",)
    assert layers["conv2"].taps == ("conv2", "bn2") and layers["conv2"].output_tap == "bn2"
    assert layers["add"].taps == ("add", "relu2") and layers["add"].input_taps == ("bn2", "bn2")
    assert layers["add"].output_tap == "relu2"
    assert layers["pool"].input_taps == ("relu2",) and layers["pool"].output_tap == "relu2"
    assert layers["fc"].input_taps == ("relu2",)
    assert "shortcut" not in layers and "flatten" not in layers
    with torch.no_grad(), int8_simulation(model, table, mode="nvdla") as sim:
        out = model(x)
        assert sim.plan.layer_names == plan.layer_names
    q = out / table["fc"].scale
    assert torch.allclose(q, q.round(), atol=1e-3)
    with torch.no_grad():
        ref = model(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75


def test_golden_vector_multipliers_on_caffe_lenet(shared_data):
    from torch_nvdla.models.caffe_lenet import load_caffe_lenet

    model = load_caffe_lenet(shared_data / "caffe-lenet-mnist" / "lenet_iter_10000.npz")
    scales = {"data": 1 / 127, "conv1": 0.06, "pool1": 0.06, "conv2": 0.12, "pool2": 0.12, "ip1": 0.10,
              "relu1": 0.10, "ip2": 0.20, "prob": 1 / 127}
    table = table_of({k: v * 127 for k, v in scales.items()})
    x = torch.rand(2, 1, 28, 28)
    with int8_simulation(model, table, mode="nvdla", weights="per-kernel", example=x) as sim:
        got = {r.layer: (r.m, r.t) for r in sim.requantization()}
        fused = sim.plan.layer("ip1")
    assert got == {"conv1": (21272, 25), "conv2": (32065, 25), "ip1": (32583, 25), "ip2": (17596, 24)}
    assert fused.taps == ("ip1", "relu1") and fused.output_tap == "relu1"


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_missing_taps_are_named_or_run_in_fp32(tiny, tiny_data):
    t = table_of({"data": 1.0, "relu": 1.2, "pool": 1.3, "flatten": 1.3})  # no fc
    with pytest.raises(CalibrationError, match="'fc'") as e:
        with int8_simulation(tiny, t, mode="nvdla"):
            tiny(tiny_data)
    assert "missing='fp32'" in str(e.value)
    with pytest.raises(CalibrationError, match="'fc'"):
        with int8_simulation(tiny, t, mode="fake"):
            tiny(tiny_data)
    with torch.no_grad(), int8_simulation(tiny, t, mode="nvdla", missing="fp32") as sim:
        out = tiny(tiny_data)
        assert sim.plan.fp32_layers == ("fc",)
        assert ("fc", "fc") in sim.missing
    assert out.shape == (16, 5)


def test_table_of_another_model_is_refused(tiny, tiny_data):
    other = table_of({"data": 1.0, "features.0": 1.0, "features.1": 1.0, "classifier": 2.0, "fc": 1.0})
    with pytest.raises(CalibrationError, match="different model"):
        with int8_simulation(tiny, other):
            tiny(tiny_data)
    stamped = CalibrationTable(dict(tiny_table()._ranges), meta={"cache_key": {"fingerprint": "0123456789abcdef"}})
    with pytest.raises(CalibrationError, match="fingerprint"):
        with int8_simulation(tiny, stamped):
            tiny(tiny_data)
    with torch.no_grad(), int8_simulation(tiny, stamped, check_model=False):
        tiny(tiny_data)


def test_integer_input_and_bad_options_are_clear_errors(tiny, tiny_data):
    with pytest.raises(CalibrationError, match="'data'.*uint8"):
        with int8_simulation(tiny, tiny_table()):
            tiny((tiny_data * 255).to(torch.uint8))
    with pytest.raises(CalibrationError, match="mode"):
        with int8_simulation(tiny, tiny_table(), mode="int4"):
            pass
    with pytest.raises(CalibrationError, match="placement"):
        with int8_simulation(tiny, tiny_table(), mode="nvdla", placement="all"):
            pass
    with pytest.raises(CalibrationError, match="unknown layer"):
        with int8_simulation(tiny, tiny_table(), mode="nvdla", layers=["nope"], example=tiny_data):
            pass
    with pytest.raises(CalibrationError, match="CalibrationTable"):
        with int8_simulation(tiny, [1, 2]):
            pass


def test_tap_naming_matches_calibration():
    assert tap_name("layer1.0.relu", 0) == "layer1.0.relu" and tap_name("layer1.0.relu", 2) == "layer1.0.relu#2"

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc(self.relu(x)))

    model = Twice().eval()
    x = torch.randn(5, 4)
    table = calibrate(model, [x], "minmax", progress=False)
    assert set(table) == {"data", "relu", "fc", "relu#1"}
    plan = plan_simulation(model, table, x, mode="nvdla")
    assert [c.tap for c in plan.calls] == ["relu", "fc", "relu#1"]
    assert plan.layer("fc").taps == ("fc", "relu#1")


# ------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_caffe_lenet_int8_drop_on_mnist(shared_data):
    from torch_nvdla.zoo.registry import get_dataset, get_model

    model = get_model("caffe-lenet")
    data = get_dataset("mnist")
    table = calibrate(model, data.loader("calibration", 250), "entropy", progress=False)
    xs, ys = data.evaluation
    xs, ys = xs[::3], ys[::3]  # 3167 images spread over the evaluation split
    with torch.no_grad():
        fp32 = (model(xs).argmax(1) == ys).double().mean().item() * 100
        for mode in ("fake", "nvdla"):
            with int8_simulation(model, table, mode=mode, weights="per-kernel"):
                int8 = (model(xs).argmax(1) == ys).double().mean().item() * 100
            assert fp32 - int8 <= 0.25, (mode, fp32, int8)


@pytest.mark.slow
def test_cifar_resnet20_graph_and_int8_agreement(shared_data):
    from torch_nvdla.zoo.registry import get_dataset, get_model

    model = get_model("cifar-resnet20")
    data = get_dataset("cifar10")
    xs, _ = data.evaluation
    xs = xs[::95]  # 100 images, every class
    table = calibrate(model, data.loader("calibration", 50, limit=50), "minmax", progress=False)
    with torch.no_grad(), int8_simulation(model, table, mode="nvdla", weights="per-filter", example=xs[:2]) as sim:
        plan = sim.plan
        out = model(xs)
        ref_layers = plan.layer_names
    assert len(plan.layers) == 32 and ref_layers[0] == "conv1"
    # option-A shortcut: exported as a 1x1 conv, a layer created after the branch: the
    # branch (created earlier) writes at the shortcut's scale (the compiler's rule)
    down = plan.layer("layer2.0.add")
    assert down.input_taps == ("layer2.0.shortcut", "layer2.0.shortcut") and down.output_tap == "layer2.1.bn2"
    assert plan.layer("layer2.0.conv2").output_tap == "layer2.0.shortcut"
    assert plan.layer("layer2.0.conv1").taps == ("layer2.0.conv1", "layer2.0.bn1", "layer2.0.relu1")
    # identity blocks: the block input (created earlier) takes the branch's scale
    assert plan.layer("layer1.0.add").input_taps == ("layer1.0.bn2", "layer1.0.bn2")
    assert plan.layer("avgpool").input_taps == ("layer3.2.relu2",)
    assert plan.calls[plan.call_index("layer2.0.shortcut")].kind == "generic"
    with torch.no_grad():
        ref = model(xs)
    assert (out.argmax(1) == ref.argmax(1)).double().mean() >= 0.9
    q = out / table["linear"].scale
    assert torch.allclose(q, q.round(), atol=1e-3)


def test_unrepresentable_ratio_names_the_layer(tiny, tiny_data):
    t = table_of({"data": 1.0, "conv": 1e-30 * 127, "relu": 1e-30 * 127, "pool": 1.37, "flatten": 1.37, "fc": 2.03})
    snap = _snapshot(tiny)
    with pytest.raises(CalibrationError, match="layer 'conv'"):
        with int8_simulation(tiny, t, mode="nvdla"):
            tiny(tiny_data)
    _assert_restored(tiny, snap)
