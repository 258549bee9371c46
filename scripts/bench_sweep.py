#!/usr/bin/env python3
"""Benchmark: a full isolated INT8 sweep of the CIFAR-10 ResNet-20 on 1000 images.

Target (issue #4): at most 5 minutes on a 2-core CPU. Calibrates once (entropy, 500
calibration images), then times :func:`torch_nvdla.sim.sweep.sweep` alone on 1000
evaluation images evenly spaced over the evaluation split (NVDLA integer simulation,
per-filter weights), and compares the time with plain FP32 passes over the same images.

    python scripts/bench_sweep.py [--order isolated] [--images 1000] [--threads 2] [--json out.json]

Needs the shared data folder (``$TORCH_NVDLA_DATA`` or ``../shared/data``).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar-resnet20")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--order", default="isolated", choices=["isolated", "cumulative", "both"])
    p.add_argument("--simulation", default="nvdla", choices=["nvdla", "fake"])
    p.add_argument("--weights", default="per-filter", choices=["per-filter", "per-kernel"])
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the target machine)")
    p.add_argument("--json", default=None, help="write the timings and the sweep here")
    p.add_argument("--output", default=None, help="also save the sweep's CSV/JSON/PNG with this prefix")
    args = p.parse_args(argv)

    import torch

    from torch_nvdla.calib.calibrate import calibrate
    from torch_nvdla.sim.evaluate import spread_subset
    from torch_nvdla.sim.sweep import sweep
    from torch_nvdla.utils.paths import data_root
    from torch_nvdla.zoo.data import batches
    from torch_nvdla.zoo.registry import default_dataset_for, get_dataset, get_model

    if data_root() is None:
        print("skipped: the shared data folder was not found (set TORCH_NVDLA_DATA)")
        return 0
    torch.set_num_threads(args.threads)
    model = get_model(args.model)
    data = get_dataset(default_dataset_for(args.model))
    t0 = time.perf_counter()
    table = calibrate(model, data.loader("calibration", args.batch_size), "entropy", progress=False)
    t_cal = time.perf_counter() - t0
    xs, ys = spread_subset(*data.split("evaluation"), args.images)
    loader = batches(xs, ys, args.batch_size)
    with torch.no_grad():
        t0 = time.perf_counter()
        for x, _ in loader:
            model(x)
        t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = sweep(model, table, loader, order=args.order, simulation=args.simulation, weights=args.weights,
                   budget=args.budget, progress=sys.stderr.isatty())
    t_sweep = time.perf_counter() - t0
    report.print()
    steps = len(report.layers) * (2 if args.order == "both" else 1)
    print(f"{args.model}: {args.order} sweep of {len(report.layers)} layers on {report.images} images: "
          f"{t_sweep:.1f} s (target <= 300 s; calibration {t_cal:.1f} s; one FP32 pass {t_fp32:.2f} s, "
          f"{steps} steps = {t_sweep / max(t_fp32, 1e-9):.1f} FP32 passes; {args.threads} threads)")
    if args.output:
        report.save(args.output)
    if args.json:
        from torch_nvdla.utils.io import atomic_write_json

        atomic_write_json(args.json, {"model": args.model, "order": args.order, "images": report.images,
                                      "threads": args.threads, "sweep_seconds": t_sweep,
                                      "calibration_seconds": t_cal, "fp32_pass_seconds": t_fp32,
                                      "report": report.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
