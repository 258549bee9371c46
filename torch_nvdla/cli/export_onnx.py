"""``torch-nvdla export-onnx``: ONNX for TensorRT / DLA with Q/DQ nodes and/or a TensorRT calibration cache."""

from __future__ import annotations

import argparse
import json

from .common import add_weights_option, input_shape

HELP = "export a calibrated model to ONNX for TensorRT (DLA): Q/DQ nodes and/or a calibration cache"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "file", "cache": "file"}


def configure(p: argparse.ArgumentParser) -> None:
    from .common import add_model_options

    add_model_options(p)
    p.add_argument("--table", required=True, help="calibration table of the model (torch-nvdla calibrate -o ...)")
    p.add_argument("-o", "--output", default="model.onnx", help="ONNX model to write (default model.onnx)")
    p.add_argument("--cache", default=None, metavar="MODEL.cache",
                   help="also write a TensorRT calibration cache keyed by the ONNX tensor names "
                        "(with Q/DQ, the plain graph it names goes to <output>.noqdq.onnx)")
    p.add_argument("--no-qdq", action="store_true", help="no QuantizeLinear/DequantizeLinear nodes (plain FP32 graph)")
    p.add_argument("--placement", default="nvdla", choices=["nvdla", "all"],
                   help="Q/DQ on the tensors NVDLA writes (default) or after every tap")
    add_weights_option(p, "none")
    p.add_argument("--fold-batchnorm", default=None, action=argparse.BooleanOptionalAction,
                   help="fold BatchNorm into the preceding conv (default: yes for --placement nvdla, no for all)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (>= 13 for Q/DQ; default 13)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to --example-images")
    p.add_argument("--example-images", type=int, default=16,
                   help="calibration images the exporter traces and the taps are matched on (default 16)")
    p.add_argument("--input-shape", type=input_shape, default=None, metavar="N,C,H,W",
                   help="no data set: trace on --example-images standard-normal inputs of this C,H,W (seed 0; "
                        "N is ignored)")
    p.add_argument("--trt-version", default=None, help="TensorRT version in the cache header (default 8601)")
    p.add_argument("--compare", action="store_true",
                   help="run the Q/DQ model in onnxruntime against int8_simulation on the evaluation split")
    p.add_argument("--num-images", type=int, default=1000, help="evaluation images for --compare (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="batch size for --compare (default 250)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a tap has no ONNX tensor, a layer runs in FP32 for want of a range, "
                        "or a float tensor has no range in the cache")
    p.add_argument("--json", action="store_true", help="print the mapping (and comparison) as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..calib.table import CalibrationTable
    from ..errors import CalibrationError
    from ..export.onnx import compare_with_onnxruntime, export_onnx
    from ..zoo.registry import default_dataset_for, get_dataset, get_model

    if args.example_images < 1:
        raise CalibrationError(f"--example-images must be >= 1, got {args.example_images}")
    weights = None if args.weights == "none" else args.weights
    if args.compare and (weights is None or args.no_qdq):
        raise CalibrationError("--compare needs a Q/DQ model with int8 weights (drop --no-qdq / --weights none)")
    model = get_model(args.model)
    table = CalibrationTable.load(args.table)
    data = None
    if args.input_shape:
        g = torch.Generator().manual_seed(0)
        example = torch.randn((args.example_images, *args.input_shape[1:]), generator=g)
    else:
        name = args.data or default_dataset_for(args.model)
        if name is None:
            raise CalibrationError(f"give --data or --input-shape for the entry point {args.model!r}")
        data = get_dataset(name)
        example = data.split("calibration")[0][: args.example_images]
    result = export_onnx(
        model, table, args.output, example_input=example, qdq=not args.no_qdq, cache=args.cache,
        placement=args.placement, weights=weights, fold_batchnorm=args.fold_batchnorm, opset=args.opset,
        dynamic_batch=not args.static_batch, trt_version=args.trt_version, show=not args.json,
    )
    comparison = None
    if args.compare:
        if data is None:
            raise CalibrationError("--compare needs a data set (--data), not --input-shape")
        loader = data.loader("evaluation", args.batch_size, limit=args.num_images)
        comparison = compare_with_onnxruntime(model, table, loader, export=result, weights=weights,
                                              show=not args.json)
    if args.json:
        out = {"export": result.to_dict()}
        if comparison is not None:
            out["comparison"] = comparison.to_dict()
        print(json.dumps(out, indent=2))
    gaps = result.unmapped or result.in_float or (args.cache and result.uncovered)
    return 1 if args.strict and gaps else 0
