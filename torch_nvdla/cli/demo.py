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
OUTPUTS = {"output": "file"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="calib.json", help="calib.json to write (default calib.json)")
    p.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile", "mse"])
    add_weights_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _write_calib_json(table, names, path) -> str:
    """Export through the calib.json writer; a plain scale-per-tap file when it is absent."""
    try:
        from ..nvdla.calibjson import export_calib_json
    except ImportError:  # pragma: no cover - the writer ships with the package
        from ..utils.io import atomic_write_json

        atomic_write_json(path, {n: {"scale": r.scale, "min": 0, "max": 0, "offset": 0} for n, r in table.items()})
        return f"{len(table)} entries (one per tap)"
    report = export_calib_json(table, path, names)
    count = len(getattr(report, "layers", ()) or ()) or len(names)
    return f"{count} layers"


def run(args: argparse.Namespace) -> int:
    import time

    from ..nvdla.naming import calibrate_for_nvdla
    from ..sim.evaluate import evaluate
    from ..utils.console import say
    from ..zoo.registry import get_dataset, get_model

    t0 = time.perf_counter()
    progress = not args.no_progress
    model = get_model("digits-lenet")
    data = get_dataset("digits")
    table, names = calibrate_for_nvdla(model, data.loader("calibration", 100), method=args.method, progress=progress)
    report = evaluate(model, table, data.loader("evaluation", 100), methods=(args.method,), weights=args.weights,
                      progress=progress, model_name="digits-lenet", data_name="digits")
    report.print(title=f"digits-lenet on sklearn digits: FP32 vs INT8 ({args.method}, {args.weights}; "
                       f"{len(data.calibration[0])} calibration / {report.evaluation_images} evaluation images)")
    what = _write_calib_json(table, names, args.output)
    say(f"wrote {args.output} ({what}) in {time.perf_counter() - t0:.1f} s; compile with "
        f"nvdla_compiler --cprecision int8 --calibtable {args.output}")
    return 0
