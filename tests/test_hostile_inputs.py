"""Hostile inputs: every reader names the file and the problem, the CLI prints one line and
exits non-zero, and a failed run leaves what the user had untouched.

Each test is one class of defect (the numbers are the reliability issue's classes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_nvdla import CalibrationTable, TapRange, TapSelection, calibrate
from torch_nvdla.cli import main
from torch_nvdla.errors import FileFormatError

pytest.importorskip("sklearn")  # the CLI tests run on the embedded digits data set


def _table_file(tmp_path: Path) -> Path:
    t = CalibrationTable({"data": TapRange("data", 1.0, "minmax"), "conv1": TapRange("conv1", 2.0, "entropy")},
                         meta={"method": "entropy"})
    return t.save(tmp_path / "table.json")


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "error:" in text, text


# ------------------------------------------------------------------ 1, 2, 13: JSON readers

DEEP = "[" * 100000 + "]" * 100000
HUGE = "1" * 400
HUGER = "1" * 5001


def _readers(tmp_path):
    from torch_nvdla.nvdla.calibjson import read_calib_json
    from torch_nvdla.nvdla.trtcache import read_name_map

    return {"table": CalibrationTable.load, "calib.json": read_calib_json, "name map": read_name_map}


@pytest.mark.parametrize("reader", ["table", "calib.json", "name map"])
@pytest.mark.parametrize("text, problem", [
    (DEEP, "nested too deeply"),
    ('{"conv1": {"scale": 1, "scale": 2}}', "duplicate key"),
    ('{"a\\ud800": {"scale": 0.1}}', "lone surrogate"),
    ('{"conv1": {"scale": NaN}}', "NaN"),
])
def test_json_readers_name_the_file_and_problem(tmp_path, reader, text, problem):
    path = tmp_path / "in.json"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=problem) as e:
        _readers(tmp_path)[reader](path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("digits", [HUGE, HUGER])
@pytest.mark.parametrize("field", ["amax", "min", "max", "scale"])
def test_huge_numbers_in_a_table_are_named_errors(tmp_path, digits, field):
    path = _table_file(tmp_path)
    obj = json.loads(path.read_text())
    obj["taps"][1][field] = "@@"
    path.write_text(json.dumps(obj).replace('"@@"', digits))
    with pytest.raises(FileFormatError, match="out of range|not amax / 127") as e:
        CalibrationTable.load(path)
    assert str(path) in str(e.value) and "conv1" in str(e.value)


@pytest.mark.parametrize("digits", [HUGE, HUGER])
def test_huge_scale_in_calib_json_is_a_named_error(tmp_path, digits):
    from torch_nvdla.nvdla.calibjson import read_calib_json

    path = tmp_path / "calib.json"
    path.write_text('{"conv1": {"scale": %s}}' % digits)
    with pytest.raises(FileFormatError) as e:
        read_calib_json(path)
    assert str(path) in str(e.value) and "conv1" in str(e.value)


def test_deeply_nested_cache_is_recalibrated(tmp_path, capsys):
    path = tmp_path / "cache.json"
    path.write_text(DEEP)
    images = [torch.randn(2, 3, 4, 4)]
    table = calibrate(nn.Sequential(nn.Conv2d(3, 2, 1)), images, cache=path, progress=False)
    assert "unusable" in capsys.readouterr().err and list(table) == ["data", "0"]


# ------------------------------------------------------------------ 3: table schema


@pytest.mark.parametrize("edit, problem", [
    (lambda o: o["taps"][0].update(name=7), '"name" must be a non-empty string'),
    (lambda o: o["taps"][0].update(name=None), '"name" must be a non-empty string'),
    (lambda o: o.update(meta=[1]), '"meta" must be an object'),
    (lambda o: o["taps"][1].update(amax="1000"), '"amax" must be a number, got a string'),
    (lambda o: o["taps"][1].update(amax=True), '"amax" must be a number, got a boolean'),
    (lambda o: o["taps"][1].update(amax=-1), '"amax" must be a finite number > 0'),
    (lambda o: o["taps"][1].update(min=None), '"min" must be a number'),
    (lambda o: o["taps"][1].update(method=3), '"method" must be a string'),
    (lambda o: o["taps"][1].update(scale=0.5), 'is not amax / 127'),
    (lambda o: o["taps"][1].update(info={"module": 1}), '"info" must be an object'),
    (lambda o: o["taps"].append("conv2"), "tap #2 must be an object"),
])
def test_table_schema_is_validated_on_load(tmp_path, edit, problem):
    path = _table_file(tmp_path)
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    with pytest.raises(FileFormatError, match=problem):
        CalibrationTable.load(path)


def test_cli_with_a_bad_table_prints_one_line(tmp_path, capsys):
    path = _table_file(tmp_path)
    obj = json.loads(path.read_text())
    obj["taps"][0]["name"] = 7
    path.write_text(json.dumps(obj))
    for cmd in (["export", "--table", path, "-o", tmp_path / "c.json"],
                ["sweep", "--table", path, "--images", "20", "-o", tmp_path / "s"],
                ["evaluate", "--table", path, "--eval-images", "20"]):
        rc, text = _cli(capsys, *cmd)
        assert rc == 1 and "must be a non-empty string" in text, cmd
        _no_traceback(text)


# ------------------------------------------------------------------ 6: CLI errors


@pytest.mark.parametrize("output, problem", [
    ("DIR", "is a folder"),
    ("/proc/nope/calib.json", "calib.json"),
    ("FILE/x.json", "is not a folder"),
    ("LONG", "longer than the file system allows"),
])
def test_cli_output_errors_name_the_users_path(tmp_path, capsys, output, problem):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    out = {"DIR": tmp_path / "DIR", "FILE/x.json": tmp_path / "FILE" / "x.json",
           "LONG": tmp_path / ("a" * 256)}.get(output, output)
    rc, text = _cli(capsys, "calibrate", "--num-images", "20", "-o", out)
    assert rc == 1 and problem in text
    _no_traceback(text)
    assert ".tmp" not in text


def test_cli_long_but_legal_name_is_written(tmp_path, capsys):
    out = tmp_path / ("a" * 250 + ".json")
    rc, _ = _cli(capsys, "calibrate", "--num-images", "20", "-o", out)
    assert rc == 0 and out.is_file() and sorted(tmp_path.iterdir()) == [out]


def test_cli_model_data_mismatch_is_one_line(capsys):
    rc, text = _cli(capsys, "calibrate", "--model", "test_hostile_inputs:functional_model", "--data", "digits",
                    "--num-images", "20")
    assert rc == 1 and "_Functional on batch 0 (input 20x1x8x8 float32)" in text
    _no_traceback(text)


def test_cli_prototxt_that_is_a_folder(tmp_path, capsys):
    calib = tmp_path / "calib.json"
    calib.write_text('{"data": {"scale": 0.1}}')
    rc, text = _cli(capsys, "check", calib, "--prototxt", tmp_path)
    assert rc == 1 and "is a folder" in text
    _no_traceback(text)


# ------------------------------------------------------------------ 7: outputs published together


def test_export_with_a_bad_trt_prototxt_replaces_nothing(tmp_path, capsys):
    calib = tmp_path / "calib.json"
    calib.write_text("old calib")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\xff\x00 not a prototxt {{{")
    rc, text = _cli(capsys, "export", "--num-images", "20", "-o", calib, "--trt-cache", tmp_path / "x.cache",
                    "--trt-prototxt", garbage, "--weights-dir", tmp_path / "w")
    assert rc == 1
    _no_traceback(text)
    assert calib.read_text() == "old calib"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json", "garbage.bin"]


def test_sweep_failing_on_the_plot_replaces_nothing(tmp_path, capsys, monkeypatch):
    from torch_nvdla.sim import sweep as _sweep

    for ext in ("csv", "json"):
        (tmp_path / f"s.{ext}").write_text("old")

    def broken_plot(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(_sweep.SweepReport, "plot", broken_plot)
    rc, text = _cli(capsys, "sweep", "--calib-images", "50", "--images", "20", "--order", "isolated",
                    "-o", tmp_path / "s")
    assert rc == 1 and "no display" in text
    _no_traceback(text)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"s.csv": "old", "s.json": "old"}


def test_export_caffe_failure_leaves_the_old_set(tmp_path, capsys, monkeypatch):
    from torch_nvdla.nvdla import calibjson as _calibjson

    out = tmp_path / "out"
    rc, _ = _cli(capsys, "export-caffe", "--num-images", "50", "-o", out)
    assert rc == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"deploy.prototxt", "model.caffemodel", "calib.json"}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_calibjson, "atomic_write_json", boom)
    rc, text = _cli(capsys, "export-caffe", "--num-images", "60", "-o", out)
    assert rc == 1 and "No space left" in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no mixed set, no litter


def test_publish_together_removes_the_folders_it_created(tmp_path):
    from torch_nvdla.utils.io import atomic_write_text, publish_together

    with pytest.raises(RuntimeError):
        with publish_together():
            atomic_write_text(tmp_path / "a" / "b" / "x.txt", "x")
            atomic_write_text(tmp_path / "y.txt", "y")
            assert not (tmp_path / "y.txt").exists()  # staged, not yet published
            raise RuntimeError("late failure")
    assert list(tmp_path.iterdir()) == []
    with publish_together():
        atomic_write_text(tmp_path / "a" / "x.txt", "x")
        atomic_write_text(tmp_path / "y.txt", "y")
    assert (tmp_path / "a" / "x.txt").read_text() == "x" and (tmp_path / "y.txt").read_text() == "y"


# ------------------------------------------------------------------ 8: kill -9 litter


def test_temp_files_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    import torch_nvdla.utils.io as io_mod

    code = textwrap.dedent("""
        import os, sys
        d = sys.argv[1]
        open(os.path.join(d, ".calib.json.%d.0123456789ab.tmp" % os.getpid()), "w").write("partial")
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    litter = [p.name for p in tmp_path.iterdir()]
    assert len(litter) == 1 and litter[0].endswith(".tmp")
    # A live process's temporary file is never touched.
    live = tmp_path / f".other.json.{os.getppid()}.abcdefabcdef.tmp"
    live.write_text("in progress")
    io_mod._swept.discard(tmp_path.resolve())
    io_mod.atomic_write_text(tmp_path / "calib.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calib.json", live.name])


# ------------------------------------------------------------------ 9: bounded, linear reads


def test_calib_json_scan_is_linear(tmp_path):
    """The line of each entry is counted once, front to back: 20x the entries must not
    take anything like 400x the time (the old per-entry count from offset 0 did)."""
    from torch_nvdla.nvdla.calibjson import scan_calib_json

    def timed(n: int) -> float:
        path = tmp_path / f"c{n}.json"
        path.write_text("{\n" + ",\n".join(f'  "l{i}": {{"scale": 0.1}}' for i in range(n)) + "\n}\n")
        start = time.perf_counter()
        scan = scan_calib_json(path)
        assert len(scan.entries) == n and scan.entries[f"l{n - 1}"].line == n + 1
        return time.perf_counter() - start

    timed(500)  # warm up
    small, big = min(timed(2000) for _ in range(3)), min(timed(40000) for _ in range(2))
    assert big < 100 * small, (small, big)  # linear: ~20x; quadratic: ~400x


def test_reads_are_bounded(tmp_path, monkeypatch):
    import torch_nvdla.utils.io as io_mod
    from torch_nvdla.nvdla.calibjson import scan_calib_json

    monkeypatch.setattr(io_mod, "MAX_READ_BYTES", 1000)
    path = tmp_path / "big.json"
    path.write_text("{" + " " * 2000 + "}")
    with pytest.raises(FileFormatError, match="larger than the 1000 bytes"):
        scan_calib_json(path)
    if Path("/dev/zero").exists():
        with pytest.raises(FileFormatError, match="larger than"):
            scan_calib_json("/dev/zero")


def test_bins_are_bounded():
    from torch_nvdla.errors import CalibrationError

    with pytest.raises(CalibrationError, match="power of two from 256 to 65536"):
        calibrate(nn.Linear(2, 2), [torch.randn(2, 2)], bins=2 ** 30, progress=False)


def _npz(path: Path, arrays: dict) -> Path:
    import numpy as np

    np.savez_compressed(path, **arrays)
    return path


def test_npz_bomb_and_lying_header_are_refused(tmp_path, monkeypatch):
    import zipfile

    import numpy as np

    import torch_nvdla.utils.io as io_mod
    from torch_nvdla.nvdla.calibjson import load_weight_blobs

    bomb = _npz(tmp_path / "bomb.npz", {"conv1.weight": np.zeros((1000, 1000), np.float32)})
    monkeypatch.setattr(io_mod, "MAX_READ_BYTES", 1 << 20)
    with pytest.raises(FileFormatError, match="inflates to 4000128 bytes"):
        load_weight_blobs(bomb)
    monkeypatch.undo()
    # An .npy header claiming 10**12 elements in a few bytes.
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)}
    liar = tmp_path / "liar.npz"
    import io as _io

    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("conv1.weight.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(FileFormatError, match="more than the"):
        load_weight_blobs(liar)


# ------------------------------------------------------------------ 10: TensorRT cache lines


def test_trt_cache_splits_on_newlines_only(tmp_path):
    from torch_nvdla.nvdla.trtcache import read_trt_cache

    path = tmp_path / "c.cache"
    path.write_text("TRT-8601-EntropyCalibration2\r\nconv\x0cone: 3c010a14\r\nb\u2028x: 3c010a14\n", newline="")
    cache = read_trt_cache(path)
    assert list(cache.scales) == ["conv\x0cone", "b\u2028x"] and cache.lines["b\u2028x"] == 3


# ------------------------------------------------------------------ 11: prototxt / caffemodel


@pytest.mark.parametrize("text, rule", [
    ("", "the net has no layers"),
    ('input: "data"\nlayer {\n type: "ReLU"\n bottom: "data"\n top: "r"\n}\n', "the layer has no name"),
    ('input: "data"\nlayer {\n name: "a" type: "Foo" bottom: "data" top: "a"\n}\n', "layer type 'Foo' is not supported"),
    ('input: "data"\nlayer {\n name: "b" type: "ReLU" bottom: "zz" top: "b"\n}\n', "bottom blob 'zz'"),
    ('input: "data"\nlayer {\n name: "c" type: "ReLU" bottom: "c" top: "c"\n}\n', "its own top"),
    ('input: "data"\nlayer {\n name: "s" type: "Split" bottom: "data" top: "s"\n}\n', "'Split' is not supported"),
])
def test_check_reports_structure_problems(tmp_path, capsys, text, rule):
    from torch_nvdla.nvdla.calibjson import check_calib_json

    proto = tmp_path / "deploy.prototxt"
    proto.write_text(text)
    calib = tmp_path / "calib.json"
    calib.write_text('{"data": {"scale": 0.1}, "a": {"scale": 0.1}, "b": {"scale": 0.1}, "c": {"scale": 0.1}}')
    res = check_calib_json(calib, proto)
    assert not res.ok and any(f.rule == "structure" and rule in f.message for f in res.findings)
    rc, out = _cli(capsys, "check", calib, "--prototxt", proto)
    assert rc == 1 and "Traceback" not in out


def test_check_keys_inputs_by_blob_and_skips_pass_through_layers(tmp_path):
    from torch_nvdla.nvdla.calibjson import check_calib_json

    proto = tmp_path / "deploy.prototxt"
    proto.write_text('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 4 '
                     'dim: 4 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                     'inner_product_param { num_output: 2 } }\nlayer { name: "drop" type: "Dropout" bottom: "ip" '
                     'top: "ip" }\nlayer { name: "flat" type: "Flatten" bottom: "ip" top: "f" }\n'
                     'layer { name: "acc" type: "Accuracy" bottom: "f" top: "acc" phase: TEST }\n')
    calib = tmp_path / "calib.json"
    calib.write_text('{"data": {"scale": 0.1}, "ip": {"scale": 0.1}}')
    res = check_calib_json(calib, proto)
    assert res.ok and not [f for f in res.findings if f.level != "info"], res.findings


def test_caffemodel_with_absurd_blob_shapes_is_a_named_error(tmp_path):
    from torch_nvdla.caffe.caffemodel import _key, encode_varint, read_caffemodel

    def ld(field: int, payload: bytes) -> bytes:
        return _key(field, 2) + encode_varint(len(payload)) + payload

    for dims in ([1] * 65, [2 ** 40, 2 ** 40]):
        shape = ld(1, b"".join(encode_varint(d) for d in dims))
        blob = ld(7, shape) + ld(5, b"\0" * 4)
        layer = ld(1, b"conv") + ld(2, b"Convolution") + ld(7, blob)
        path = tmp_path / "m.caffemodel"
        path.write_bytes(ld(100, layer))
        with pytest.raises(FileFormatError) as e:
            read_caffemodel(path)
        assert str(path) in str(e.value) and "byte offset" in str(e.value)


# ------------------------------------------------------------------ 12: weights .npz


@pytest.mark.parametrize("content, problem", [
    (b"PK\x03\x04 this is not a zip", "not a readable"),
    ({"conv1.weight": __import__("numpy").zeros((0, 3))}, "is empty"),
    ({"conv1.weight": __import__("numpy").array([["a", "b"]])}, "weights must be real numbers"),
    ({"conv1.weight": __import__("numpy").ones((2, 2), complex)}, "complex"),
])
def test_weights_npz_problems_are_named(tmp_path, capsys, content, problem):
    from torch_nvdla.nvdla.calibjson import load_weight_blobs

    path = tmp_path / "w.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _npz(path, content)
    with pytest.raises(FileFormatError, match=problem):
        load_weight_blobs(path)
    calib = tmp_path / "calib.json"
    calib.write_text('{"data": {"scale": 0.1}}')
    rc, out = _cli(capsys, "check", calib, "--blobs", path)
    assert rc == 1 and problem.split()[0] in out and "Traceback" not in out


# ------------------------------------------------------------------ 14: the model's state


class _CountingBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_buffers_mutated_by_forward_are_restored():
    from torch_nvdla import int8_simulation
    from torch_nvdla.sim.evaluate import evaluate
    from torch_nvdla.sim.sweep import sweep

    model = _CountingBuffer()
    x = torch.randn(8, 1, 8, 8)
    y = torch.zeros(8, dtype=torch.int64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = calibrate(model, [(x, y)], progress=False)
    with int8_simulation(model, table, example=x):
        model(x)
    x2 = torch.randn(8, 1, 8, 8)
    evaluate(model, [(x, y)], [(x2, y)], methods=("minmax",), simulations=("fake",), progress=False)
    sweep(model, table, [(x, y)], order="isolated", simulation="fake", progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert int(model.calls) == 0


def test_sparse_leaf_output_is_skipped_with_a_reason():
    class Sparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    table = calibrate(nn.Sequential(nn.Linear(4, 4), Sparse()), [torch.randn(3, 4)], progress=False)
    assert list(table) == ["data", "0"] and "sparse" in table.meta["skipped"]["1"]


# ------------------------------------------------------------------ 15: no silent wrong results


def test_empty_batches_are_an_error():
    from torch_nvdla.errors import CalibrationError

    with pytest.raises(CalibrationError, match="no data"):
        calibrate(nn.Sequential(nn.Linear(4, 4)), [torch.empty(0, 4)], progress=False)


def test_nan_after_the_last_leaf_is_detected():
    from torch_nvdla.errors import NonFiniteActivationError

    class Log(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).log()

    with pytest.raises(NonFiniteActivationError, match="output of Log"):
        calibrate(Log(), [torch.randn(16, 4)], progress=False)


def test_mse_on_huge_float64_values():
    import numpy as np

    from torch_nvdla.calib.strategies import mse_amax

    x = torch.randn(4096, dtype=torch.float64) * 1e200
    table = calibrate(nn.Sequential(nn.Identity()).double(), [x.reshape(64, 64)], "mse", progress=False)
    assert 0 < table["0"].amax <= float(x.abs().max())
    # Scale-equivariant: the same histogram at 1e200 x its edges picks 1e200 x the amax.
    counts, edges = np.array([5.0, 3, 1, 1]), np.array([0.0, 1, 2, 3, 4])
    assert mse_amax(counts, edges * 2.0 ** 600, start_bin=1) == mse_amax(counts, edges, start_bin=1) * 2.0 ** 600


def test_bf16_evaluation_batches_hash(tmp_path):
    from torch_nvdla.sim.evaluate import _sample_hashes

    x = torch.randn(3, 4).bfloat16()
    h = _sample_hashes(x)
    assert len(h) == 3 and len(set(h)) == 3 and h == _sample_hashes(x.clone())


# ------------------------------------------------------------------ the compiler's hardware rules


@pytest.mark.parametrize("layer, rule, target", [
    ('layer { name: "n" type: "LRN" bottom: "data" top: "n" }', "no-int8", "nv_full"),
    ('layer { name: "n" type: "Sigmoid" bottom: "data" top: "n" }', "no-int8", "nv_small"),
    ('layer { name: "n" type: "Eltwise" bottom: "data" bottom: "data" top: "n" eltwise_param { operation: PROD } }',
     "eltwise-prod", "nv_full"),
    ('layer { name: "n" type: "Eltwise" bottom: "data" bottom: "data" top: "n" eltwise_param { operation: MAX } }',
     "eltwise-max", "nv_full"),
    ('layer { name: "n" type: "Eltwise" bottom: "data" bottom: "data" top: "n" }', "eltwise-target", "nv_small"),
    ('layer { name: "n" type: "Pooling" bottom: "data" top: "n" pooling_param { pool: AVE kernel_size: 13 } }',
     "pool-kernel", "nv_full"),
    ('layer { name: "n" type: "Deconvolution" bottom: "data" top: "n" convolution_param { num_output: 2 '
     'kernel_size: 2 pad: 1 } }', "deconv", "nv_full"),
    ('layer { name: "n" type: "Convolution" bottom: "data" top: "n" convolution_param { num_output: 4 '
     'kernel_size: 1 group: 2 } }', "group-conv", "nv_full"),
])
def test_check_reports_what_the_hardware_cannot_run(tmp_path, capsys, layer, rule, target):
    from torch_nvdla.nvdla.calibjson import check_calib_json

    proto = tmp_path / "deploy.prototxt"
    proto.write_text('input: "data"\ninput_shape { dim: 1 dim: 4 dim: 16 dim: 16 }\n' + layer + "\n")
    calib = tmp_path / "calib.json"
    calib.write_text('{"data": {"scale": 0.1}, "n": {"scale": 0.1}}')
    res = check_calib_json(calib, proto, target=target)
    hits = [f for f in res.findings if f.rule == rule]
    assert hits and hits[0].layer == "n" and hits[0].line == 3, res.findings
    assert not res.ok or hits[0].level == "warning"
    rc, out = _cli(capsys, "check", calib, "--prototxt", proto, "--target", target)
    assert rule in out and "Traceback" not in out


def test_entropy_on_a_narrow_band_falls_back_and_says_so(capsys):
    """conv -> Sigmoid: values in a narrow band far from zero; every entropy candidate
    folds the mass into one bin and the search keeps a threshold below all of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.mul_(0.05)
        model[0].bias.fill_(-0.2)
    x = torch.rand(16, 3, 12, 12)
    table = calibrate(model, [x], "entropy")
    out = model(x).detach()
    r = table["1"]
    assert r.method == "minmax" and "degenerate" in r.note and r.amax >= float(out.abs().max()) * 0.999
    assert "1: entropy picked" in capsys.readouterr().err
    # the note survives a save / load
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert CalibrationTable.load(table.save(Path(d) / "t.json"))["1"].note == r.note


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_transpose_weights_are_quantized_per_output_channel(tmp_path, with_bias):
    from torch_nvdla.nvdla.export_weights import export_quantized_weights
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.ConvTranspose2d(64, 32, 2, stride=2, bias=with_bias))
    table, names = calibrate_for_nvdla(model, [torch.randn(2, 3, 8, 8)], "generic", progress=False)
    summary = export_quantized_weights(model, table, names, tmp_path / "w", weights="per-filter")
    deconv = next(s for s in summary if s["module"] == "2")
    assert len(deconv["scales"]) == 32 and deconv["shape"][0] == 32 and "transposed" in deconv["layout"]
    w = model[2].weight.detach()
    expected = w.abs().amax(dim=(0, 2, 3)) / 127  # one scale per output channel (axis 1)
    assert torch.allclose(torch.tensor(deconv["scales"]), expected, rtol=1e-6)


class _Functional(nn.Module):
    """``c(relu(a(x) + b(x)))``: conv ``c`` reads a functional op's result."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x) + self.b(x))).mean((2, 3))


def test_evaluate_and_sweep_calibrate_what_the_simulation_needs(capsys):
    """A functional op feeding a conv: evaluate / sweep given calibration data observe the
    conv's input themselves; with a table that lacks it, the message names the CLI remedy."""
    from torch_nvdla.errors import CalibrationError
    from torch_nvdla.sim.evaluate import evaluate
    from torch_nvdla.sim.simulate import int8_simulation
    from torch_nvdla.sim.sweep import sweep

    torch.manual_seed(0)
    model = _Functional()
    x = torch.randn(16, 3, 8, 8)
    y = model(x).argmax(1).detach()
    calib, data = [(x[:8], y[:8])], [(x[8:], y[8:])]
    report = evaluate(model, calib, data, methods=("minmax",), simulations=("nvdla",), progress=False,
                      check_disjoint=False)
    assert report.row("minmax", "nvdla").images == 8
    swept = sweep(model, calib, data, method="minmax", order="isolated", progress=False)
    assert "c" in swept.layers and len(swept.isolated) == len(swept.layers) == 3
    with int8_simulation(model, calibrate(model, [x[:8]], "minmax", progress=False), mode="nvdla", example=x[:2]):
        pass  # the default calibration observes c's input (a functional op's result) itself
    lacking = calibrate(model, [x[:8]], "minmax", taps=TapSelection(unseen_inputs=False), progress=False)
    with pytest.raises(CalibrationError, match="--missing fp32"):
        with int8_simulation(model, lacking, mode="nvdla", example=x[:2]):
            pass


def test_fake_quant_never_leaves_a_conv_input_in_float_silently():
    from torch_nvdla.errors import CalibrationError
    from torch_nvdla.sim.simulate import int8_simulation, simulation_taps

    torch.manual_seed(0)
    model = _Functional()
    x = torch.randn(8, 3, 8, 8)
    plain = calibrate(model, [x], "minmax", taps=TapSelection(unseen_inputs=False), progress=False)
    with pytest.raises(CalibrationError, match="c needs 'c:input'"):
        with int8_simulation(model, plain, mode="fake", example=x[:2]):
            pass
    with int8_simulation(model, plain, mode="fake", missing="fp32", example=x[:2]) as sim:
        assert ("c", "c:input") in sim.missing
    full = calibrate(model, [x], "minmax", taps=simulation_taps(model, x[:2]), progress=False)
    assert list(full) == list(calibrate(model, [x], "minmax", progress=False))  # the default observes the same
    seen = {}
    with torch.no_grad(), int8_simulation(model, full, mode="fake", example=x[:2]):
        # registered after the simulation's own hooks: sees what conv ``c`` is given
        handle = model.c.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
        try:
            model(x)
        finally:
            handle.remove()
    q = seen["x"] / full["c:input"].scale
    assert torch.allclose(q, q.round(), atol=1e-3) and q.round().unique().numel() <= 256


def test_export_onnx_says_what_runs_in_float_and_strict_fails(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from torch_nvdla.export.onnx import export_onnx

    torch.manual_seed(0)
    model = _Functional()
    x = torch.randn(8, 3, 8, 8)
    plain = calibrate(model, [x], "minmax", taps=TapSelection(unseen_inputs=False), progress=False)  # no c:input
    res = export_onnx(model, plain, tmp_path / "m.onnx", example_input=x[:4], show=False)
    assert "c" in res.in_float and "FP32" in capsys.readouterr().err
    assert res.to_dict()["in_float"] == res.in_float


def functional_model():  # entry point for the CLI (this module is importable as test_hostile_inputs)
    torch.manual_seed(0)
    return _Functional()


def functional_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = torch.zeros(16, dtype=torch.int64)
    return (x[:8], y[:8]), (x[8:], y[8:])


def test_cli_export_onnx_strict_fails_when_a_layer_runs_in_float(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = ["--model", "test_hostile_inputs:functional_model", "--data", "test_hostile_inputs:functional_data"]
    table = tmp_path / "table.json"
    assert _cli(capsys, "calibrate", *model, "--num-images", "8", "-o", table)[0] == 0
    argv = ["export-onnx", *model, "--table", table, "--example-images", "4", "-o", tmp_path / "m.onnx"]
    assert _cli(capsys, *argv, "--strict")[0] == 0  # the default calibration covers every layer
    calibrate(functional_model(), [functional_data()[0][0]], taps=TapSelection(unseen_inputs=False),
              progress=False).save(table)  # a table without c's input
    assert _cli(capsys, *argv)[0] == 0
    rc, text = _cli(capsys, *argv, "--strict")
    assert rc == 1 and "FP32" in text


def test_generic_calib_json_names_the_functional_ops_it_cannot_key(tmp_path):
    from torch_nvdla.nvdla.calibjson import export_calib_json
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla

    torch.manual_seed(0)
    model = _Functional()
    table, names = calibrate_for_nvdla(model, [torch.randn(4, 3, 8, 8)], "generic", progress=False)
    report = export_calib_json(table, tmp_path / "calib.json", names, show=False)
    hits = [f for f in report.findings if f.rule == "functional-op"]
    assert [f.layer for f in hits] == ["c:input"] and hits[0].level == "warning"


class _Case1(nn.Module):
    """``c(relu(a(x) + b(x)))`` with a ReLU module: the sum is an Eltwise layer in Caffe."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.relu, self.c = nn.ReLU(), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.c(self.relu(self.a(x) + self.b(x)))


def case1_model():  # entry point for the CLI
    return _Case1().eval()


def test_calib_json_warns_when_a_module_reads_a_functional_sum(tmp_path, capsys):
    """Issue case 1 exactly: ``c(relu(a(x) + b(x)))`` with a ReLU *module*; the sum is a Caffe
    Eltwise layer whose key the generic calib.json cannot write. A model without functional
    ops, and names that were not traced (from a table), give no such warning."""
    from torch_nvdla.nvdla.calibjson import export_calib_json
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla

    torch.manual_seed(0)
    x = [torch.randn(4, 3, 8, 8)]
    table, names = calibrate_for_nvdla(case1_model(), x, "generic", progress=False)
    report = export_calib_json(table, tmp_path / "calib.json", names)
    hits = [f for f in report.findings if f.rule == "functional-op"]
    assert [(f.layer, f.level) for f in hits] == [("relu:input", "warning")]  # the sum, observed, has no key
    assert "export_caffe" in hits[0].message and "(functional-op)" in capsys.readouterr().err
    untraced = export_calib_json(table, tmp_path / "t.json", show=False).findings  # NvdlaNames.from_table
    assert [f.layer for f in untraced if f.rule == "functional-op"] == ["relu:input"]  # no per-layer guesses
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    table, names = calibrate_for_nvdla(plain, x, "generic", progress=False)
    assert not [f for f in export_calib_json(table, tmp_path / "p.json", names, show=False).findings
                if f.rule == "functional-op"]


def test_cli_check_against_a_model_names_the_keys_the_compiler_will_ask_for(tmp_path, capsys):
    """``check --model``: the calib.json is checked against the net export-caffe would write,
    so the functional sum's missing key is an error (without it: "keys not checked")."""
    from torch_nvdla.nvdla.calibjson import export_calib_json
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla

    table, names = calibrate_for_nvdla(case1_model(), [torch.randn(4, 3, 8, 8)], "generic", progress=False)
    calib = tmp_path / "calib.json"
    export_calib_json(table, calib, names, show=False)
    rc, text = _cli(capsys, "check", calib)
    assert rc == 0 and "keys not checked" in text
    rc, text = _cli(capsys, "check", calib, "--model", "test_hostile_inputs:case1_model", "--input-shape", "1,3,8,8")
    assert rc == 1 and "add" in text and "missing" in text and "test_hostile_inputs:case1_model" in text
    rc, text = _cli(capsys, "check", calib, "--model", "test_hostile_inputs:case1_model")
    assert rc == 1 and "--input-shape" in text
    _no_traceback(text)


def test_decode_output_reads_a_runtime_dump_with_the_output_scale(tmp_path, capsys):
    calib = tmp_path / "calib.json"
    calib.write_text('{"data": {"scale": 0.0078740157}, "ip2": {"scale": 0.2}, "prob": {"scale": 0.0078740157}}')
    dump = tmp_path / "output.dimg"
    dump.write_text("0 3 127 -2 64 ")  # what nvdla_runtime --rawdump writes: c, h, w order, spaces
    rc, text = _cli(capsys, "decode-output", dump, "--calib", calib, "--json")
    out = json.loads(text[text.index("{"):])
    assert rc == 0 and out["layer"] == "prob" and [t["index"] for t in out["top"][:3]] == [2, 4, 1]
    assert out["values"][2] == pytest.approx(127 * 0.0078740157)
    rc, text = _cli(capsys, "decode-output", dump, "--calib", calib, "--layer", "ip2", "--json")
    assert json.loads(text[text.index("{"):])["values"][4] == pytest.approx(64 * 0.2)
    dump.write_text("1 2 x3")
    rc, text = _cli(capsys, "decode-output", dump, "--calib", calib)
    assert rc == 1 and "value #2 'x3' is not a number" in text
    _no_traceback(text)


def test_evaluate_says_where_functional_ops_limit_the_prediction():
    from torch_nvdla.sim.evaluate import evaluate

    torch.manual_seed(0)
    model = _Functional()
    x = torch.randn(16, 3, 8, 8)
    y = model(x).argmax(1).detach()
    report = evaluate(model, [(x[:8], y[:8])], [(x[8:], y[8:])], methods=("minmax",), simulations=("nvdla",),
                      progress=False, check_disjoint=False)
    assert any("functional op's result" in n and ": c)" in n for n in report.notes), report.notes
