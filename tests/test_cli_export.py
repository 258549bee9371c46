"""``torch-nvdla export`` / ``check`` / ``convert-trt-cache`` through ``torch_nvdla.cli.main``."""

from __future__ import annotations

import json

import torch
import torchvision

from torch_nvdla.cli import main
from torch_nvdla.nvdla.naming import calibrate_for_nvdla
from torch_nvdla.nvdla.trtcache import float32_hex

LENET = ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]


# Entry points used as --model / --data (this module is importable as ``test_cli_export``).
def tiny_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = torch.zeros(4, dtype=torch.int64)
    return (x, y), (x, y)


def test_export_and_check_caffe_lenet_end_to_end(shared_data, tmp_path, capsys):
    folder = shared_data / "caffe-lenet-mnist"
    out = tmp_path / "calib.json"
    rc = main(["export", "--model", "caffe-lenet", "--num-images", "500", "-o", str(out),
               "--weights-dir", str(tmp_path / "w"), "--trt-cache", str(tmp_path / "lenet.cache"),
               "--trt-version", "7000", "--trt-prototxt", str(folder / "lenet.prototxt"), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "caffe-lenet" and list(printed["scales"]) == LENET
    assert list(json.loads(out.read_text())) == LENET
    assert (tmp_path / "w" / "weights.npz").is_file() and printed["weights"]["layers"] == 4
    trt = (tmp_path / "lenet.cache").read_text()
    assert trt.startswith("TRT-7000-EntropyCalibration2\ndata: ")
    assert "\n(Unnamed Layer* 4) [Fully Connected]_output: " in trt and "\nrelu1: " not in trt  # TensorRT's names

    rc = main(["check", str(out), "--prototxt", str(folder / "lenet.prototxt"),
               "--blobs", str(folder / "lenet_iter_10000.npz"), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["errors"] == 0 and result["layers"] == 9
    assert {f["layer"] for f in result["findings"] if f["rule"] == "requant"} == {"conv1", "conv2", "ip1", "ip2"}

    rc = main(["check", str(out), "--prototxt", str(folder / "lenet.prototxt")])
    captured = capsys.readouterr()
    assert rc == 0 and "OK" in captured.err and "0 error(s)" in captured.err

    # the TensorRT cache converts back to the same scales (float32 precision)
    back = tmp_path / "back.json"
    rc = main(["convert-trt-cache", str(tmp_path / "lenet.cache"), "-o", str(back),
               "--prototxt", str(folder / "lenet.prototxt")])
    assert rc == 0
    orig = {k: v["scale"] for k, v in json.loads(out.read_text()).items()}
    conv = {k: v["scale"] for k, v in json.loads(back.read_text()).items()}
    assert list(conv) == LENET
    assert all(abs(conv[k] - orig[k]) <= 1e-7 * orig[k] for k in LENET)


def test_check_fails_on_a_broken_table(shared_data, tmp_path, capsys):
    proto = shared_data / "caffe-lenet-mnist" / "lenet.prototxt"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: {"scale": 0.1} for k in LENET if k != "relu1"} | {"pool1": {"scale": 0.2}}))
    assert main(["check", str(bad), "--prototxt", str(proto)]) == 1
    out = capsys.readouterr()
    assert "relu1" in out.out and "FAIL" in out.err
    assert main(["check", str(bad), "--prototxt", str(proto), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert {(f["rule"], f["layer"]) for f in result["findings"] if f["level"] == "error"} == {
        ("missing", "relu1"), ("pool", "pool1")}


def test_check_named_errors_for_unreadable_files(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "data": {"scale": 0.1},\n  "conv1": {"scale": ')
    assert main(["check", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"{broken}:3" in err.replace("\n", "") and "truncated" in err
    assert main(["check", str(tmp_path / "absent.json")]) == 1
    assert "not found" in capsys.readouterr().err
    zero = tmp_path / "zero.json"
    zero.write_text('{"data": {"scale": 0}}')
    assert main(["check", str(zero), "--quiet"]) == 1


def test_export_torchvision_resnet18_entry_point(tmp_path, capsys):
    out = tmp_path / "r18.json"
    rc = main(["export", "--model", "test_cli_export:tiny_resnet18", "--data", "test_cli_export:tiny_data",
               "--num-images", "4", "--batch-size", "2", "--method", "minmax", "-o", str(out),
               "--eltwise", "unify", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "resnet-caffe"
    keys = list(json.loads(out.read_text()))
    assert len(keys) == 90 and keys[:6] == ["data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    assert keys[-3:] == ["pool5", "fc1000", "prob"]
    s = printed["scales"]
    assert s["pool1"] == s["conv1_relu"] and s["pool5"] == s["res5b_relu"]
    assert s["scale2a_branch2b"] == s["pool1"]  # unified element-wise inputs of res2a


def test_export_from_a_saved_table_with_a_name_map(tmp_path, capsys):
    model = tiny_resnet18()
    (x, _), _ = tiny_data()
    table, _ = calibrate_for_nvdla(model, [x], method="minmax", progress=False)
    table.save(tmp_path / "table.json")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"fc": "logits", "data": "input"}))
    out = tmp_path / "calib.json"
    rc = main(["export", "--model", "test_cli_export:tiny_resnet18", "--table", str(tmp_path / "table.json"),
               "--names", str(names), "-o", str(out)])
    assert rc == 0
    keys = list(json.loads(out.read_text()))
    assert keys[0] == "input" and "logits" in keys and "fc1000" not in keys
    assert "logits" in capsys.readouterr().out  # the rich table of entries


def test_export_from_a_table_missing_the_preset_taps_fails(tmp_path, capsys):
    from torch_nvdla import calibrate

    model = tiny_resnet18()
    (x, _), _ = tiny_data()
    calibrate(model, [x], method="minmax", progress=False).save(tmp_path / "plain.json")
    rc = main(["export", "--model", "test_cli_export:tiny_resnet18", "--table", str(tmp_path / "plain.json"),
               "-o", str(tmp_path / "c.json")])
    assert rc == 1
    assert "bn_conv1" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_convert_trt_cache_cli(tmp_path, capsys):
    proto = tmp_path / "net.prototxt"
    proto.write_text("""name: "n"
layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: 1 dim: 1 dim: 4 dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
""")
    cache = tmp_path / "net.cache"
    cache.write_text(f"TRT-7000-EntropyCalibration2\ndata: 3c008912\nip1: {float32_hex(0.05)}\n")
    out = tmp_path / "calib.json"
    assert main(["convert-trt-cache", str(cache), "-o", str(out), "--prototxt", str(proto), "--no-fill"]) == 1
    assert "ip1" in capsys.readouterr().err and not out.exists()
    assert main(["convert-trt-cache", str(cache), "-o", str(out), "--prototxt", str(proto), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["placed"] == {"data": "data", "ip1": "relu1"} and result["filled"] == {"ip1": "relu1"}
    assert list(json.loads(out.read_text())) == ["data", "ip1", "relu1"]
    names = tmp_path / "map.json"
    names.write_text(json.dumps({"ip1": "relu1"}))
    plain = tmp_path / "plain.json"
    assert main(["convert-trt-cache", str(cache), "-o", str(plain), "--names", str(names)]) == 0
    assert list(json.loads(plain.read_text())) == ["data", "relu1"]
    foreign = tmp_path / "foreign.cache"
    foreign.write_text("TRT-7000-Int8Calibrator\ndata: 3c008912\n")
    assert main(["convert-trt-cache", str(foreign), "-o", str(tmp_path / "f.json")]) == 1
    assert f"{foreign}:1" in capsys.readouterr().err.replace("\n", "")
