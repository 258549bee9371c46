"""The ``torch-nvdla`` command line: ``main(argv) -> int``.

Each subcommand lives in its own module of this package exposing ``HELP`` (one line),
``configure(parser)`` and ``run(args) -> int``; this file only dispatches, and imports a
subcommand's module (and its dependencies) only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import TorchNvdlaError

__all__ = ["main"]

#: subcommand -> module implementing it.
COMMANDS = {
    "calibrate": "calibrate",
    "check": "check",
    "convert-trt-cache": "convert_trt_cache",
    "decode-output": "decode_output",
    "demo": "demo",
    "evaluate": "evaluate",
    "export": "export",
    "export-caffe": "export_caffe",
    "export-onnx": "export_onnx",
    "sweep": "sweep",
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
    from ..utils.io import check_output, publish_together

    try:
        for option, kind in getattr(sys.modules.get(args._run.__module__), "OUTPUTS", {}).items():
            if getattr(args, option, None):
                check_output(getattr(args, option), kind)
        with publish_together() as stage:  # a run's files appear together, or none of them
            rc = int(args._run(args) or 0)
        for step in stage.after:  # work on the published files (e.g. compiling them)
            rc = max(rc, int(step() or 0))
        return rc
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises a message, never a traceback
        if os.environ.get("TORCH_NVDLA_DEBUG"):
            raise
        _error(_describe(e) + "; nothing was written")
        return 1


def _describe(e: Exception) -> str:
    """One line for the user: the error's own message, or what failed and where."""
    if isinstance(e, TorchNvdlaError):
        return str(e)
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    notes = "".join(f" ({n})" for n in getattr(e, "__notes__", ()))
    if isinstance(e, (FileNotFoundError, ValueError)):
        return (first or type(e).__name__) + notes
    return (f"{type(e).__name__}: {first}{notes} (set TORCH_NVDLA_DEBUG=1 for the traceback)")


def _error(message: str) -> None:
    from rich.markup import escape

    from ..utils.console import console

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, emoji=False, soft_wrap=True)

if __name__ == "__main__":
    raise SystemExit(main())
