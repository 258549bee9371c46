#!/usr/bin/env python3
"""Benchmark: INT8 accuracy of torch_nvdla next to nvidia-modelopt, on the same images.

For each model (Caffe LeNet on MNIST, ResNet-20 on the CIFAR-10 JPEG test set): 500
calibration images, the other 9500 for evaluation (the built-in splits, disjoint), batch
100. Per strategy -- modelopt ``max`` / ``entropy`` / ``percentile 99.99`` against
torch_nvdla ``minmax`` / ``entropy`` / ``percentile 99.99`` -- it reports top-1:

* **modelopt**: ``mtq`` with INT8 per-channel weights (max) and per-tensor inputs of the
  conv / linear layers (its placement), calibrated as ``shared/peers/MODELOPT.md`` says
  works in 0.47 (``algorithm=None``, stats collection, ``load_calib_amax`` per quantizer).
* **torch_nvdla, modelopt placement**: the same tensors quantized (``placement="modelopt"``,
  calibrated with the conv / linear inputs as ``:input`` taps, per-filter weights) -- the
  like-with-like comparison: it should be at least as good.
* **torch_nvdla, NVDLA placement**: every tensor NVDLA writes, fake-quant of every tap
  (``placement="all"``) and the NVDLA integer pipeline (``mode="nvdla"``) -- what a user of
  the hardware should believe.

    python scripts/bench_accuracy.py [--models caffe-lenet cifar-resnet20] [--eval-images N] [--json out.json]

Needs the shared data folder and nvidia-modelopt (``pip install torch_nvdla[bench]``); a
missing modelopt leaves its column empty.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
import warnings

#: torch_nvdla strategy -> modelopt strategy.
PAIRS = (("minmax", "max"), ("entropy", "entropy"), ("percentile", "percentile"))
PERCENTILE = 99.99


def _modelopt_quantize(model, method: str, calib_batches):
    """A modelopt-quantized copy of ``model``: INT8 per-channel weights, per-tensor conv/linear inputs."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = copy.deepcopy(model).eval()
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg["algorithm"] = None  # MODELOPT.md: calibrate by hand, per quantizer
    if method in ("entropy", "percentile"):
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
                entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
    mtq.quantize(q, cfg, forward_loop=None)
    enable_stats_collection(q)
    with torch.no_grad():
        for x, _ in calib_batches:
            q(x)
    for _, module in q.named_modules():
        if not isinstance(module, TensorQuantizer) or module._disabled:
            continue
        cal = getattr(module, "_calibrator", None)
        if cal is not None:
            if type(cal).__name__ == "HistogramCalibrator":
                if method == "entropy":
                    module.load_calib_amax("entropy")
                else:
                    module.load_calib_amax("percentile", percentile=PERCENTILE)
            else:
                module.load_calib_amax()
        module.enable_quant()
        module.disable_calib()
    return q


def _top1(model, batches) -> float:
    import torch

    c = n = 0
    with torch.no_grad():
        for x, y in batches:
            c += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * c / n


def bench_model(name: str, eval_images: int | None, batch_size: int, weights: str) -> dict:
    import torch

    from torch_nvdla.calib.calibrate import calibrate
    from torch_nvdla.calib.taps import TapSelection
    from torch_nvdla.sim.evaluate import spread_subset
    from torch_nvdla.sim.simulate import int8_simulation
    from torch_nvdla.zoo.data import batches
    from torch_nvdla.zoo.registry import default_dataset_for, get_dataset, get_model

    model = get_model(name)
    data = get_dataset(default_dataset_for(name))
    calib = data.loader("calibration", batch_size)
    xs, ys = spread_subset(*data.split("evaluation"), eval_images)
    ev = batches(xs, ys, batch_size)
    out: dict = {"model": name, "calibration_images": len(data.calibration[1]), "evaluation_images": len(ys),
                 "weights": weights, "rows": []}
    t0 = time.perf_counter()
    out["fp32"] = _top1(model, ev)
    print(f"{name}: FP32 {out['fp32']:.2f} % on {len(ys)} images", flush=True)

    # torch_nvdla: one histogram pass with the conv / linear inputs as extra taps, re-picked per strategy.
    weighted = [p for p, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    base = calibrate(model, calib, "entropy", taps=TapSelection(inputs=tuple(weighted)), progress=False)
    have_modelopt = importlib.util.find_spec("modelopt") is not None
    if not have_modelopt:
        print("nvidia-modelopt is not installed: its column stays empty", flush=True)
    for ours, theirs in PAIRS:
        table = base if ours == "entropy" else base.with_method(
            ours, **({"percentile": PERCENTILE} if ours == "percentile" else {}))
        row = {"method": ours, "modelopt_method": theirs}
        if have_modelopt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["modelopt"] = _top1(_modelopt_quantize(model, theirs, calib), ev)
        for key, kw in (("ours_modelopt_placement", {"mode": "fake", "placement": "modelopt"}),
                        ("ours_fake_all", {"mode": "fake", "placement": "all"}),
                        ("ours_nvdla", {"mode": "nvdla"})):
            with int8_simulation(model, table, weights=weights, **kw):
                row[key] = _top1(model, ev)
        out["rows"].append(row)
        print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def print_results(results: list[dict]) -> None:
    from rich.table import Table

    from torch_nvdla.utils.report import stdout

    t = Table(title="INT8 top-1 % next to nvidia-modelopt (same images)",
              caption="A: torch_nvdla, modelopt's placement (conv/linear inputs + weights); "
                      "B: torch_nvdla fake-quant, every tap; C: torch_nvdla NVDLA integer pipeline")
    for col in ("model", "strategy", "FP32", "modelopt", "A", "B", "C"):
        t.add_column(col, justify="left" if col in ("model", "strategy") else "right")
    for res in results:
        for r in res["rows"]:
            mo = r.get("modelopt")
            like = r["ours_modelopt_placement"]
            mark = "" if mo is None or like >= mo - 1e-9 else "*"
            t.add_row(res["model"], r["method"], f"{res['fp32']:.2f}",
                      "-" if mo is None else f"{mo:.2f}", f"{like:.2f}{mark}", f"{r['ours_fake_all']:.2f}",
                      f"{r['ours_nvdla']:.2f}")
    stdout.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["caffe-lenet", "cifar-resnet20"])
    p.add_argument("--eval-images", type=int, default=None, help="evenly spaced evaluation images (default all 9500)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--weights", default="per-filter", choices=["per-filter", "per-kernel"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import torch

    from torch_nvdla.utils.paths import data_root

    if data_root() is None:
        print("skipped: the shared data folder was not found (set TORCH_NVDLA_DATA)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench_model(m, args.eval_images, args.batch_size, args.weights) for m in args.models]
    print_results(results)
    if args.json:
        from torch_nvdla.utils.io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
