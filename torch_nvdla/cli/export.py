"""``torch-nvdla export``: calibrate a model for NVDLA and write calib.json (+ TensorRT cache, weights)."""

from __future__ import annotations

import argparse
import json

from .common import add_calibration_options, add_model_options, add_weights_option

HELP = "calibrate a model with NVDLA layer names and write the compiler's calib.json"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "file", "save_table": "file", "trt_cache": "file", "weights_dir": "folder"}


def configure(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--preset", default="auto", choices=["auto", "caffe-lenet", "resnet-caffe", "generic"],
                   help="layer naming preset (default: auto-detect)")
    p.add_argument("--names", default=None, metavar="MAP.json",
                   help="user names: a JSON object {tap or layer: name or null}; wins over the preset")
    p.add_argument("--table", default=None, help="use this saved calibration table instead of calibrating")
    p.add_argument("--save-table", default=None, help="also save the calibration table here")
    add_calibration_options(p)
    p.add_argument("--eltwise", default="report", choices=["report", "unify"],
                   help="element-wise inputs with different ranges: report them, or unify them to the largest")
    p.add_argument("--allow-missing", action="store_true", help="write even if some layers have no range (the compiler will abort)")
    p.add_argument("-o", "--output", default="calib.json", help="calib.json to write (default calib.json)")
    p.add_argument("--trt-cache", default=None, help="also write a TensorRT calibration cache (NVDLA layer names; TensorRT's with --trt-prototxt)")
    p.add_argument("--trt-version", default=None, help="TensorRT version in the cache header (default 8601)")
    p.add_argument("--trt-prototxt", default=None,
                   help="write the cache with the tensor names TensorRT gives this deploy prototxt's blobs")
    p.add_argument("--weights-dir", default=None, help="also write quantized weights (weights.npz + weights.json) here")
    add_weights_option(p)
    p.add_argument("--fold-batchnorm", action="store_true", help="fold BatchNorms into the preceding conv before quantizing")
    p.add_argument("--json", action="store_true", help="print the written scales and the findings as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..calib.table import CalibrationTable
    from ..nvdla.calibjson import export_calib_json
    from ..nvdla.naming import NvdlaNames, calibrate_for_nvdla, detect_preset
    from ..nvdla.trtcache import read_name_map
    from ..zoo.registry import get_model
    from .common import calibration_kwargs, calibration_loader

    overrides = read_name_map(args.names) if args.names else None
    model = get_model(args.model)
    if args.table:
        table = CalibrationTable.load(args.table)
        preset = detect_preset(model) if args.preset == "auto" else args.preset
        if preset == "generic":
            names = NvdlaNames.from_table(table, overrides)
        else:
            names = NvdlaNames.for_model(model, preset, overrides=overrides)
            names.require(table)
    else:
        _, loader = calibration_loader(args)
        table, names = calibrate_for_nvdla(model, loader, args.preset, overrides=overrides,
                                           progress=not args.json, **calibration_kwargs(args))
    if args.save_table:
        table.save(args.save_table)
    report = export_calib_json(table, args.output, names, eltwise=args.eltwise, allow_missing=args.allow_missing,
                               show=not args.json)
    extra = {}
    if args.trt_cache:
        from ..nvdla.trtcache import write_trt_cache

        kw = {} if args.trt_version is None else {"version": args.trt_version}
        write_trt_cache(report.ranges.amax, args.trt_cache, prototxt=args.trt_prototxt, **kw)
        extra["trt_cache"] = args.trt_cache
    if args.weights_dir:
        from ..nvdla.export_weights import export_quantized_weights

        summary = export_quantized_weights(model, table, names, args.weights_dir, weights=args.weights,
                                           fold_batchnorm=args.fold_batchnorm, eltwise=args.eltwise)
        extra["weights"] = {"dir": args.weights_dir, "layers": len(summary)}
    if args.json:
        print(json.dumps({"path": str(report.path), "preset": names.preset, "scales": report.scales, **extra,
                          "findings": [f.to_dict() for f in report.findings]}, indent=2))
    else:
        report.print(title=f"{args.model} ({names.preset}): {len(report.scales)} NVDLA layers -> {report.path}")
        if extra:
            from ..utils.console import say

            for k, v in extra.items():
                say(f"[green]{k}[/]: {v}")
    return 1 if report.errors else 0
