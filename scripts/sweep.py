#!/usr/bin/env python3
"""Layer-by-layer INT8 accuracy-drop sweep (the same as ``torch-nvdla sweep``).

    python scripts/sweep.py --model cifar-resnet20 --order isolated --images 1000 --budget 0.5 -o resnet20_sweep

Writes ``<output>.csv``, ``<output>.json`` and ``<output>.png`` and prints rich tables:
accuracy per step, drop from FP32, change from the previous step, the most sensitive
layers and (with ``--budget``) a verified FP16-fallback list.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch_nvdla.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
