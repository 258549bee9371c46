"""The ``torch-nvdla`` command line: ``main(argv) -> int``.

Each subcommand lives in its own ``_cmd_<name>.py`` module exposing ``HELP`` (one line),
``configure(parser)`` and ``run(args) -> int``; this file only dispatches, and imports a
subcommand's module (and its dependencies) only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._errors import TorchNvdlaError

__all__ = ["main"]

#: subcommand -> module implementing it.
COMMANDS = {
    "calibrate": "_cmd_calibrate",
    "check": "_cmd_check",
    "convert-trt-cache": "_cmd_convert_trt_cache",
    "demo": "_cmd_demo",
    "evaluate": "_cmd_evaluate",
    "export": "_cmd_export",
    "export-caffe": "_cmd_export_caffe",
    "export-onnx": "_cmd_export_onnx",
    "sweep": "_cmd_sweep",
}


def _available() -> dict[str, str]:
    out = {}
    for name, mod in COMMANDS.items():
        if importlib.util.find_spec(f"{__package__}.{mod}") is not None:
            out[name] = mod
    return out


def main(argv: list[str] | None = None) -> int:
    """Run ``torch-nvdla`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    parser = argparse.ArgumentParser(prog="torch-nvdla", description="INT8 calibration for NVDLA from PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others are listed by name.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, mod in commands.items():
        if name == chosen:
            module = importlib.import_module(f"{__package__}.{mod}")
            p = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.configure(p)
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, help=f"see: torch-nvdla {name} --help")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (TorchNvdlaError, FileNotFoundError, KeyError, ValueError) as e:
        from ._console import console

        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        console.print(f"[bold red]error:[/] {msg}", highlight=False)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
