#!/usr/bin/env python
"""onnxruntime (Q/DQ ONNX) vs torch_nvdla's fake-quant simulation: top-1 and per-tensor agreement.

For each model (Caffe LeNet on MNIST, ResNet-20 on CIFAR-10 by default): calibrate on the
calibration split, export the Q/DQ ONNX model (:func:`torch_nvdla.export.onnx.export_onnx`) for
each placement, and run :func:`torch_nvdla.export.onnx.compare_with_onnxruntime` on the
evaluation split -- with onnxruntime's own QuantizeLinear (round half to even) and with
NVDLA's round-half-away emulated, which isolates what the rounding mode alone changes.
Needs the shared data folder (``$TORCH_NVDLA_DATA`` or ``../shared/data``).

Usage::

    python scripts/bench_onnx.py                          # everything, full evaluation split
    python scripts/bench_onnx.py --models caffe-lenet --num-images 2000 --json out.json
    python scripts/bench_onnx.py --placements nvdla --rounding half-even --details
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# Run against the checkout this script lives in, installed or not.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from torch_nvdla import calibrate  # noqa: E402
from torch_nvdla.export.onnx import compare_with_onnxruntime, export_onnx  # noqa: E402
from torch_nvdla.utils.io import atomic_write_json  # noqa: E402
from torch_nvdla.utils.report import stdout  # noqa: E402
from torch_nvdla.zoo.registry import default_dataset_for, get_dataset, get_model  # noqa: E402

DEFAULT_MODELS = ("caffe-lenet", "cifar-resnet20")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--placements", nargs="+", default=["nvdla", "all"], choices=["nvdla", "all"])
    p.add_argument("--rounding", nargs="+", default=["half-even", "half-away"], choices=["half-even", "half-away"])
    p.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile", "mse"])
    p.add_argument("--calib-images", type=int, default=500)
    p.add_argument("--num-images", type=int, default=None, help="evaluation images (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--weights", default="per-filter", choices=["per-filter", "per-kernel"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--details", action="store_true", help="print the per-tensor tables")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        model = get_model(name)
        data = get_dataset(default_dataset_for(name))
        table = calibrate(model, data.loader("calibration", 100, limit=args.calib_images), args.method, progress=False)
        x0 = data.split("calibration")[0][:16]
        for placement in args.placements:
            export = export_onnx(model, table, None, example_input=x0, placement=placement, weights=args.weights)
            for rounding in args.rounding:
                loader = data.loader("evaluation", args.batch_size, limit=args.num_images)
                t0 = time.perf_counter()
                r = compare_with_onnxruntime(model, table, loader, export=export, weights=args.weights,
                                             rounding=rounding, show=args.details,
                                             title=f"{name}: placement {placement}, {rounding}")
                rows.append({
                    "model": name, "placement": placement, "rounding": rounding, "seconds": time.perf_counter() - t0,
                    "unmapped": len(export.unmapped), "qdq_pairs": len(export.quantized),
                    "ties": sum(t.ties for t in r.taps), "flips": sum(t.flips for t in r.taps),
                    **{k: v for k, v in r.to_dict().items() if k not in ("taps", "unmapped")},
                })

    t = Table(title=f"onnxruntime Q/DQ vs int8_simulation (fake-quant), {args.method} calibration, "
                    f"{args.weights} weights")
    for col in ("model", "placement", "rounding", "images", "FP32", "simulation", "onnxruntime", "gap", "same class",
                "local max", "e2e max", "flips*", "Q/DQ", "unmapped"):
        t.add_column(col, justify="left" if col in ("model", "placement", "rounding") else "right")
    for r in rows:
        t.add_row(r["model"], r["placement"], r["rounding"], str(r["samples"]), f"{r['top1_fp32']:.2f}",
                  f"{r['top1_simulation']:.2f}", f"{r['top1_onnxruntime']:.2f}", f"{r['top1_gap']:.2f}",
                  f"{r['agreement']:.2f} %", f"{r['local_steps_same_graph']:.3f}", f"{r['max_steps_same_graph']:.0f}",
                  str(r["flips"]), str(r["qdq_pairs"]), str(r["unmapped"]))
    stdout.print(t)
    stdout.print("local max / e2e max: largest |onnxruntime - simulation| in steps over tensors of the same graph, "
                 "each tensor recomputed from the simulation's inputs / end to end; flips*: ties rounded differently "
                 "half-even vs half-away in the first batch.", highlight=False)
    if args.json:
        atomic_write_json(args.json, {"platform": platform.platform(), "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
