"""``torch-nvdla calibrate``: calibrate a built-in or entry-point model on a data set."""

from __future__ import annotations

import argparse
import json

from .common import add_calibration_options, add_model_options

HELP = "calibrate a model on data and write its calibration table"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "file", "cache": "file", "histdir": "folder"}


def configure(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_calibration_options(p)
    p.add_argument("--cache", default=None, help="reuse this table file when compatible, else recalibrate and overwrite it")
    p.add_argument("--histdir", default=None, help="write each tap's histogram (npz + png) here")
    p.add_argument("-o", "--output", default="table.json", help="calibration table to write (default table.json)")
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..calib.calibrate import calibrate
    from ..utils.report import print_table
    from ..zoo.registry import get_model
    from .common import calibration_kwargs, calibration_loader

    model = get_model(args.model)
    _, loader = calibration_loader(args)
    table = calibrate(model, loader, cache=args.cache, progress=not args.json, **calibration_kwargs(args))
    table.save(args.output)
    if args.histdir:
        table.save_histograms(args.histdir)
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
    else:
        print_table(table, title=f"{args.model}: {table.method} ranges -> {args.output}")
    return 0
