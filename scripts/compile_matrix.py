#!/usr/bin/env python3
"""The real NVDLA compiler on torch_nvdla's Caffe exports: what compiles, and does the
NVDLA-integer simulation predict every integer the compiler programs?

For each model: calibrate (minmax, a few batches), ``export_caffe``, then compile with the
debug build in every profile x weight mode x target asked for (feature input, a time limit
per run) and compare, where the simulation models the profile (fast-math), the compiler's
conv / fc / element-wise multipliers and shifts and its quantized biases with
``Simulation.requantization()``. A model the export refuses is reported with the reason.

    python scripts/compile_matrix.py [--models digits-lenet cifar-resnet20 resnet18] \\
        [--profiles fast-math basic] [--weights per-kernel per-filter] [--targets nv_full nv_small] [--json out.json]

Needs ``../shared/nvdla/compiler`` (or ``$TORCH_NVDLA_COMPILER``); the CIFAR / MNIST models
need the shared data; torchvision models run on random weights and 224x224 inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import groupby
from pathlib import Path

DEFAULT_MODELS = ("digits-lenet", "caffe-lenet", "cifar-resnet20", "cifar-resnet56", "resnet18", "resnet50",
                  "googlenet", "vgg11_bn", "squeezenet1_1", "mobilenet_v2")


def _model_and_data(name: str):
    import torch

    if "-" in name:  # a built-in model and its data set
        from torch_nvdla.zoo.registry import default_dataset_for, get_dataset, get_model

        model = get_model(name)
        data = get_dataset(default_dataset_for(name))
        x = data.calibration[0]
        return model, [x[i:i + 50] for i in range(0, 100, 50)], x[:4]
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model, [x], x[:1]


def _g(x: float) -> str:
    return f"{float(x):.6g}"  # the compiler prints 6 significant digits


def _compare(result, requant) -> tuple[str, str, int]:
    """Match each compiler converter to the simulated layer with the same scales; count
    equal ``m >> t``. Biases: per input scale, the multisets of ``(int16, shift)``.
    Returns ``("equal/matched", "equal/total biases", compiler ops with no simulated layer)``."""
    from collections import Counter

    ours: dict[tuple, list] = {}
    for r in requant:
        kind = "eltwise" if r.kind == "eltwise" else "conv"
        sw = "" if kind == "eltwise" or isinstance(r.s_w, tuple) else _g(r.s_w)
        ours.setdefault((kind, _g(r.s_in), _g(r.s_out), sw), []).append((r.m, r.t))
    equal = matched = unmatched = 0
    for (op, kind), lines in groupby((r for r in result.requant if r.kind != "bn"), key=lambda r: (r.op, r.kind)):
        lines = list(lines)
        per_filter = len(lines) > 1
        key = (kind, _g(lines[0].s_in), _g(lines[0].s_out), "" if kind == "eltwise" or per_filter else _g(lines[0].s_w))
        theirs = (tuple(r.m for r in lines) if per_filter else lines[0].m, lines[0].t)
        cands = ours.get(key)
        if not cands:
            unmatched += 1
            continue
        matched += 1
        if theirs in cands:
            cands.remove(theirs)
            equal += 1
        else:
            cands.pop(0)
    cb = Counter((_g(b.s_in), b.q16, b.shift) for b in result.biases)
    sb = Counter((_g(r.s_in), v, r.bias[1]) for r in requant if r.bias for v in r.bias[0])
    same = sum((cb & sb).values())
    return f"{equal}/{matched}", f"{same}/{sum(cb.values())}", unmatched


def run_model(name: str, profiles, weights_modes, targets, timeout: float) -> list[dict]:
    from torch_nvdla import calibrate
    from torch_nvdla.errors import TorchNvdlaError
    from torch_nvdla.export.caffe import caffe_tap_selection, export_caffe
    from torch_nvdla.nvdla.compiler import compile_caffe
    from torch_nvdla.sim.simulate import int8_simulation, simulation_taps

    rows = []
    model, calib, example = _model_and_data(name)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            taps = simulation_taps(model, example[:1], base=caffe_tap_selection(model, example_input=example[:1]))
            table = calibrate(model, calib, "minmax", taps=taps, progress=False)
            out = export_caffe(model, table, Path(tmp) / "export", example_input=example)
        except TorchNvdlaError as e:
            return [{"model": name, "status": "refused", "detail": str(e)[:300]}]
        for weights in weights_modes:
            ours = None
            for profile in profiles:
                for target in targets:
                    t0 = time.perf_counter()
                    res = compile_caffe(out.prototxt, out.caffemodel, out.calib_json, profile=profile,
                                        weights=weights, target=target, informat="nchw", timeout=timeout)
                    row = {"model": name, "profile": profile, "weights": weights, "target": target,
                           "seconds": round(time.perf_counter() - t0, 1)}
                    if not res.ok:
                        last = res.log.strip().splitlines()[-2:] if res.log.strip() else []
                        row.update(status="timeout" if res.timed_out else f"fail rc={res.returncode}",
                                   detail=" | ".join(last)[:300])
                    else:
                        row["status"] = "ok"
                        if profile == "fast-math":
                            if ours is None:
                                try:
                                    with int8_simulation(model, table, mode="nvdla", weights=weights,
                                                         placement="nvdla", example=example[:1]) as sim:
                                        requant = sim.requantization()
                                except TorchNvdlaError as e:
                                    row["detail"] = f"simulation: {str(e)[:200]}"
                                    rows.append(row)
                                    continue
                                ours = requant
                            row["converters"], row["biases"], extra = _compare(res, ours)
                            if extra:
                                row["detail"] = f"{extra} compiler converter(s) with no simulated layer " \
                                                "(e.g. fixed 1x1 subsampling convs)"
                    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--profiles", nargs="+", default=["fast-math"], choices=["fast-math", "basic"])
    p.add_argument("--weights", nargs="+", default=["per-kernel"], choices=["per-kernel", "per-filter"])
    p.add_argument("--targets", nargs="+", default=["nv_full"], choices=["nv_full", "nv_large", "nv_small"])
    p.add_argument("--timeout", type=float, default=600, help="seconds per compiler run (default 600)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from torch_nvdla.nvdla.compiler import find_compiler

    if find_compiler(debugquant=True) is None:
        print("the NVDLA compiler was not found: set $TORCH_NVDLA_COMPILER", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        try:
            rows += run_model(name, args.profiles, args.weights, args.targets, args.timeout)
        except FileNotFoundError as e:  # no shared data
            rows.append({"model": name, "status": "skipped", "detail": str(e)[:200]})
    t = Table(title="NVDLA compiler on torch_nvdla's Caffe exports (feature input): simulation vs compiler integers")
    cols = ["model", "profile", "weights", "target", "status", "converters", "biases", "seconds", "detail"]
    t.caption = "converters: equal m >> t / compiler converters matched to a simulated layer by their scales"
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(str(r.get(c, "")) for c in cols))
    Console().print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
