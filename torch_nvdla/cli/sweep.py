"""``torch-nvdla sweep``: layer-by-layer INT8 accuracy drop and a suggested FP16 fallback."""

from __future__ import annotations

import argparse
import json

from .common import add_missing_option, add_model_options, add_weights_option

HELP = "turn layers to INT8 one by one (cumulative) or alone (isolated) and measure the accuracy drop"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "prefix"}


def configure(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--calib-images", type=int, default=500, help="calibration images (default 500)")
    p.add_argument("--images", type=int, default=1000,
                   help="evaluation images per step, evenly spaced over the evaluation split (default 1000)")
    p.add_argument("--order", default="both", choices=["cumulative", "isolated", "both"])
    p.add_argument("--simulation", default="nvdla", choices=["nvdla", "fake"],
                   help="NVDLA integer arithmetic (default) or fake-quant on the same graph")
    add_weights_option(p)
    p.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile", "mse"])
    p.add_argument("--budget", type=float, default=None,
                   help="allowed top-1 drop in points: suggest (and verify) an FP16 fallback list")
    p.add_argument("--top-k", type=int, default=5, help="how many sensitive layers to name (default 5)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--table", default=None, help="use a saved calibration table instead of calibrating")
    add_missing_option(p)
    p.add_argument("-o", "--output", default="sweep",
                   help="write OUTPUT.csv, OUTPUT.json and OUTPUT.png (default sweep)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..sim.sweep import sweep
    from ..utils.console import say
    from .common import evaluation_setup

    _, model, calibration, evaluation = evaluation_setup(args, args.images)
    report = sweep(model, calibration, evaluation, method=args.method, order=args.order,
                   simulation=args.simulation, weights=args.weights, budget=args.budget, top_k=args.top_k,
                   missing=args.missing, progress=not args.json)
    paths = report.save(args.output, plot=not args.no_plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        report.print()
        say(f"wrote {', '.join(str(p) for p in paths.values())} ({report.seconds:.1f} s)")
    return 0
