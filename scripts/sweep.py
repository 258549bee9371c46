#!/usr/bin/env python3
"""Layer-by-layer INT8 accuracy-drop sweep (the same as ``torch-nvdla sweep``).

    python scripts/sweep.py --model cifar-resnet20 --order isolated --images 1000 --budget 0.5 -o resnet20_sweep

Writes ``<output>.csv``, ``<output>.json`` and ``<output>.png`` and prints rich tables:
accuracy per step, drop from FP32, change from the previous step, the most sensitive
layers and (with ``--budget``) a verified FP16-fallback list.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from torch_nvdla import _cmd_sweep
    from torch_nvdla._console import console
    from torch_nvdla._errors import TorchNvdlaError

    parser = argparse.ArgumentParser(prog="sweep.py", description=_cmd_sweep.HELP)
    _cmd_sweep.configure(parser)
    args = parser.parse_args(argv)
    try:
        return _cmd_sweep.run(args)
    except (TorchNvdlaError, FileNotFoundError, ValueError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
