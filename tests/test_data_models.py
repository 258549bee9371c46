"""Data loaders, built-in models and the zoo: formats, splits, accuracies, name lookups."""

from __future__ import annotations

import gzip
import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch_nvdla.models.caffe_lenet import (
    CAFFE_LENET_SHAPES,
    CaffeLeNet,
    load_caffe_lenet,
)
from torch_nvdla.models.digits_lenet import DigitsLeNet, load_digits_lenet
from torch_nvdla.models.resnet_cifar import PadShortcut, ResNetCifar, load_resnet_cifar

from torch_nvdla.errors import CalibrationError, FileFormatError
from torch_nvdla.zoo import data as _data
from torch_nvdla.zoo import registry as _zoo

REPO = Path(__file__).resolve().parents[1]


def _idx_bytes(magic: int, shape: tuple[int, ...], body: bytes | None = None) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    if body is None:
        count = int(np.prod(shape))
        body = (bytes(range(256)) * (count // 256 + 1))[:count]
    return header + body


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1) for xb, _ in _data.batches(x, y, batch)])
    return (pred == y).float().mean().item()


# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    raw = _idx_bytes(_data.IDX_MAGIC_IMAGES, (3, 4, 5))
    path = tmp_path / "ok.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    array = _data.read_idx(path, _data.IDX_MAGIC_IMAGES)
    assert array.shape == (3, 4, 5) and array.dtype == np.uint8
    assert array.reshape(-1).tolist() == list(range(60))


@pytest.mark.parametrize(
    "data, expected, message",
    [
        (_idx_bytes(0x801, (4,)), 0x803, "bad IDX magic 0x00000801, expected 0x00000803"),
        (_idx_bytes(0x0D03, (2, 2, 2)), None, "bad IDX magic 0x00000d03"),
        (b"\x00\x00", 0x803, "truncated IDX header"),
        (_idx_bytes(0x803, (10, 28, 28))[:10], 0x803, "truncated IDX header"),
        (_idx_bytes(0x803, (10, 28, 28))[:-1], 0x803, "truncated IDX data"),
        (_idx_bytes(0x801, (5,)) + b"\x00", 0x801, "unexpected trailing bytes"),
    ],
)
def test_read_idx_errors(tmp_path, data, expected, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(FileFormatError, match=message) as info:
        _data.read_idx(path, expected)
    assert info.value.path == str(path)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(_idx_bytes(0x803, (10, 28, 28)))[:-20])
    with pytest.raises(FileFormatError, match="gzip"):
        _data.read_idx(path, 0x803)


def test_mnist_loader_reports_bad_labels_file(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(0x803, (2, 28, 28)))
    )
    labels = gzip.compress(_idx_bytes(0x803, (2, 1, 1)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
    with pytest.raises(FileFormatError, match="t10k-labels.*bad IDX magic"):
        _data.load_mnist_test(tmp_path)


# --------------------------------------------------------------------------- small helpers


def test_batches_and_errors():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    got = list(_data.batches(x, y, 4))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in got]), x)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(CalibrationError, match="batch_size"):
            _data.batches(x, y, bad)
    with pytest.raises(CalibrationError, match="10 inputs but 9 targets"):
        _data.batches(x, y[:9], 2)


def test_preprocessing_values():
    mnist = torch.zeros(1, 28, 28, dtype=torch.uint8)
    mnist[0, 0, :3] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    out = _data.preprocess_mnist_caffe(mnist)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    assert out[0, 0, 0, :3].tolist() == [0.0, 0.5, 255 / 256]

    rgb = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    out = _data.preprocess_cifar10(rgb)
    assert out.shape == (2, 3, 32, 32)
    expected = [(1 - m) / s for m, s in zip(_data.CIFAR10_MEAN, _data.CIFAR10_STD)]
    assert out[0, :, 5, 7].tolist() == pytest.approx(expected, rel=1e-6)

    digits = torch.zeros(1, 8, 8, dtype=torch.uint8)
    digits[0, 0, :3] = torch.tensor([0, 8, 16], dtype=torch.uint8)
    out = _data.preprocess_digits(digits)
    assert out.shape == (1, 1, 8, 8) and out[0, 0, 0, :3].tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(CalibrationError, match="28 x 28"):
        _data.preprocess_mnist_caffe(torch.zeros(2, 27, 28, dtype=torch.uint8))


def test_pad_shortcut():
    x = torch.randn(2, 16, 32, 32)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_every_resnet_op_is_a_module():
    model = ResNetCifar(20)
    names = dict(model.named_modules())
    for name in ("conv1", "bn1", "relu", "avgpool", "flatten", "linear", "layer3.2.relu2"):
        assert name in names
    assert isinstance(names["layer2.0.shortcut"], PadShortcut)
    assert isinstance(names["layer1.0.shortcut"], nn.Identity)
    with pytest.raises(CalibrationError, match="6n"):
        ResNetCifar(21)


def test_caffe_lenet_module_names_mirror_prototxt():
    names = [name for name, _ in CaffeLeNet().named_children()]
    assert names == ["conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]


def test_caffe_lenet_rejects_bad_blob(tmp_path):
    path = tmp_path / "bad.npz"
    blobs = {name: np.zeros(shape, np.float32) for name, shape in CAFFE_LENET_SHAPES.items()}
    blobs["ip1.weight"] = np.zeros((500, 801), np.float32)
    np.savez(path, **blobs)
    with pytest.raises(FileFormatError, match=r"ip1.weight has shape \(500, 801\)"):
        load_caffe_lenet(path)


# --------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_disjoint():
    split = _data.digits_split_indices()
    sizes = (len(split.train), len(split.calibration), len(split.evaluation))
    assert sizes == (1200, 200, 397)
    parts = [set(t.tolist()) for t in split]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(range(1797))
    assert torch.equal(split.calibration, _data.digits_split_indices().calibration)


def test_digits_lenet_accuracy():
    pytest.importorskip("sklearn")
    model = load_digits_lenet()
    assert isinstance(model, DigitsLeNet) and not model.training
    data = _zoo.get_dataset("digits")
    assert _top1(model, *data.evaluation) >= 0.95


def test_digits_lenet_rejects_bad_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(FileFormatError, match="does not fit DigitsLeNet"):
        load_digits_lenet(path)


def test_train_digits_script(tmp_path):
    pytest.importorskip("sklearn")
    script = REPO / "scripts" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "w.pt"
    assert module.main(["--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert isinstance(load_digits_lenet(out), DigitsLeNet)
    assert (tmp_path / "w.json").is_file()


# --------------------------------------------------------------------------- real data


def test_mnist_shapes_and_labels(shared_data):
    images, labels = _data.load_mnist_test(shared_data)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(labels).tolist() == counts
    images[0, 0, 0] = 99  # callers get their own copy
    assert _data.load_mnist_test(shared_data)[0][0, 0, 0] == 0


def test_mnist_and_cifar_splits_disjoint(shared_data):
    split = _data.mnist_split_indices(10000)
    assert split.calibration.tolist() == list(range(500))
    assert len(split.evaluation) == 9500 and int(split.evaluation.min()) == 500
    _, labels = _data.load_cifar10_test(shared_data)
    split = _data.cifar10_split_indices(labels)
    assert len(split.calibration) == 500 and len(split.evaluation) == 9500
    assert not set(split.calibration.tolist()) & set(split.evaluation.tolist())
    assert torch.bincount(labels[split.calibration]).tolist() == [50] * 10


def test_caffe_lenet_accuracy(shared_data):
    model = load_caffe_lenet(shared_data / "caffe-lenet-mnist" / "lenet_iter_10000.npz")
    images, labels = _data.load_mnist_test(shared_data)
    x = _data.preprocess_mnist_caffe(images[:2000])
    probs = model(x[:4]).detach()
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert _top1(model, x, labels[:2000]) >= 0.985


def test_resnet20_accuracy(shared_data):
    model = load_resnet_cifar(20, shared_data / "resnet-cifar10" / "resnet20-12fca82f.th")
    images, labels = _data.load_cifar10_test(shared_data)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == torch.uint8
    subset = _data.cifar10_split_indices(labels).evaluation[::10]  # 950, every class
    x = _data.preprocess_cifar10(images[subset])
    assert _top1(model, x, labels[subset]) >= 0.75


def test_resnet_checkpoint_errors(tmp_path, shared_data):
    path = shared_data / "resnet-cifar10" / "resnet20-12fca82f.th"
    state = torch.load(path, map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.th"
    torch.save({k.removeprefix("module."): v for k, v in state["state_dict"].items()}, bare)
    assert isinstance(load_resnet_cifar(20, bare), ResNetCifar)
    with pytest.raises(FileFormatError, match="depth-32"):
        load_resnet_cifar(32, bare)


# --------------------------------------------------------------------------- zoo


def test_zoo_defaults():
    assert _zoo.DEFAULT_MODEL == "digits-lenet" == _zoo.model_names()[0]
    assert _zoo.default_dataset_for("caffe-lenet") == "mnist"
    assert _zoo.default_dataset_for("cifar-resnet56") == "cifar10"
    assert _zoo.default_dataset_for("pkg.mod:fn") is None
    assert set(_zoo.dataset_names()) == {"digits", "mnist", "cifar10"}


def test_zoo_unknown_names():
    with pytest.raises(CalibrationError, match="unknown model 'lenet9'.*digits-lenet.*caffe-lenet"):
        _zoo.get_model("lenet9")
    with pytest.raises(CalibrationError, match="unknown dataset 'imagenet'.*mnist.*cifar10"):
        _zoo.get_dataset("imagenet")
    with pytest.raises(CalibrationError, match="'resnet'"):
        _zoo.default_dataset_for("resnet")


def test_zoo_digits_loader():
    pytest.importorskip("sklearn")
    data = _zoo.get_dataset("digits")
    assert data.input_shape == (1, 8, 8)
    sizes = [len(y) for _, y in data.loader("calibration", 64)]
    assert sizes == [64, 64, 64, 8]
    with pytest.raises(CalibrationError, match="unknown split 'train'"):
        data.loader("train", 8)


def test_zoo_missing_shared_data(monkeypatch):
    monkeypatch.setattr(_data, "data_root", lambda required=False: None)
    for getter, name in ((_zoo.get_dataset, "mnist"), (_zoo.get_dataset, "cifar10")):
        with pytest.raises(CalibrationError, match=f"'{name}'.*TORCH_NVDLA_DATA"):
            getter(name)
    with pytest.raises(CalibrationError, match="'caffe-lenet'.*TORCH_NVDLA_DATA"):
        _zoo.get_model("caffe-lenet")


ENTRY_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    def data():
        x = torch.randn(6, 1, 2, 2)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        return (x[:2], y[:2]), (x[2:], y[2:])

    def broken():
        raise RuntimeError("boom")

    def not_a_model():
        return 42
    """
)


def test_zoo_entry_points(tmp_path, monkeypatch):
    (tmp_path / "tnv_entry_mod.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tnv_entry_mod", raising=False)
    model = _zoo.get_model("tnv_entry_mod:model")
    assert isinstance(model, nn.Sequential) and not model.training
    data = _zoo.get_dataset("tnv_entry_mod:data")
    assert data.name == "tnv_entry_mod:data"
    assert len(data.calibration[1]) == 2 and len(data.evaluation[1]) == 4
    assert [len(y) for _, y in data.loader("evaluation", 3)] == [3, 1]
    with pytest.raises(CalibrationError, match="calling 'tnv_entry_mod:broken' failed.*boom"):
        _zoo.get_model("tnv_entry_mod:broken")
    with pytest.raises(CalibrationError, match="'tnv_entry_mod:not_a_model' returned int"):
        _zoo.get_model("tnv_entry_mod:not_a_model")
    with pytest.raises(CalibrationError, match="'tnv_entry_mod:missing'.*no attribute"):
        _zoo.get_model("tnv_entry_mod:missing")
    with pytest.raises(CalibrationError, match="'tnv_no_such_module:f'"):
        _zoo.get_dataset("tnv_no_such_module:f")


def test_zoo_entry_point_from_working_directory(tmp_path, monkeypatch):
    (tmp_path / "tnv_cwd_mod.py").write_text(ENTRY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "tnv_cwd_mod", raising=False)
    assert isinstance(_zoo.get_model("tnv_cwd_mod:model"), nn.Module)
    assert str(tmp_path) not in sys.path
