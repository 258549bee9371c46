"""``torch-nvdla calibrate``: calibrate a built-in or entry-point model on a data set."""

from __future__ import annotations

import argparse
import json

HELP = "calibrate a model on data and write its calibration table"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits-lenet", help="built-in name or package.module:function (default: digits-lenet)")
    p.add_argument("--data", default=None, help="built-in name or package.module:function (default: the model's own)")
    p.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile", "mse"])
    p.add_argument("--input-method", default="minmax", help="strategy for the model input tap 'data' (default minmax; 'same' = --method)")
    p.add_argument("--num-images", type=int, default=500, help="calibration images (default 500)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--bins", type=int, default=2048)
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--threshold", type=float, default=None, help="NVDLA calibrator spelling: a fraction, 0.9 = 90th percentile")
    p.add_argument("--cache", default=None, help="reuse this table file when compatible, else recalibrate and overwrite it")
    p.add_argument("--histdir", default=None, help="write each tap's histogram (npz + png) here")
    p.add_argument("-o", "--output", default="table.json", help="calibration table to write (default table.json)")
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ._calibrate import calibrate
    from ._report import print_table
    from ._zoo import default_dataset_for, get_dataset, get_model

    model = get_model(args.model)
    data = get_dataset(args.data or default_dataset_for(args.model))
    loader = data.loader("calibration", args.batch_size, limit=args.num_images)
    table = calibrate(model, loader, args.method, bins=args.bins, percentile=args.percentile,
                      threshold=args.threshold, cache=args.cache, progress=not args.json,
                      input_method=None if args.input_method == "same" else args.input_method)
    table.save(args.output)
    if args.histdir:
        table.save_histograms(args.histdir)
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
    else:
        print_table(table, title=f"{args.model}: {table.method} ranges -> {args.output}")
    return 0
