"""The measured NVDLA compiler golden vector (shared/nvdla/COMPILER_FACTS.md) and its failure modes.

LeNet (the trained BVLC caffemodel, read by ``import_caffe``) with the hand-written table
data 1/127, conv1 0.06, pool1 0.06, conv2 0.12, pool2 0.12, ip1 0.10, relu1 0.10,
ip2 0.20, prob 1/127 must requantize exactly as the compiler does (fast-math,
per-kernel): conv1 21272 >> 25, conv2 32065 >> 25, ip1 (+relu1 fused: it writes at
relu1's scale) 32583 >> 25, ip2 17596 >> 24. ``torch-nvdla check`` must catch every
table the compiler crashes on, before it does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from torch_nvdla.caffe.importer import import_caffe
from torch_nvdla.calib.table import CalibrationTable, TapRange
from torch_nvdla.cli import main
from torch_nvdla.nvdla.calibjson import calib_json_object
from torch_nvdla.nvdla.requant import multiplier_shift, rescale_ratio
from torch_nvdla.sim.simulate import int8_simulation

GOLDEN_SCALES = {
    "data": 1 / 127, "conv1": 0.06, "pool1": 0.06, "conv2": 0.12, "pool2": 0.12,
    "ip1": 0.10, "relu1": 0.10, "ip2": 0.20, "prob": 1 / 127,
}  # fmt: skip
#: Sw = max|W| / 127 of the caffemodel, as the compiler printed it.
GOLDEN_SW = {"conv1": 0.00483075, "conv2": 0.00191125, "ip1": 0.000809228, "ip2": 0.00209765}
#: layer -> (input entry, output entry, m, t); ip1's output is relu1's (fused ReLU).
GOLDEN_MT = {
    "conv1": ("data", "conv1", 21272, 25),
    "conv2": ("conv1", "conv2", 32065, 25),  # pool1 keeps conv1's scale (no rescale in the PDP)
    "ip1": ("conv2", "relu1", 32583, 25),
    "ip2": ("relu1", "ip2", 17596, 24),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lenet_dir(request):
    return request.getfixturevalue("shared_data") / "caffe-lenet-mnist"


@pytest.fixture(scope="module")
def lenet(lenet_dir):
    return import_caffe(lenet_dir / "lenet.prototxt", lenet_dir / "lenet_iter_10000.caffemodel",
                        input_shape=(1, 1, 28, 28))


def golden_table() -> CalibrationTable:
    return CalibrationTable({k: TapRange(k, s * 127.0, "golden") for k, s in GOLDEN_SCALES.items()})


def test_weight_scales_of_the_caffemodel(lenet):
    for name, sw in GOLDEN_SW.items():
        w = getattr(lenet, name).weight.detach()
        got = float(np.float32(w.abs().max().item()) / np.float32(127.0))
        assert f"{got:.6g}" == f"{sw:.6g}", (name, got)  # printed with 6 significant digits


def test_simulation_reproduces_the_compiler_multipliers(lenet):
    table = golden_table()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with int8_simulation(lenet, table, mode="nvdla", weights="per-kernel", example=x) as sim:
        plan = sim.plan
        assert [layer.name for layer in plan.layers] == ["conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
        # the fusion rule: ip1 + relu1 is one operation writing at relu1's scale
        assert plan.layer("ip1").taps == ("ip1", "relu1")
        for i, layer in enumerate(plan.layers):
            if layer.kind == "softmax":  # the runtime's CPU emulator: INT8 in (ip2), INT8 out (prob)
                assert (layer.input_taps, layer.output_tap) == (("ip2",), "prob")
                continue
            if layer.name not in GOLDEN_MT:
                assert layer.kind == "maxpool" and layer.output_tap == layer.input_taps[0]  # pool = producer
                continue
            s_in, s_out, m, t = GOLDEN_MT[layer.name]
            assert (layer.input_taps, layer.output_tap) == ((s_in,), s_out), layer.name
            # the multiplier and shift the simulation's converter actually applies
            applied = {r.layer: (r.m, r.t) for r in sim.requantization()}
            assert applied[layer.name] == (m, t), layer.name
            # ... which is multiplier_shift of the compiler's float32 ratio (S_in / S_out) * Sw
            sw = float(np.float32(getattr(lenet, layer.name).weight.detach().abs().max().item()) / np.float32(127))
            r = rescale_ratio(table[s_in].scale, sw, table[s_out].scale, float32=True)
            assert multiplier_shift(r, float32=True) == (m, t), layer.name
        with torch.no_grad():
            q = lenet(x)
    # the emulator truncates each probability to a multiple of S_prob: 10 classes lose < 10 steps
    steps = q.double() / np.float32(table["prob"].scale)
    assert q.shape == (4, 10) and torch.allclose(steps, steps.round(), rtol=0, atol=1e-4) and steps.min() >= 0
    assert ((q.sum(1) <= 1 + 1e-6) & (q.sum(1) > 1 - 10 * table["prob"].scale)).all()


def _write(path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) if not isinstance(obj, str) else obj)


def _check(capsys, calib, prototxt, *extra):
    rc = main(["check", str(calib), "--prototxt", str(prototxt), "--json", *extra])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else None)


def test_check_accepts_the_golden_table_and_prints_its_multipliers(lenet_dir, tmp_path, capsys):
    calib = tmp_path / "calib.json"
    _write(calib, calib_json_object(GOLDEN_SCALES))
    rc, result = _check(capsys, calib, lenet_dir / "lenet.prototxt", "--blobs", str(lenet_dir / "lenet_iter_10000.npz"))
    assert rc == 0 and result["ok"] and result["layers"] == 9
    requant = {f["layer"]: f["message"] for f in result["findings"] if f["rule"] == "requant"}
    for name, (_, _, m, t) in GOLDEN_MT.items():
        assert f"{m} >> {t}" in requant[name], (name, requant[name])


FAILURES = {
    # case: (mutation of the golden object, rule that must be reported, layer it names)
    "missing key": (lambda o: o.pop("pool2"), "missing", "pool2"),
    "zero scale": (lambda o: o["conv2"].update(scale=0), "zero-scale", "conv2"),
    "scale 1e30": (lambda o: o["conv1"].update(scale=1e30), "unrepresentable", None),
    "scale 1e-30": (lambda o: o["conv1"].update(scale=1e-30), "unrepresentable", None),
    "string scale": (lambda o: o["ip1"].update(scale="0.1"), "scale-type", "ip1"),
    "entry not an object": (lambda o: o.update(ip2=0.2), "entry-type", "ip2"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_check_catches_what_crashes_the_compiler(case, lenet_dir, tmp_path, capsys):
    mutate, rule, layer = FAILURES[case]
    obj = calib_json_object(GOLDEN_SCALES)
    mutate(obj)
    calib = tmp_path / "calib.json"
    _write(calib, obj)
    rc, result = _check(capsys, calib, lenet_dir / "lenet.prototxt")
    assert rc == 1 and not result["ok"]
    hits = [f for f in result["findings"] if f["level"] == "error" and f["rule"] == rule]
    assert hits, result["findings"]
    if layer is not None:
        assert any(f["layer"] == layer for f in hits)


def test_check_catches_a_top_level_array_and_an_upper_case_path(lenet_dir, tmp_path, capsys):
    calib = tmp_path / "calib.json"
    _write(calib, [{"scale": s} for s in GOLDEN_SCALES.values()])
    rc = main(["check", str(calib), "--prototxt", str(lenet_dir / "lenet.prototxt")])
    assert rc == 1 and "top-level value is an array" in capsys.readouterr().err
    upper = tmp_path / "Calib.json"
    _write(upper, calib_json_object(GOLDEN_SCALES))
    rc, result = _check(capsys, upper, lenet_dir / "lenet.prototxt")
    assert rc == 1 and [f["rule"] for f in result["findings"] if f["level"] == "error"] == ["uppercase-path"]
