"""The public API: a sorted ``__all__`` whose every name resolves; the core imports without torchvision."""

from __future__ import annotations

import subprocess
import sys

import torch_nvdla


def test_all_is_sorted_and_unique():
    assert torch_nvdla.__all__ == sorted(set(torch_nvdla.__all__))


def test_every_public_name_resolves():
    for name in torch_nvdla.__all__:
        assert getattr(torch_nvdla, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    try:
        torch_nvdla.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_core_imports_without_torchvision_or_onnx():
    # Block torchvision and onnx, then import the package and calibrate a tiny model.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torchvision', 'onnx', 'onnxruntime'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, torch_nvdla\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())\n"
        "t = torch_nvdla.calibrate(m, [torch.randn(8, 4)], 'minmax', progress=False)\n"
        "assert set(t) == {'data', '0', '1'}, list(t)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_lists_every_subcommand(capsys):
    from torch_nvdla.cli import COMMANDS, main

    assert main([]) == 2
    help_text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in help_text


def test_every_type_a_public_function_returns_is_public():
    import inspect
    import typing

    public = set(torch_nvdla.__all__)
    missing = []
    for name in torch_nvdla.__all__:
        obj = getattr(torch_nvdla, name)
        if isinstance(obj, type) or not callable(obj):
            continue
        ret = inspect.signature(obj).return_annotation
        text = ret if isinstance(ret, str) else getattr(ret, "__name__", str(ret))
        for word in typing.cast(str, text).replace("[", " ").replace("]", " ").replace(",", " ").split():
            if word[:1].isupper() and word not in public and word not in {"Iterator", "Path", "Any"}:
                missing.append(f"{name} -> {word}")
    assert not missing, missing


def test_calibration_mode_and_forward_loop_give_the_loaders_table():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    ref = torch_nvdla.calibrate(model, data, progress=False)
    with torch_nvdla.calibration_mode(model) as cal:
        for x in data:
            model(x)
    assert cal.forwards == 3 and cal.table.amaxes() == ref.amaxes()
    loop = torch_nvdla.calibrate(model, forward_loop=lambda m: [m(x) for x in data], progress=False)
    assert loop.amaxes() == ref.amaxes()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_calibration_mode_errors():
    import pytest
    import torch

    model = torch.nn.Linear(2, 2)
    with pytest.raises(torch_nvdla.CalibrationError, match="no forward pass"):
        with torch_nvdla.calibration_mode(model):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with torch_nvdla.calibration_mode(model) as cal:
            model(torch.randn(1, 2))
            raise RuntimeError("boom")
    with pytest.raises(torch_nvdla.CalibrationError, match="table is ready"):
        cal.table  # noqa: B018
    assert not model._forward_hooks
    with pytest.raises(torch_nvdla.CalibrationError, match="a loader or a forward_loop"):
        torch_nvdla.calibrate(model, [torch.randn(1, 2)], forward_loop=lambda m: None)
    with pytest.raises(torch_nvdla.CalibrationError, match="cache= needs a loader"):
        torch_nvdla.calibrate(model, forward_loop=lambda m: m(torch.randn(1, 2)), cache="x.json")
