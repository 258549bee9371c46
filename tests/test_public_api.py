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
