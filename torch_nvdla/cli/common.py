"""Options and steps shared by the subcommands that calibrate a model on a data set."""

from __future__ import annotations

import argparse

from ..errors import CalibrationError

__all__ = ["add_calibration_options", "add_missing_option", "add_model_options", "add_weights_option",
           "calibration_kwargs", "calibration_loader", "calibration_source", "dataset_for", "evaluation_setup",
           "input_shape"]


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--data``: built-in names or ``package.module:function`` entry points."""
    p.add_argument("--model", default="digits-lenet", help="built-in name or package.module:function (default: digits-lenet)")
    p.add_argument("--data", default=None, help="built-in name or package.module:function (default: the model's own)")


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: ``N,C,H,W`` (``C,H,W`` is read as ``1,C,H,W``), positive integers."""
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if len(dims) == 3:
        dims = (1, *dims)
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (e.g. 1,3,32,32), got {text!r}")
    return dims


def add_weights_option(p: argparse.ArgumentParser, *extra: str) -> None:
    """``--weights``: the weight quantization, as the compiler's ``--quantizationMode``."""
    p.add_argument("--weights", default="per-kernel", choices=["per-kernel", "per-filter", *extra],
                   help="weight quantization, the compiler's --quantizationMode (default per-kernel, "
                        "the compiler's default)")


def add_missing_option(p: argparse.ArgumentParser) -> None:
    """``--missing``: what a simulation does with layers whose taps the table lacks."""
    p.add_argument("--missing", default="error", choices=["error", "fp32"],
                   help="taps the table lacks: fail (default) or run those layers in FP32")


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    """How to calibrate: strategy, number of images, histogram bins, percentile."""
    p.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile", "mse"])
    p.add_argument("--input-method", default="minmax",
                   help="strategy for the model input tap 'data' (default minmax; 'same' = --method)")
    p.add_argument("--num-images", type=int, default=500, help="calibration images (default 500)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--bins", type=int, default=2048)
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--threshold", type=float, default=None, help="NVDLA calibrator spelling: a fraction, 0.9 = 90th percentile")


def calibration_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`torch_nvdla.calibrate` given by the options above."""
    return {
        "method": args.method,
        "bins": args.bins,
        "percentile": args.percentile,
        "threshold": args.threshold,
        "input_method": None if args.input_method == "same" else args.input_method,
    }


def dataset_for(args: argparse.Namespace):
    """The data set named by ``--data``, or the built-in model's own.

    Raises:
        CalibrationError: an entry-point model without ``--data``.
    """
    from ..zoo.registry import default_dataset_for, get_dataset

    name = args.data or default_dataset_for(args.model)
    if name is None:
        raise CalibrationError(f"--data is required for the entry-point model {args.model!r}")
    return get_dataset(name)


def calibration_source(args: argparse.Namespace, data):
    """What evaluate / sweep calibrate with: the saved table of ``--table``, or the data
    set's calibration loader (they then calibrate once, observing what the simulation needs)."""
    if args.table:
        from ..calib.table import CalibrationTable

        return CalibrationTable.load(args.table)
    return data.loader("calibration", args.batch_size, limit=args.calib_images)


def calibration_loader(args: argparse.Namespace):
    """The data set (see :func:`dataset_for`) and its calibration loader."""
    data = dataset_for(args)
    return data, data.loader("calibration", args.batch_size, limit=args.num_images)


def evaluation_setup(args: argparse.Namespace, images: int):
    """What evaluate / sweep run on: the data set, the model, the calibration (a saved table
    or the calibration loader, :func:`calibration_source`) and ``images`` labelled
    evaluation images spread over the split, in batches of ``--batch-size``."""
    from ..sim.evaluate import spread_subset
    from ..zoo.data import batches
    from ..zoo.registry import get_model

    data = dataset_for(args)
    model = get_model(args.model)
    xs, ys = spread_subset(*data.split("evaluation"), images)
    return data, model, calibration_source(args, data), batches(xs, ys, args.batch_size)
