"""Tap -> NVDLA layer names: presets (Caffe LeNet, torchvision ResNets), generic, overrides."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch_nvdla.models.caffe_lenet import CaffeLeNet
from torch_nvdla.models.resnet_cifar import ResNetCifar

from torch_nvdla import BN_NORMALIZED, CalibrationError, TapSelection, calibrate
from torch_nvdla.nvdla.naming import (
    SOFTMAX_AMAX,
    LayerName,
    NvdlaNames,
    caffe_lenet_names,
    calibrate_for_nvdla,
    detect_preset,
    generic_layer_name,
    resnet_caffe_names,
    trace_producers,
)

LENET = ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]

# The first 22 layers of He et al.'s ResNet-50-deploy.prototxt, in file order.
RESNET50_HEAD = [
    "data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1",
    "res2a_branch1", "bn2a_branch1", "scale2a_branch1",
    "res2a_branch2a", "bn2a_branch2a", "scale2a_branch2a", "res2a_branch2a_relu",
    "res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b", "res2a_branch2b_relu",
    "res2a_branch2c", "bn2a_branch2c", "scale2a_branch2c", "res2a", "res2a_relu",
]  # fmt: skip


def _resnet(fn):
    torch.manual_seed(0)
    return fn(weights=None).eval()


def test_caffe_lenet_preset_is_exactly_the_prototxt_layers():
    model = CaffeLeNet()
    assert detect_preset(model) == "caffe-lenet"
    names = NvdlaNames.for_model(model)
    assert names.preset == "caffe-lenet"
    assert names.names() == LENET
    assert names.tap_to_name() == {n: n for n in LENET}
    assert names["pool1"].kind == "pool" and names["pool1"].inputs == ("conv1",)
    assert names["ip1"].module == "ip1" and names["ip1"].inputs == ("pool2",)
    assert names.selection.inputs == () and names.selection.derived == ()


def test_caffe_lenet_preset_rejects_other_models():
    with pytest.raises(CalibrationError, match="not a Caffe LeNet.*conv1"):
        caffe_lenet_names(nn.Sequential(nn.Linear(2, 2)))


def test_resnet50_has_229_layers_in_caffe_order():
    model = _resnet(torchvision.models.resnet50)
    assert detect_preset(model) == "resnet-caffe"
    names = resnet_caffe_names(model)
    got = names.names()
    assert len(got) == 229 and len(set(got)) == 229
    assert got[:22] == RESNET50_HEAD
    assert got[-5:] == ["res5c", "res5c_relu", "pool5", "fc1000", "prob"]
    assert names["res2a"].tap == "layer1.0.relu#2:input"
    assert names["res2a"].kind == "eltwise" and names["res2a"].inputs == ("scale2a_branch1", "scale2a_branch2c")
    assert names["res2b"].inputs == ("res2a_relu", "scale2b_branch2c")
    assert names["res2a_relu"].tap == "layer1.0.relu#2"
    assert names["res2a_branch2b_relu"].tap == "layer1.0.relu#1"
    assert names["bn_conv1"].tap == "bn1:normalized" and names["scale_conv1"].tap == "bn1"
    assert names["bn2a_branch1"].tap == "layer1.0.downsample.1:normalized"
    assert names["pool1"].inputs == ("conv1_relu",) and names["pool5"].inputs == ("res5c_relu",)
    prob = names["prob"]
    assert prob.tap is None and prob.amax == SOFTMAX_AMAX == 1.0 and "[0, 1]" in prob.note
    # stage letters: res3 a..d, res4 a..f, res5 a..c
    stages = {s: sorted({n[4] for n in got if n.startswith(f"res{s}") and n.endswith("_relu") and "branch" not in n})
              for s in (2, 3, 4, 5)}
    assert stages == {2: list("abc"), 3: list("abcd"), 4: list("abcdef"), 5: list("abc")}
    assert names.selection.inputs == ("layer*.relu#2",) and names.selection.derived == (BN_NORMALIZED,)


def test_resnet18_basic_blocks_have_two_branches():
    names = resnet_caffe_names(_resnet(torchvision.models.resnet18))
    got = names.names()
    assert len(got) == 90
    assert not any("branch2c" in n for n in got)
    assert "res2a_branch1" not in got and "res3a_branch1" in got
    block = [n for n in got if n.startswith(("res2a", "bn2a", "scale2a"))]
    assert block == ["res2a_branch2a", "bn2a_branch2a", "scale2a_branch2a", "res2a_branch2a_relu",
                     "res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b", "res2a", "res2a_relu"]
    assert names["res2a"].tap == "layer1.0.relu#1:input"
    assert names["res2a"].inputs == ("pool1", "scale2a_branch2b")
    assert names.selection.inputs == ("layer*.relu#1",)


def test_resnet34_uses_letters():
    got = resnet_caffe_names(_resnet(torchvision.models.resnet34)).names()
    assert "res4f_relu" in got and "res3d_relu" in got and "res4b1" not in got


@pytest.mark.parametrize("fn, res3, res4", [
    (torchvision.models.resnet101, ["a", "b1", "b2", "b3"], ["a"] + [f"b{i}" for i in range(1, 23)]),
    (torchvision.models.resnet152, ["a"] + [f"b{i}" for i in range(1, 8)], ["a"] + [f"b{i}" for i in range(1, 36)]),
])
def test_deep_resnets_number_res3_res4_blocks(fn, res3, res4):
    got = resnet_caffe_names(fn(weights=None)).names()

    def blocks(stage):
        return [n[4:-5] for n in got if n.startswith(f"res{stage}") and n.endswith("_relu") and "branch" not in n]

    assert blocks(2) == ["a", "b", "c"] and blocks(5) == ["a", "b", "c"]
    assert blocks(3) == res3 and blocks(4) == res4
    assert "res4b22_branch2c" in got and "scale4b22_branch2c" in got


def test_overrides_by_tap_by_name_callable_and_drop():
    names = caffe_lenet_names()
    renamed = names.with_overrides({"conv1": "c1", "pool1": "p1", "nonexistent": "x", "prob": None})
    assert renamed.names() == ["data", "c1", "p1", "conv2", "pool2", "ip1", "relu1", "ip2"]
    assert renamed["p1"].inputs == ("c1",) and renamed["conv2"].inputs == ("p1",)
    assert renamed.unmatched_overrides == ("nonexistent",)
    assert renamed.dropped == ("prob",)
    upper = names.with_overrides(lambda name, tap: name.upper() if tap != "data" else name)
    assert upper.names()[:3] == ["data", "CONV1", "POOL1"]
    with pytest.raises(CalibrationError, match="two layers are named 'conv1'"):
        names.with_overrides({"conv2": "conv1"})
    with pytest.raises(CalibrationError, match="non-empty string or None"):
        names.with_overrides({"conv2": 3})


def test_layer_name_validation():
    with pytest.raises(CalibrationError, match="not both"):
        LayerName(name="x", tap="x", amax=1.0)
    with pytest.raises(CalibrationError, match="finite and > 0"):
        LayerName(name="x", amax=0.0)
    with pytest.raises(CalibrationError, match="kind"):
        LayerName(name="x", kind="lstm")


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.bn(self.conv(x)))), 1))


def test_generic_names_trace_producers_through_views_and_inplace():
    model = _Flat()
    example = torch.randn(2, 1, 8, 8)
    calls = {c.tap: c for c in trace_producers(model, example)}
    assert calls["conv"].producers == ("data",)
    assert calls["pool"].producers == ("act",)
    assert calls["fc"].producers == ("pool",)  # through torch.flatten (a view)
    names = NvdlaNames.for_model(model, example_input=example)
    assert names.preset == "generic"
    assert names.names() == ["data", "conv", "bn_normalized", "bn", "act", "pool", "fc"]
    assert names["bn_normalized"].tap == "bn:normalized" and names["bn_normalized"].kind == "bn"
    assert names["bn"].kind == "scale" and names["bn"].inputs == ("bn_normalized",)
    assert names["pool"].inputs == ("act",) and names["fc"].inputs == ("pool",)
    assert names.selection.derived == (BN_NORMALIZED,) and names.selection.inputs == ()


def test_generic_trace_of_cifar_resnet_finds_the_residual_add():
    model = ResNetCifar(20)
    model.train()
    names = NvdlaNames.for_model(model, example_input=torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    add = names["layer1.0.add"]
    assert add.kind == "eltwise" and add.inputs == ("layer1.0.bn2", "layer1.0.shortcut")
    assert names["layer1.0.relu2"].inputs == ("layer1.0.add",)
    assert names["avgpool"].kind == "pool" and names["avgpool"].inputs == ("layer3.2.relu2",)


def test_generic_needs_an_example_and_unknown_preset_fails():
    with pytest.raises(CalibrationError, match="example_input"):
        NvdlaNames.for_model(_Flat(), "generic")
    with pytest.raises(CalibrationError, match="unknown naming preset 'vgg'"):
        NvdlaNames.for_model(_Flat(), "vgg")
    with pytest.raises(CalibrationError, match="not a torchvision-style ResNet"):
        resnet_caffe_names(_Flat())


def test_generic_layer_name():
    assert generic_layer_name("data") == "data"
    assert generic_layer_name("layer1.0.relu#2") == "layer1.0.relu_2"
    assert generic_layer_name("bn1:normalized") == "bn1_normalized"


def test_resolve_reports_missing_and_unnamed_taps():
    model = _resnet(torchvision.models.resnet18)
    x = torch.randn(2, 3, 32, 32)
    table = calibrate(model, [x], method="minmax", progress=False)  # default taps: no BN split
    names = resnet_caffe_names(model)
    res = names.resolve(table)
    # the residual sums (``out += identity`` read by relu) are observed by default as the
    # relu's ':input'; the BatchNorm halves are not
    assert "bn_conv1" in res.missing and "res2a" not in res.missing and "prob" not in res.missing
    assert res.sources["res2a"] == "layer1.0.relu#1:input"
    assert res.amax["prob"] == 1.0 and res.sources["prob"].startswith("fixed")
    assert res.unnamed == ()
    with pytest.raises(CalibrationError, match=r"bn_conv1 \(tap 'bn1:normalized'\).*taps=names.selection"):
        names.require(table)


def test_calibrate_for_nvdla_observes_every_tap_the_preset_needs():
    model = _resnet(torchvision.models.resnet18)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table, names = calibrate_for_nvdla(model, [torch.randn(2, 3, 32, 32)], method="minmax", progress=False)
    assert names.preset == "resnet-caffe"
    res = names.resolve(table)
    assert res.missing == () and len(res.amax) == 90
    # the residual sum is measured before the in-place ReLU: it can be negative
    assert table["layer1.0.relu#1:input"].min < 0 <= table["layer1.0.relu#1"].min
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_calibrate_for_nvdla_generic_accepts_a_one_shot_iterator():
    model = _Flat()
    batches = iter([torch.randn(2, 1, 8, 8) for _ in range(3)])
    table, names = calibrate_for_nvdla(model, batches, method="minmax", progress=False)
    assert table.meta["num_batches"] == 3
    assert names.resolve(table).missing == ()


def test_from_table_generic_names():
    model = _Flat()
    table = calibrate(model, [torch.randn(2, 1, 8, 8)], method="minmax", progress=False,
                      taps=TapSelection(derived=(BN_NORMALIZED,), inputs=("pool",)))
    names = NvdlaNames.from_table(table, overrides={"conv": "conv1"})
    assert names.names() == ["data", "conv1", "bn_normalized", "bn", "act", "pool", "fc"]
    assert names["pool"].inputs == ("act",)  # from the reused histogram of pool:input
    assert names.resolve(table).unnamed == ("pool:input",)
