"""Atomic writes: a killed writer or a failed serialisation never leaves a half-written file."""

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

import torch_nvdla.utils.io as io_mod
from torch_nvdla.utils.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

PACKAGE_DIR = Path(io_mod.__file__).parents[1]
OLD = {"format": "old", "values": [1, 2, 3]}


def _old_file(tmp_path: Path) -> Path:
    target = tmp_path / "table.json"
    atomic_write_json(target, OLD)
    return target


def _others(directory: Path, target: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p != target)


# A writer that imports torch_nvdla.utils.io under a stub package (so the package's __init__, and
# torch, are not imported: it starts in a fraction of a second) and rewrites the target with
# a large, self-checking payload until it is killed.
WRITER = textwrap.dedent(
    """
    import importlib.machinery, sys, types
    package = types.ModuleType("torch_nvdla")
    package.__path__ = [sys.argv[1]]
    package.__spec__ = importlib.machinery.ModuleSpec("torch_nvdla", None, is_package=True)
    package.__spec__.submodule_search_locations = [sys.argv[1]]
    sys.modules["torch_nvdla"] = package
    import torch_nvdla.utils.io as mod
    size = int(sys.argv[3])
    i = 0
    while True:
        body = bytes([65 + i % 26]) * size
        mod.atomic_write_bytes(sys.argv[2], b"BEGIN %d " % size + body + b" END")
        i += 1
    """
)


def _complete_payload(data: bytes) -> bool:
    head, _, rest = data.partition(b" ")
    if head != b"BEGIN":
        return False
    size, _, rest = rest.partition(b" ")
    return rest.endswith(b" END") and len(rest) == int(size) + 4 and len(set(rest[:-4])) == 1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_writer_killed_mid_write_leaves_old_or_complete_file(tmp_path, delay):
    target = _old_file(tmp_path)
    size = 64 << 20
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(PACKAGE_DIR), str(target), str(size)])
    try:
        # Wait until a temporary file is being filled, optionally a little longer, then kill.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
                break
            time.sleep(0.001)
        else:
            pytest.fail(f"writer never started writing (exit code {proc.poll()})")
        time.sleep(delay)
        caught_mid_write = any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    data = target.read_bytes()
    if delay == 0.0:
        assert caught_mid_write
    # The target is the old file or one complete new payload -- never a prefix.
    assert data == (json.dumps(OLD, indent=2) + "\n").encode() or _complete_payload(data)
    if data.startswith(b"{"):
        assert json.loads(data) == OLD
    # Leftovers of the killed write are hidden temporary files, never the target's name.
    for leftover in _others(tmp_path, target):
        assert leftover.name.startswith(".table.json.") and leftover.name.endswith(".tmp")


def test_serialisation_error_leaves_old_file_and_no_temp(tmp_path):
    target = _old_file(tmp_path)
    with pytest.raises(ValueError):
        atomic_write_json(target, {"amax": float("nan")})  # NaN is not JSON
    with pytest.raises(TypeError):
        atomic_write_json(target, {"tensor": object()})
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12345)  # fails inside the write, after the temp file exists
    assert json.loads(target.read_text()) == OLD
    assert _others(tmp_path, target) == []


@pytest.mark.parametrize("where", ["fsync", "replace", "interrupt"])
def test_failure_during_write_cleans_up(tmp_path, monkeypatch, where):
    target = _old_file(tmp_path)

    def boom(*args, **kwargs):
        if where == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_mod.os, "fsync" if where != "replace" else "replace", boom)
    with pytest.raises(KeyboardInterrupt if where == "interrupt" else OSError):
        atomic_write_text(target, "new content")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == OLD
    assert _others(tmp_path, target) == []


def test_table_save_failure_keeps_previous_table(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_nvdla import CalibrationTable, TapRange

    target = tmp_path / "calib.json"
    good = CalibrationTable({"data": TapRange("data", 2.0, "minmax")}, meta={"method": "minmax"})
    good.save(target)
    bad = CalibrationTable({"data": TapRange("data", 3.0, "minmax")}, meta={"oops": torch.zeros(1)})
    with pytest.raises(TypeError):
        bad.save(target)
    assert CalibrationTable.load(target).amaxes() == {"data": 2.0}
    assert _others(tmp_path, target) == []


def test_new_files_get_normal_modes_and_replaced_files_keep_theirs(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX file modes")
    fresh = atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(fresh, 0o640)
    atomic_write_text(fresh, "y")
    assert fresh.stat().st_mode & 0o777 == 0o640 and fresh.read_text() == "y"


def test_creates_missing_directories(tmp_path):
    path = atomic_write_bytes(tmp_path / "a" / "b" / "c.bin", b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_new_file_gets_the_umask_mode_and_a_replaced_file_keeps_its_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        fresh = atomic_write_text(tmp_path / "fresh.json", "{}")
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o640)
        atomic_write_text(kept, "[]")
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "[]"
    finally:
        os.umask(old_umask)
