"""Caffe export and import: deploy.prototxt + caffemodel + calib.json, and back to PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch_nvdla.models.caffe_lenet import load_caffe_lenet
from torch_nvdla.models.resnet_cifar import load_resnet_cifar

from torch_nvdla import calibrate
from torch_nvdla.caffe.caffemodel import read_caffemodel
from torch_nvdla.caffe.importer import CaffeImportError, import_caffe
from torch_nvdla.caffe.prototxt import parse_prototxt
from torch_nvdla.caffe.shapes import caffe_pool_output_size
from torch_nvdla.cli import main
from torch_nvdla.export.caffe import (
    CaffeExportError,
    caffe_tap_selection,
    convert_to_caffe,
    export_caffe,
)
from torch_nvdla.nvdla.calibjson import check_calib_json, read_calib_json
from torch_nvdla.nvdla.naming import NvdlaNames

LENET = ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _structure(net):
    return [(l.name, l.type, list(l.bottoms), list(l.tops)) for l in net.layers]


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def lenet_dir(request):
    return request.getfixturevalue("shared_data") / "caffe-lenet-mnist"


@pytest.fixture(scope="module")
def mnist(request):
    from torch_nvdla.zoo.data import load_mnist_test, preprocess_mnist_caffe

    request.getfixturevalue("shared_data")
    images, labels = load_mnist_test()
    return preprocess_mnist_caffe(images), labels


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


def test_import_bvlc_lenet_reaches_its_accuracy(lenet_dir, mnist):
    net = import_caffe(lenet_dir / "lenet.prototxt", lenet_dir / "lenet_iter_10000.caffemodel")
    assert net.layer_names == tuple(LENET[1:]) and net.input_names == ("data",) and net.output_names == ("prob",)
    x, y = mnist
    with torch.no_grad():
        prob = torch.cat([net(x[i:i + 2500]) for i in range(0, len(x), 2500)])
    correct = int((prob.argmax(1) == y).sum())
    assert correct == 9914  # 99.14 %, the published accuracy
    # the same network as the hand-written models/caffe_lenet.py, to the last bit
    with torch.no_grad():
        assert torch.equal(net(x[:64]), load_caffe_lenet()(x[:64]))


def test_import_follows_caffe_rules():
    text = """
    name: "t"
    input: "data"
    input_dim: 1 input_dim: 2 input_dim: 7 input_dim: 7
    layer { name: "p" type: "Pooling" bottom: "data" top: "p"
            pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
    layer { name: "split" type: "Split" bottom: "p" top: "a" top: "b" }
    layer { name: "r" type: "ReLU" bottom: "a" top: "a" relu_param { negative_slope: 0.5 } }
    layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s"
            eltwise_param { operation: SUM coeff: 2 coeff: -1 } }
    layer { name: "train_only" type: "Dropout" bottom: "s" top: "s" include { phase: TRAIN } }
    """
    net = import_caffe(text)
    assert net.output_names == ("s",) and net.layer_names == ("p", "r", "sum")
    x = torch.randn(1, 2, 7, 7)
    p = F.avg_pool2d(x, 2, 2, ceil_mode=True)  # Caffe rounds 7 -> 4, the last window clipped
    assert p.shape[-1] == 4 == caffe_pool_output_size(7, 2, 2, 0)
    want = 2 * F.leaky_relu(p, 0.5) - p
    with torch.no_grad():
        assert _max_diff(net(x), want) < 1e-6


def test_caffe_pool_output_size_rounds_up_and_clips():
    assert caffe_pool_output_size(112, 3, 2, 1) == 57  # PyTorch floor mode: 56
    assert caffe_pool_output_size(112, 3, 2, 0) == 56
    assert caffe_pool_output_size(7, 2, 2, 0) == 4
    assert caffe_pool_output_size(6, 3, 3, 1) == 3  # the 4th window would start in the padding
    assert caffe_pool_output_size(7, 2, 2, 0, ceil=False) == 3


@pytest.mark.parametrize("arch", ["googlenet", "densenet121", "squeezenet1_1", "resnet50"])
def test_blob_shapes_from_parameters_equal_a_forward_pass(arch):
    """``blob_shapes`` (arithmetic on the prototxt) against the importer, which runs every
    layer on zeros: the same shape for every blob."""
    from torch_nvdla.caffe.importer import build_module
    from torch_nvdla.caffe.shapes import blob_shapes

    model = getattr(torchvision.models, arch)(weights=None, **({"aux_logits": False, "init_weights": False}
                                                               if arch == "googlenet" else {})).eval()
    net = convert_to_caffe(model, (1, 3, 64, 64), verify=False).net
    inferred = blob_shapes(net)
    reference = build_module(net).blob_shapes
    assert inferred == reference


def test_weight_banks_hand_counted():
    """VGG's fc6 (4096 x 512x7x7) on nv_full: one group of 32 kernels is 512*7*7*32 bytes
    = 24.5 banks of 128 x 256 bytes -> 25; all weights 4096*25088 / 32768 = 3136 banks;
    the 7x7x512 input is 16 atoms of 32 bytes = 4 entries per pixel, 28 per row, 196 in
    all: 1 bank. The compiler fails on it; on fc7 (4096 x 4096x1x1) a group is 4 banks."""
    from torch_nvdla.nvdla.rules import conv_buffer_banks

    assert conv_buffer_banks((512, 7, 7), (4096, 512, 7, 7), "nv_full") == (1, 3136, 25)
    assert conv_buffer_banks((4096, 1, 1), (4096, 4096, 1, 1), "nv_full") == (1, 512, 4)
    # nv_small: 8-byte entries, 512 to a 4 KiB bank; 64 channels = 8 atoms, one per entry.
    assert conv_buffer_banks((64, 56, 56), (64, 64, 3, 3), "nv_small") == (49, 9, 2)
    # 3 atoms of a 4-atom entry take a whole entry per pixel (the compiler's special case).
    assert conv_buffer_banks((96, 10, 10), (8, 96, 1, 1), "nv_full")[0] == 1


def test_deconvolution_limits_are_refused_before_writing(tmp_path):
    """Padding (the compiler's Deconvolution takes none), output_padding and a bilinear
    Upsample have no NVDLA Caffe form: refused, naming the module, nothing written."""
    cases = [
        (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), "Deconvolution needs group 1 and no padding"),
        (nn.ConvTranspose2d(3, 4, 2, stride=2, output_padding=1), "output_padding"),
        (nn.Upsample(scale_factor=2, mode="bilinear"), "only nearest upsampling"),
    ]
    for i, (layer, message) in enumerate(cases):
        model = nn.Sequential(nn.Conv2d(3, 3, 1), layer).eval()
        table = calibrate(model, [torch.randn(2, 3, 8, 8)], progress=False)
        with pytest.raises(CaffeExportError, match=message):
            export_caffe(model, table, tmp_path / str(i), input_shape=(1, 3, 8, 8))
        assert not (tmp_path / str(i) / "deploy.prototxt").exists()


def test_default_calibration_feeds_a_folded_export_of_a_preactivation_net(tmp_path):
    """DenseNet-style: a BatchNorm after a concat cannot fold, so a default calibration
    observes its ``:normalized`` half (and not that of a BatchNorm after a convolution);
    the folded Caffe export then finds every range in that one table."""
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.bn1, self.relu = nn.BatchNorm2d(7), nn.ReLU()
            self.conv1 = nn.Conv2d(7, 4, 1)

        def forward(self, x):
            y = torch.cat([self.bn0(self.conv0(x)), x], 1)
            return self.conv1(self.relu(self.bn1(y)))

    torch.manual_seed(0)
    model = PreAct().eval()
    for bn in (model.bn0, model.bn1):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    table = calibrate(model, [torch.randn(4, 3, 8, 8)], progress=False)
    assert "bn1:normalized" in table and "bn0:normalized" not in table
    out = export_caffe(model, table, tmp_path / "caffe", input_shape=(1, 3, 8, 8), fold_batchnorm=True)
    text = out.prototxt.read_text()
    assert text.count('type: "BatchNorm"') == 1 and text.count('type: "Convolution"') == 2
    with pytest.raises(CaffeExportError, match="no range"):  # unfolded, bn0's half is missing
        export_caffe(model, table, tmp_path / "unfolded", input_shape=(1, 3, 8, 8))


def test_import_errors_name_the_layer(tmp_path):
    bad = 'name: "n"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n' \
          'layer { name: "norm1" type: "LRN" bottom: "data" top: "norm1" }\n'
    with pytest.raises(CaffeImportError, match=r"<text>:4: layer 'norm1' \(LRN\).*not supported"):
        import_caffe(bad)
    dangling = 'name: "n"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n' \
               'layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }\n'
    with pytest.raises(CaffeImportError, match="'r'.*bottom blob 'nope'"):
        import_caffe(dangling)
    # a caffemodel without the layer's blobs
    model = tmp_path / "m.caffemodel"
    from torch_nvdla.caffe.caffemodel import write_caffemodel
    from torch_nvdla.caffe.prototxt import CaffeLayer

    write_caffemodel(model, "n", [CaffeLayer("other", "ReLU", ["data"], ["x"])])
    conv = 'name: "n"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n' \
           'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 3 } }\n'
    with pytest.raises(CaffeImportError, match="'c'.*no blobs"):
        import_caffe(conv, model)


# ---------------------------------------------------------------------------------------
# export: the Caffe LeNet
# ---------------------------------------------------------------------------------------


def test_export_lenet_is_the_bvlc_deploy_net(lenet_dir, mnist, tmp_path):
    model = load_caffe_lenet()
    x, _ = mnist
    table = calibrate(model, [x[:250], x[250:500]], "minmax", progress=False)
    out = export_caffe(model, table, tmp_path / "lenet", input_shape=(64, 1, 28, 28))
    assert sorted(p.name for p in (tmp_path / "lenet").iterdir()) == ["calib.json", "deploy.prototxt", "model.caffemodel"]
    ours, bvlc = parse_prototxt(out.prototxt), parse_prototxt(lenet_dir / "lenet.prototxt")
    assert _structure(ours) == _structure(bvlc)  # names, types, bottoms, tops (relu1 in place)
    assert ours.inputs == bvlc.inputs == {"data": (64, 1, 28, 28)}
    # calib.json keys == prototxt layer names, by construction; the NVDLA rules hold
    assert list(read_calib_json(out.calib_json)) == LENET == out.conversion.layer_names()
    assert check_calib_json(out.calib_json, out.prototxt).ok
    assert out.scales["pool1"] == out.scales["conv1"] and out.scales["pool2"] == out.scales["conv2"]
    # the caffemodel holds exactly the trained blobs
    blobs = read_caffemodel(out.caffemodel).blobs_by_layer()
    with np.load(lenet_dir / "lenet_iter_10000.npz") as ref:
        for name in ("conv1", "conv2", "ip1", "ip2"):
            assert np.array_equal(blobs[name][0], ref[f"{name}.weight"])
            assert np.array_equal(blobs[name][1], ref[f"{name}.bias"])
    back = import_caffe(out.prototxt, out.caffemodel)
    with torch.no_grad():
        assert _max_diff(back(x[:500]), model(x[:500])) == 0.0
    # exporting the imported net again gives the same files
    again = convert_to_caffe(back, (64, 1, 28, 28), net_name="CaffeLeNet")
    assert again.preset == "caffe-lenet" and again.prototxt_text() == out.prototxt.read_text()
    assert again.caffemodel_bytes() == out.caffemodel.read_bytes()


# ---------------------------------------------------------------------------------------
# export: residual networks
# ---------------------------------------------------------------------------------------


def test_export_cifar_resnet20_option_a_shortcut(shared_data, tmp_path):
    model = load_resnet_cifar(20)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    conv = convert_to_caffe(model, example_input=x)
    convs = {i.name: i for i in conv.layers if i.type == "Convolution"}
    # option A = stride-2 subsampling + zero channels, as a fixed 1x1 Convolution
    for name, cin, cout in (("layer2.0.shortcut", 16, 32), ("layer3.0.shortcut", 32, 64)):
        layer = next(l for l in conv.net.layers if l.name == name)
        assert convs[name].shape[1] == cout
        p = layer.type_params
        assert (p.get("kernel_size"), p.get("stride"), p.get("bias_term")) == (1, 2, False)
        w = layer.blobs[0][:, :, 0, 0]
        before = (cout - cin) // 2
        assert np.array_equal(w, np.eye(cout, cin, -before, dtype=np.float32))
    assert not any(i.type == "Flatten" for i in conv.layers)  # the flatten before `linear` is Caffe's own
    table = calibrate(model, [x[:4], x[4:]], "minmax", taps=conv.selection, progress=False)
    out = export_caffe(model, table, tmp_path, example_input=x)
    names = out.conversion.layer_names()
    assert list(read_calib_json(out.calib_json)) == names
    assert [l.name for l in parse_prototxt(out.prototxt).layers] == names
    assert check_calib_json(out.calib_json, out.prototxt).ok
    back = import_caffe(out.prototxt, out.caffemodel)
    with torch.no_grad():
        ref = model(x)
        diff = _max_diff(back(x), ref)
    assert diff <= 1e-5 * float(ref.abs().max()), diff


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_torchvision_resnet_with_caffe_names(arch, tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(getattr(torchvision.models, arch)(weights=None, num_classes=10))
    shape = (1, 3, 34, 34)  # conv1 -> 17x17 (odd): the 3/2/1 max pool rounds alike in Caffe and PyTorch
    conv = convert_to_caffe(model, shape)
    preset = NvdlaNames.for_model(model).names()
    assert conv.preset == "resnet-caffe"
    assert conv.layer_names() == [n for n in preset if n != "prob"]  # torchvision has no softmax
    assert conv.layer_names()[:6] == ["data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 3, 34, 34, generator=g) for _ in range(2)]
    table = calibrate(model, batches, "minmax", taps=conv.selection, progress=False)
    out = export_caffe(model, table, tmp_path, input_shape=shape)
    assert list(read_calib_json(out.calib_json)) == conv.layer_names()
    assert out.conversion.max_abs_diff <= 1e-4 * out.conversion.output_max_abs
    net = parse_prototxt(out.prototxt)
    by_name = {l.name: l for l in net.layers}
    assert by_name["bn_conv1"].tops == ["conv1"] and by_name["conv1_relu"].tops == ["conv1"]  # in place
    assert by_name["res2a"].type == "Eltwise" and by_name["fc10"].type == "InnerProduct"
    bn = read_caffemodel(out.caffemodel).blobs_by_layer()["bn_conv1"]
    assert len(bn) == 3 and bn[2].tolist() == [1.0]  # moving-average factor 1
    back = import_caffe(out.prototxt, out.caffemodel)
    x = torch.randn(3, 3, 34, 34, generator=g)
    with torch.no_grad():
        ref = model(x)
        assert _max_diff(back(x), ref) <= 1e-4 * float(ref.abs().max())


def test_pooling_rounding_mismatch_is_rewritten_exactly():
    # ResNet's stem pool on an even size: Caffe would give 9x9 instead of PyTorch's 8x8
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Softmax(dim=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    conv = convert_to_caffe(model, example_input=x)
    kinds = [(i.name, i.type, i.shape[2:] if len(i.shape) == 4 else None) for i in conv.layers]
    assert kinds == [
        ("data", "Input", (16, 16)), ("0", "Convolution", (16, 16)), ("1", "ReLU", (16, 16)),
        ("2", "Pooling", (16, 16)), ("2_subsample", "Convolution", (8, 8)),
        ("3", "Pooling", (4, 4)), ("4", "Flatten", None), ("5", "Softmax", None),
    ]
    pool = next(l for l in conv.net.layers if l.name == "2")
    assert (pool.type_params.get("stride"), pool.type_params.get("pad")) == (1, 1)
    assert any("Caffe pools to (9, 9), PyTorch to (8, 8)" in n for n in conv.notes)
    back = import_caffe(parse_prototxt(conv.prototxt_text()), conv.net)
    with torch.no_grad():
        assert _max_diff(back(x), model(x)) < 1e-6
    # an odd size needs no rewrite
    assert [i.type for i in convert_to_caffe(model, (1, 3, 15, 15)).layers].count("Convolution") == 1


class _Functional(nn.Module):
    """Functional ops, odd parameters: what a hand-written model looks like."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(12 * 9 * 5, 7)
        self.bn1d = nn.BatchNorm1d(7)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        z = torch.cat([self.c2(y), self.c3(y)], 1)
        z = self.pool(self.drop(F.max_pool2d(z, 2, 1)))
        z = z.view(z.size(0), -1)
        return F.softmax(self.bn1d(self.fc(z)), dim=-1)


def test_export_functional_ops_and_parameters(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(_Functional())
    x = torch.randn(2, 3, 18, 17)
    conv = convert_to_caffe(model, example_input=x)
    by = {i.name: i for i in conv.layers}
    assert [i.type for i in conv.layers] == ["Input", "Convolution", "BatchNorm", "Scale", "ReLU", "Convolution",
                                             "Convolution", "Concat", "Pooling", "Pooling", "InnerProduct",
                                             "BatchNorm", "Scale", "Softmax"]
    assert by["relu"].rule == "tap" and by["relu"].tap == "c2:input"  # a functional ReLU measured at its reader
    assert by["cat"].rule == "max" and by["softmax"].rule == "fixed"
    c1 = next(l for l in conv.net.layers if l.name == "c1").type_params
    # non-square parameters as *_h / *_w (the NVDLA parser reads a repeated pair as [w, h])
    assert [(f.name, f.value) for f in c1] == [("num_output", 8), ("bias_term", False), ("pad_h", 1), ("pad_w", 2),
                                               ("kernel_h", 3), ("kernel_w", 5), ("stride_h", 1), ("stride_w", 2)]
    c2 = next(l for l in conv.net.layers if l.name == "c2").type_params
    assert (c2.get("group"), c2.get("dilation"), c2.get("pad")) == (4, 2, 2)
    out = export_caffe(model, None, tmp_path, example_input=x)
    assert out.calib_json is None and not (tmp_path / "calib.json").exists()
    back = import_caffe(out.prototxt, out.caffemodel)
    with torch.no_grad():
        assert _max_diff(back(x), model(x)) < 1e-6
    # the layers with no tap of their own get their range by rule
    table = calibrate(model, [x], "minmax", taps=conv.selection, progress=False)
    ranges = {l.name: l for l in conv.nvdla_names(table)}
    assert ranges["cat"].amax == max(table["c2"].amax, table["c3"].amax)
    assert ranges["softmax"].amax == 1.0


class _Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x))


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 2, 3))

    def forward(self, x):
        return torch.sigmoid(self.block(x))


def test_unsupported_layers_are_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "deploy.prototxt").write_text("previous export\n")
    with pytest.raises(CaffeExportError, match=r"module 'act' \(GELU\) has no NVDLA Caffe equivalent"):
        export_caffe(_Gelu(), None, out, input_shape=(1, 1, 8, 8))
    with pytest.raises(CaffeExportError, match=r"function 'sigmoid'.*no NVDLA Caffe equivalent"):
        export_caffe(_Sigmoid(), None, out, input_shape=(1, 1, 8, 8))
    with pytest.raises(CaffeExportError, match="4-D NCHW"):
        convert_to_caffe(nn.Sequential(nn.Linear(4, 2)), example_input=torch.randn(1, 4))
    with pytest.raises(CaffeExportError, match="concatenation along dim 2"):
        convert_to_caffe(_CatH(), (1, 1, 4, 4))
    assert sorted(p.name for p in out.iterdir()) == ["deploy.prototxt"]
    assert (out / "deploy.prototxt").read_text() == "previous export\n"


class _CatH(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        y = self.c(x)
        return torch.cat([y, y], 2)


def test_table_without_the_caffe_taps_is_refused(tmp_path):
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    plain = calibrate(model, [x], "minmax", progress=False)  # no <bn>:normalized tap
    with pytest.raises(CaffeExportError, match=r"1_normalized \(tap '1:normalized'\).*taps="):
        export_caffe(model, plain, tmp_path / "o", example_input=x)
    assert not (tmp_path / "o").exists()
    full = calibrate(model, [x], "minmax", taps=convert_to_caffe(model, example_input=x).selection, progress=False)
    assert list(read_calib_json(export_caffe(model, full, tmp_path / "o", example_input=x).calib_json)) == \
        ["data", "0", "1_normalized", "1", "2"]


def test_cli_export_caffe(shared_data, tmp_path, capsys):
    rc = main(["export-caffe", "--model", "caffe-lenet", "--num-images", "200", "--method", "minmax",
               "-o", str(tmp_path / "lenet"), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "caffe-lenet" and printed["input_shape"] == [1, 1, 28, 28]
    assert [l["name"] for l in printed["layers"]] == LENET == list(printed["scales"])
    assert printed["max_abs_diff"] == 0.0
    assert list(json.loads((tmp_path / "lenet" / "calib.json").read_text())) == LENET
    rc = main(["check", str(tmp_path / "lenet" / "calib.json"), "--prototxt", str(tmp_path / "lenet" / "deploy.prototxt")])
    assert rc == 0


def test_export_refuses_a_pooling_kernel_the_engine_cannot_run(tmp_path):
    """A global average pool over 13x13 (SqueezeNet's head) makes the compiler loop forever:
    refused before anything is written, naming the layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 13, 13)
    table = calibrate(model, [x], "minmax", taps=caffe_tap_selection(model, example_input=x), progress=False)
    with pytest.raises(CaffeExportError, match=r"pooling kernel 13x13 is larger than the pooling engine's 8"):
        export_caffe(model, table, tmp_path / "out", example_input=x)
    assert not (tmp_path / "out").exists()
