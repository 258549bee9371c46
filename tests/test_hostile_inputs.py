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

from torch_nvdla import CalibrationTable, TapRange, calibrate
from torch_nvdla._errors import FileFormatError, OutputError
from torch_nvdla.cli import main

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
    from torch_nvdla._calibjson import read_calib_json
    from torch_nvdla._trtcache import read_name_map

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
    from torch_nvdla._calibjson import read_calib_json

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
    rc, text = _cli(capsys, "calibrate", "--model", "caffe-lenet", "--data", "digits", "--num-images", "20")
    assert rc == 1 and "CaffeLeNet on batch 0 (input 20x1x8x8 float32)" in text
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
    from torch_nvdla import _sweep

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
    from torch_nvdla import _calibjson

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
    from torch_nvdla._io import atomic_write_text, publish_together

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
    import torch_nvdla._io as io_mod

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
