"""The real NVDLA compiler as the oracle: every multiplier, shift and bias it programs for
a network calibrated here must be the one the NVDLA-integer simulation applies.

Skips where ``../shared/nvdla/compiler`` (or ``$TORCH_NVDLA_COMPILER``) is absent; every
compiler run has a time limit.
"""

from __future__ import annotations

from itertools import groupby

import pytest
import torch

from torch_nvdla.nvdla.compiler import compile_caffe, find_compiler

COMPILER = find_compiler(debugquant=True)
pytestmark = [
    pytest.mark.skipif(COMPILER is None, reason="the NVDLA compiler is not at ../shared/nvdla/compiler "
                                                "(set $TORCH_NVDLA_COMPILER to its folder)"),
    pytest.mark.usefixtures("one_thread"),
]
TIMEOUT = 120


def _compiler_layers(result) -> list[tuple[int | tuple[int, ...], int]]:
    """The compiler's conv / fc converters, one ``(m, t)`` per op (a tuple of m per filter)."""
    out = []
    for _, lines in groupby((r for r in result.requant if r.kind == "conv"), key=lambda r: r.op):
        lines = list(lines)
        assert len({r.t for r in lines}) == 1  # per-filter: one shared shift
        ms = tuple(r.m for r in lines)
        out.append((ms[0] if len(ms) == 1 else ms, lines[0].t))
    return out


def _sim_layers(requant, kinds=("conv", "fc")):
    return [(r.m, r.t) for r in requant if r.kind in kinds]


def _sim_biases(requant):
    return [(v, r.bias[1]) for r in requant if r.kind in ("conv", "fc") and r.bias for v in r.bias[0]]


@pytest.fixture(scope="module")
def lenet(shared_data, tmp_path_factory):
    """The BVLC LeNet (real caffemodel), calibrated here on MNIST, and its calib.json."""
    from torch_nvdla.caffe.importer import import_caffe
    from torch_nvdla.nvdla.calibjson import export_calib_json
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla
    from torch_nvdla.zoo.registry import get_dataset

    folder = shared_data / "caffe-lenet-mnist"
    model = import_caffe(folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel", input_shape=(1, 1, 28, 28))
    data = get_dataset("mnist")
    table, names = calibrate_for_nvdla(model, data.loader("calibration", 100, limit=300), "generic", progress=False)
    calib = export_calib_json(table, tmp_path_factory.mktemp("lenet") / "calib.json", names, show=False).path
    x = data.calibration[0][:8]
    return model, table, folder, calib, x


@pytest.mark.parametrize("weights", ["per-kernel", "per-filter"])
def test_lenet_every_multiplier_shift_and_bias_equals_the_compilers(lenet, weights):
    from torch_nvdla.sim.simulate import int8_simulation

    model, table, folder, calib, x = lenet
    result = compile_caffe(folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel", calib,
                           weights=weights, timeout=TIMEOUT)
    assert result.ok, result.log[-2000:]
    with int8_simulation(model, table, mode="nvdla", weights=weights, placement="nvdla", example=x) as sim:
        requant = sim.requantization()
    assert _compiler_layers(result) == _sim_layers(requant)
    assert len(_compiler_layers(result)) == 4 and len(result.biases) == 20 + 50 + 500 + 10
    assert [(b.q16, b.shift) for b in result.biases] == _sim_biases(requant)


@pytest.mark.parametrize("profile, weights", [("basic", "per-kernel"), ("fast-math", "per-kernel")])
@pytest.mark.parametrize("target", ["nv_full", "nv_small"])
def test_lenet_compiles_for_every_target_and_profile(lenet, profile, weights, target):
    model, table, folder, calib, x = lenet
    result = compile_caffe(folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel", calib,
                           profile=profile, weights=weights, target=target, timeout=TIMEOUT)
    assert result.ok, result.log[-2000:]


def test_compile_caffe_reports_a_failure_and_a_missing_compiler(lenet, tmp_path, monkeypatch):
    from torch_nvdla.errors import CalibrationError
    from torch_nvdla.nvdla import compiler as comp

    model, table, folder, calib, x = lenet
    bad = tmp_path / "calib.json"
    bad.write_text('{"data": {"scale": 0.1}}')  # every other key missing: the compiler aborts
    result = compile_caffe(folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel", bad, timeout=TIMEOUT)
    assert not result.ok and result.returncode != 0
    monkeypatch.setattr(comp, "find_compiler", lambda debugquant=False: None)
    with pytest.raises(CalibrationError, match="compiler was not found"):
        comp.compile_caffe(folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel", calib)


def test_parse_debugquant_reads_every_line_kind():
    from torch_nvdla.nvdla.compiler import parse_debugquant

    text = "\n".join([
        "libnvdla<3> rawBias/Si*Sw -0.0180576 /  ( 0.00784326 * 0.00483075 ) = -476.593 -> -477 -> -477*2^-0",
        "libnvdla<3> bias-0 Si * Sw / So = 0.00784326 * 0.00483075 / 0.019562 = 32495* 2^-24",
        "libnvdla<3> bias-3 Si * Sw[k] / So = 0.0806471 * 0.00209765 / 0.218215 = 26012* 2^-25",
        "libnvdla<3> sdp-bn-0 Si * V[k] / So = 0.0787402 * 0.411074 / 0.0239911 = 22104* 2^-14",
        "libnvdla<3> Si / So = 0.0239911 / 0.0308501 = 25482* 2^-15",
        "libnvdla<2> Overriding output multibatch size from 1 to 64",
    ])
    requant, biases = parse_debugquant(text)
    assert [(r.op, r.kind, r.m, r.t) for r in requant] == [
        ("bias-0", "conv", 32495, 24), ("bias-3", "conv", 26012, 25), ("sdp-bn-0", "bn", 22104, 14),
        ("", "eltwise", 25482, 15)]
    assert requant[3].s_in == 0.0239911 and requant[3].s_out == 0.0308501
    assert [(b.q, b.q16, b.shift) for b in biases] == [(-477, -477, 0)]


@pytest.fixture(scope="module")
def resnet20(shared_data, tmp_path_factory):
    """CIFAR ResNet-20 (trained), calibrated here for the Caffe export, and its export."""
    from torch_nvdla.calib.calibrate import calibrate
    from torch_nvdla.export.caffe import caffe_tap_selection, export_caffe
    from torch_nvdla.zoo.registry import get_dataset, get_model

    model = get_model("cifar-resnet20")
    data = get_dataset("cifar10")
    x = data.calibration[0][:8]
    table = calibrate(model, data.loader("calibration", 100, limit=200),
                      taps=caffe_tap_selection(model, example_input=x[:2]), progress=False)
    out = export_caffe(model, table, tmp_path_factory.mktemp("r20"), example_input=x)
    return model, table, out, x


def _ops(result):
    """Every conv / fc and element-wise converter of the compiler, in order: (kind, m, t);
    per-filter, ``m`` is the tuple of every filter's multiplier."""
    out = []
    for (op, kind), lines in groupby((r for r in result.requant if r.kind != "bn"), key=lambda r: (r.op, r.kind)):
        lines = list(lines)
        ms = tuple(r.m for r in lines)
        out.append(("eltwise" if kind == "eltwise" else "conv", ms[0] if len(ms) == 1 else ms, lines[0].t))
    return out


def test_resnet20_every_multiplier_shift_and_bias_equals_the_compilers(resnet20):
    """The element-wise rule as the compiler applies it: the operand created earlier in
    the prototxt takes the later one's scale (identity blocks: the block input; option-A
    blocks: the branch), so every conv, sum and bias matches (feature input: the image
    input's first conv is compiled differently, see the next test)."""
    from torch_nvdla.sim.simulate import int8_simulation

    model, table, out, x = resnet20
    result = compile_caffe(out.prototxt, out.caffemodel, out.calib_json, informat="nchw", timeout=TIMEOUT)
    assert result.ok, result.log[-2000:]
    with int8_simulation(model, table, mode="nvdla", weights="per-kernel", placement="nvdla", example=x) as sim:
        requant = sim.requantization()
    ours = [("eltwise" if r.kind == "eltwise" else "conv", r.m, r.t) for r in requant if r.kind in ("conv", "fc", "eltwise")]
    assert len(ours) == 29 and sum(k == "eltwise" for k, _, _ in ours) == 9
    assert _ops(result) == ours
    assert [(b.q16, b.shift) for b in result.biases] == _sim_biases(requant) and result.biases


@pytest.mark.parametrize("weights", ["per-kernel", "per-filter"])
def test_folded_batchnorm_export_from_a_default_calibration_compiles_to_the_simulated_program(
        shared_data, tmp_path, weights):
    """``fold_batchnorm=True`` writes each BatchNorm into its convolution: a default
    calibration has every range, no BatchNorm / Scale layer is written, and every
    converter, sum and bias the compiler programs (fast-math) is the simulation's."""
    from torch_nvdla.calib.calibrate import calibrate
    from torch_nvdla.export.caffe import export_caffe
    from torch_nvdla.sim.simulate import int8_simulation
    from torch_nvdla.zoo.registry import get_dataset, get_model

    model = get_model("cifar-resnet20")
    data = get_dataset("cifar10")
    x = data.calibration[0][:8]
    table = calibrate(model, data.loader("calibration", 100, limit=200), progress=False)
    assert not any(t.endswith(":normalized") for t in table)
    out = export_caffe(model, table, tmp_path / "caffe", example_input=x, fold_batchnorm=True)
    text = out.prototxt.read_text()
    assert '"BatchNorm"' not in text and '"Scale"' not in text
    result = compile_caffe(out.prototxt, out.caffemodel, out.calib_json, informat="nchw", weights=weights,
                           timeout=TIMEOUT)
    assert result.ok, result.log[-2000:]
    with int8_simulation(model, table, mode="nvdla", weights=weights, placement="nvdla", example=x) as sim:
        requant = sim.requantization()
    ours = [("eltwise" if r.kind == "eltwise" else "conv", r.m, r.t) for r in requant if r.kind in ("conv", "fc", "eltwise")]
    assert _ops(result) == ours and len(ours) == 29
    assert [(b.q16, b.shift) for b in result.biases] == _sim_biases(requant) and len(result.biases) == 698


def test_cli_export_caffe_compiles_what_it_published(tmp_path, capsys, monkeypatch):
    from torch_nvdla.cli import main
    from torch_nvdla.nvdla import compiler as comp

    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert main(["export-caffe", "--num-images", "100", "-o", str(out), "--compile"]) == 0
    err = capsys.readouterr().err
    flat = "".join(err.split())
    assert "compiled:" in err and "--quantizationModeper-kernel--informatnchw" in flat
    monkeypatch.setattr(comp, "find_compiler", lambda debugquant=False: None)
    assert main(["export-caffe", "--num-images", "100", "-o", str(tmp_path / "again"), "--compile"]) == 1
    err = capsys.readouterr().err
    assert "compiler was not found" in err and (tmp_path / "again" / "calib.json").is_file()


class _Add(torch.nn.Module):
    def forward(self, a, b):
        return a + b


class _PoolResidual(torch.nn.Module):
    """A ResNet stem: conv-bn-relu, then a 3x3/2 max pool whose Caffe size rounds up (the
    export subsamples it with a fixed 1x1 conv), then an identity residual block."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.add, self.relu3 = _Add(), nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(x)))))
        return self.fc(torch.flatten(self.relu3(self.add(y, x)), 1))


def test_subsampled_pool_takes_the_sums_scale_like_the_compiler(tmp_path):
    """The pool's subsampling conv is created before the block: the element-wise rule
    gives it the block's scale, and it requantizes there (the compiler's program)."""
    from torch_nvdla.calib.calibrate import calibrate
    from torch_nvdla.export.caffe import caffe_tap_selection, export_caffe
    from torch_nvdla.sim.simulate import int8_simulation

    torch.manual_seed(0)
    model = _PoolResidual().eval()
    for bn in (model.bn1, model.bn2, model.bn3):
        torch.nn.init.uniform_(bn.running_var, 0.5, 2.0)
        torch.nn.init.uniform_(bn.running_mean, -0.3, 0.3)
    x = torch.randn(8, 3, 16, 16)
    table = calibrate(model, [x], "minmax", taps=caffe_tap_selection(model, example_input=x[:1]), progress=False)
    out = export_caffe(model, table, tmp_path / "e", example_input=x[:2])
    result = compile_caffe(out.prototxt, out.caffemodel, out.calib_json, informat="nchw", timeout=TIMEOUT)
    assert result.ok, result.log[-2000:]
    with int8_simulation(model, table, mode="nvdla", placement="nvdla", example=x[:2]) as sim:
        requant = sim.requantization()
        assert sim.plan.calls[sim.plan.call_index("pool")].subsampled
        assert sim.plan.layer("pool").output_tap == "bn3"  # created earlier than bn3: takes its scale
    ours = [("eltwise" if r.kind == "eltwise" else "conv", r.m, r.t) for r in requant if r.kind != "relu"]
    assert _ops(result) == ours and len(ours) == 6  # conv1, pool's 1x1, conv2, conv3, sum, fc
    assert [(b.q16, b.shift) for b in result.biases] == [
        (v, r.bias[1]) for r in requant if r.kind != "eltwise" and r.bias for v in r.bias[0]]


@pytest.mark.parametrize("channels, outputs, target", [
    (1024, 16, "nv_full"), (1024, 17, "nv_full"), (1024, 32, "nv_full"),
    (1024, 16, "nv_large"), (1024, 20, "nv_large"), (1024, 32, "nv_large"),
    (512, 8, "nv_small"), (1024, 8, "nv_small"),
])
def test_weight_bank_rule_predicts_the_compilers_verdict(tmp_path, channels, outputs, target):
    """A fully-connected layer on a (channels, 4, 4) input: the export refuses exactly the
    sizes the compiler fails on ("Not enough banks to hold weight data")."""
    from torch import nn

    from torch_nvdla.export.caffe import CaffeExportError, convert_to_caffe, export_caffe
    from torch_nvdla.nvdla.calibjson import export_calib_json
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla
    from torch_nvdla.nvdla.rules import hardware_issues

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 1), nn.ReLU(), nn.Flatten(), nn.Linear(channels * 16, outputs))
    x = torch.randn(4, 3, 4, 4)
    table, names = calibrate_for_nvdla(model, [x], "generic", progress=False)
    conversion = convert_to_caffe(model, (1, 3, 4, 4))
    refused = [i for i in hardware_issues(conversion.net, target) if i.rule == "cbuf-weights"]
    (tmp_path / "deploy.prototxt").write_text(conversion.prototxt_text())
    (tmp_path / "model.caffemodel").write_bytes(conversion.caffemodel_bytes())
    export_calib_json(table, tmp_path / "calib.json", conversion.nvdla_names(table), show=False)
    result = compile_caffe(tmp_path / "deploy.prototxt", tmp_path / "model.caffemodel", tmp_path / "calib.json",
                           target=target, timeout=TIMEOUT)
    assert result.ok == (not refused), result.log[-1500:]
    if refused:
        assert "Not enough banks to hold weight data" in result.log
        with pytest.raises(CaffeExportError, match="convolution buffer"):
            export_caffe(model, table, tmp_path / "refused", input_shape=(1, 3, 4, 4), target=target)
        assert not (tmp_path / "refused" / "deploy.prototxt").exists()


def test_relu6_exports_as_a_capped_relu_the_compiler_and_simulation_agree_on(tmp_path):
    """ReLU6 is written as a Caffe ReLU whose entry is at most 6 (INT8 saturation caps it):
    it compiles, and every converter the compiler programs is the simulation's."""
    import json

    from torch import nn

    from torch_nvdla import calibrate
    from torch_nvdla.export.caffe import caffe_tap_selection, export_caffe
    from torch_nvdla.sim.simulate import int8_simulation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(0.05)  # so the BN output reaches past 6
    x = torch.randn(16, 3, 8, 8) * 3
    table = calibrate(model, [x], taps=caffe_tap_selection(model, (1, 3, 8, 8)), progress=False)
    assert table["2"].amax == 6.0 and table["1"].amax > 6.0
    ex = export_caffe(model, table, tmp_path / "caffe", input_shape=(1, 3, 8, 8))
    text = ex.prototxt.read_text()
    assert "ReLU6" not in text and text.count('type: "ReLU"') == 2
    assert all(v["scale"] <= 6.0 / 127 * (1 + 1e-9) for k, v in json.loads(ex.calib_json.read_text()).items()
               if k in ("2", "4"))
    result = compile_caffe(ex.prototxt, ex.caffemodel, ex.calib_json, informat="nchw", timeout=TIMEOUT)
    assert result.ok, result.log[-1500:]
    with torch.no_grad(), int8_simulation(model, table, mode="nvdla", example=x) as sim:
        requant = sim.requantization()
        q = model(x)
    assert _compiler_layers(result) == _sim_layers(requant)
    ref = model(x)
    assert (q.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_deconvolution_and_nearest_upsampling_export_and_compile(tmp_path):
    """ConvTranspose2d -> Deconvolution; nearest Upsample -> a fixed identity Deconvolution
    (exact: the read-back verification compares every layer); the compiler accepts both."""
    from torch import nn

    from torch_nvdla import calibrate
    from torch_nvdla.export.caffe import export_caffe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2),
                          nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(8, 3, 16, 16)
    table = calibrate(model, [x], progress=False)
    ex = export_caffe(model, table, tmp_path / "caffe", input_shape=(1, 3, 16, 16))
    assert ex.prototxt.read_text().count('type: "Deconvolution"') == 2
    assert ex.conversion.max_abs_diff <= 1e-4 * ex.conversion.output_max_abs
    result = compile_caffe(ex.prototxt, ex.caffemodel, ex.calib_json, informat="nchw", timeout=TIMEOUT)
    assert result.ok, result.log[-1500:]
