"""``torch-nvdla evaluate``: FP32 vs INT8 accuracy on held-out images (TensorRT sampleINT8's check)."""

from __future__ import annotations

import argparse
import json

from .common import add_missing_option, add_model_options, add_weights_option

HELP = "compare FP32 and INT8 (fake-quant, NVDLA integer) top-1/top-5 accuracy per calibration strategy"


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "file"}


def configure(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--calib-images", type=int, default=500, help="calibration images (default 500; disjoint from evaluation)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="evaluation images, evenly spaced over the split (default: the whole evaluation split)")
    p.add_argument("--methods", type=_csv, default=("entropy", "minmax", "percentile"),
                   help="comma-separated strategies (default entropy,minmax,percentile)")
    p.add_argument("--simulations", type=_csv, default=("fake", "nvdla"),
                   help="comma-separated: fake (fake-quant), nvdla (NVDLA integer) (default both)")
    add_weights_option(p)
    p.add_argument("--placement", default="all", choices=["all", "nvdla", "modelopt"],
                   help="which tensors fake-quant quantizes (default all: every tap)")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--table", default=None, help="evaluate a saved calibration table instead of calibrating")
    add_missing_option(p)
    p.add_argument("--plan", action="store_true",
                   help="print the simulated NVDLA graph: fused layers and the scale each reads and writes")
    p.add_argument("-o", "--output", default=None, help="also write the report as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..sim.evaluate import evaluate
    from ..utils.console import say
    from ..utils.io import atomic_write_json
    from .common import evaluation_setup

    data, model, calibration, evaluation = evaluation_setup(args, args.eval_images)
    report = evaluate(model, calibration, evaluation,
                      methods=args.methods, simulations=args.simulations, weights=args.weights,
                      placement=args.placement, percentile=args.percentile, missing=args.missing,
                      progress=not args.json, model_name=args.model, data_name=data.name)
    if args.output:
        atomic_write_json(args.output, report.to_dict())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        if args.plan:
            for method, plan in report.plans.items():  # the plans the NVDLA simulations ran
                plan.print(title=f"NVDLA simulation plan ({method})")
                break
            else:
                say("[yellow]--plan: no NVDLA simulation ran (add nvdla to --simulations)[/]")
        report.print()
        for note in report.notes:
            say(f"[yellow]{note}[/]")
    return 0
