"""The coverage matrix (``scripts/coverage_matrix.py``) as a test: every step on every model
either works or refuses with a torch_nvdla error naming the reason -- never another
exception. The small hand-written nets run by default; torchvision's with ``--heavy``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "coverage_matrix.py"
_spec = importlib.util.spec_from_file_location("coverage_matrix", _SCRIPT)
coverage = importlib.util.module_from_spec(_spec)
sys.modules["coverage_matrix"] = coverage  # (its dataclasses look their module up there)
_spec.loader.exec_module(coverage)

SMALL = [name for name, (_, _, heavy) in coverage.MODELS.items() if not heavy]
HEAVY = [name for name, (_, _, heavy) in coverage.MODELS.items() if heavy]

#: What each small net must give: the steps that must work (the rest must refuse cleanly).
EXPECTED_OK = {
    "functional": set(coverage.STEPS) - {"compile"},
    "module-reuse": {"calibrate", "fake", "nvdla", "calib.json", "onnx"},
    "decoder": {"calibrate", "fake", "nvdla", "calib.json", "onnx"},
}


@pytest.mark.parametrize("name", SMALL)
def test_small_nets_every_step_works_or_refuses_cleanly(name, tmp_path):
    row = coverage.run_model(name, workdir=tmp_path, compiler_timeout=60)
    errors = {step: c.detail for step, c in row.cells.items() if c.status == "error"}
    assert not errors, errors
    ok = {step for step, c in row.cells.items() if c.status == "ok"}
    assert EXPECTED_OK[name] <= ok, {s: row.cells[s].text() for s in EXPECTED_OK[name] - ok}
    # one default calibration fed both simulations and the ONNX export
    assert "layer(s) FP32" not in row.cells["nvdla"].detail and "tap(s) FP32" not in row.cells["onnx"].detail


def test_refusals_name_the_reason(tmp_path):
    row = coverage.run_model("decoder", workdir=tmp_path)
    assert row.cells["caffe"].status == "refused" and "PReLU" in row.cells["caffe"].detail
    row = coverage.run_model("module-reuse", workdir=tmp_path)
    assert row.cells["caffe"].status == "refused" and "pooling kernel 16x16" in row.cells["caffe"].detail


@pytest.mark.heavy
@pytest.mark.parametrize("name", HEAVY)
def test_torchvision_every_step_works_or_refuses_cleanly(name, tmp_path):
    row = coverage.run_model(name, workdir=tmp_path, compiler_timeout=300)
    errors = {step: c.detail for step, c in row.cells.items() if c.status == "error"}
    assert not errors, errors
    assert row.cells["calibrate"].status == "ok"
