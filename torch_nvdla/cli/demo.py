"""``torch-nvdla demo``: the embedded digits LeNet, calibrated, checked in INT8, exported.

Needs no downloaded data: the model's weights ship with the package and scikit-learn
ships the 8x8 digits. Calibrates on the 200 calibration images (entropy by default),
compares FP32 with INT8 fake-quant and the NVDLA integer pipeline on the 397 held-out
images, and writes the ``calib.json`` the NVDLA compiler reads with ``--calibtable``.
"""

from __future__ import annotations

import argparse

from .common import add_weights_option

HELP = "calibrate the embedded digits LeNet, print FP32 vs INT8 accuracy, write calib.json"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "file", "caffe_dir": "folder"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="calib.json", help="calib.json to write (default calib.json)")
    p.add_argument("--caffe-dir", default=None,
                   help="the Caffe export the calib.json belongs to: deploy.prototxt, model.caffemodel, calib.json "
                        "(default: digits_caffe/ beside the calib.json)")
    p.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile", "mse"])
    add_weights_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import functools
    import time
    from pathlib import Path

    from ..calib.calibrate import calibrate
    from ..export.caffe import convert_to_caffe, export_caffe
    from ..nvdla.calibjson import export_calib_json
    from ..sim.evaluate import evaluate
    from ..utils.console import say
    from ..utils.io import check_output, current_stage
    from ..zoo.registry import get_dataset, get_model
    from .export_caffe import compile_published

    t0 = time.perf_counter()
    progress = not args.no_progress
    if args.caffe_dir is None:
        args.caffe_dir = str(check_output(Path(args.output).parent / "digits_caffe", "folder"))
    model = get_model("digits-lenet")
    data = get_dataset("digits")
    example = data.calibration[0][:8]
    conversion = convert_to_caffe(model, example_input=example, verify=False)  # which taps its layers need
    table = calibrate(model, data.loader("calibration", 100), args.method, taps=conversion.selection,
                      progress=progress)
    report = evaluate(model, table, data.loader("evaluation", 100), methods=(args.method,), weights=args.weights,
                      progress=progress, model_name="digits-lenet", data_name="digits")
    report.print(title=f"digits-lenet on sklearn digits: FP32 vs INT8 ({args.method}, {args.weights}; "
                       f"{len(data.calibration[0])} calibration / {report.evaluation_images} evaluation images)")
    result = export_caffe(model, table, args.caffe_dir, example_input=example)
    written = export_calib_json(table, args.output, result.conversion.nvdla_names(table), show=False)
    hw = report.row(args.method, "nvdla").top1
    say(f"wrote {args.output} ({len(written.scales)} layers) and {args.caffe_dir}/ in "
        f"{time.perf_counter() - t0:.1f} s. Predicted NVDLA accuracy {hw:.2f} % for: nvdla_compiler --prototxt "
        f"{result.prototxt} --caffemodel {result.caffemodel} --calibtable {args.output} --cprecision int8 "
        f"--quantizationMode {args.weights} --informat nchw")
    step = functools.partial(compile_published, result, args.weights, "nv_full", missing_ok=True)
    stage = current_stage()
    if stage is None:
        return step()
    stage.after_publish(step)
    return 0
