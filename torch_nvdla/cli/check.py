"""``torch-nvdla check``: check a calib.json the way the NVDLA compiler will read it."""

from __future__ import annotations

import argparse
import json

from .common import input_shape

HELP = "check a calib.json against a deploy prototxt and the NVDLA compiler's rules"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("calib", help="the calib.json, as it will be passed to the compiler's --calibtable")
    p.add_argument("--prototxt", default=None, help="the deploy prototxt the compiler will read")
    p.add_argument("--model", default=None,
                   help="instead of --prototxt: the net export-caffe writes for this model (built-in name or "
                        "package.module:function), so every layer the compiler will ask a key for is checked")
    p.add_argument("--input-shape", type=input_shape, default=None, metavar="N,C,H,W",
                   help="with --model: its input shape (default: an image of the model's own data set)")
    p.add_argument("--fold-batchnorm", action="store_true", help="with --model: as export-caffe --fold-batchnorm")
    p.add_argument("--blobs", default=None, metavar="BLOBS.npz",
                   help="Caffe blobs as .npz (<layer>.weight): exact requantization m >> t per layer")
    p.add_argument("--profile", default="fast-math", choices=["fast-math", "basic"], help="compiler profile (default fast-math)")
    p.add_argument("--target", default="nv_full", choices=["nv_full", "nv_large", "nv_small"],
                   help="the compiler's --configtarget (default nv_full)")
    p.add_argument("--quiet", action="store_true", help="hide info rows")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..errors import CalibrationError
    from ..nvdla.calibjson import check_calib_json, print_findings
    from ..utils.console import say

    prototxt = args.prototxt
    if args.model is not None:
        if args.prototxt is not None:
            raise CalibrationError("give --prototxt or --model, not both")
        prototxt = _model_net(args)
    result = check_calib_json(args.calib, prototxt, blobs=args.blobs, profile=args.profile, target=args.target)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if any(f.level != "info" or not args.quiet for f in result.findings):
            print_findings(result.findings, title=f"check {args.calib}", show_info=not args.quiet)
        n_err = len(result.errors)
        n_warn = sum(f.level == "warning" for f in result.findings)
        against = (f" against {len(result.layers)} layers of {args.model or 'the prototxt'}" if prototxt is not None
                   else " (no prototxt or model: keys not checked)")
        verdict = "[bold red]FAIL[/]" if n_err else "[bold green]OK[/]"
        say(f"{verdict} {args.calib}: {len(result.entries)} entries{against}, {n_err} error(s), {n_warn} warning(s)")
    return 0 if result.ok else 1


def _model_net(args: argparse.Namespace):
    """The Caffe net export-caffe writes for ``--model`` (converted in memory, not verified)."""
    from ..errors import CalibrationError
    from ..export.caffe import convert_to_caffe
    from ..zoo.registry import default_dataset_for, get_dataset, get_model

    model = get_model(args.model)
    example = None
    if args.input_shape is None:
        name = default_dataset_for(args.model)
        if name is None:
            raise CalibrationError(f"--model {args.model!r}: give --input-shape N,C,H,W (no built-in data set for it)")
        example = get_dataset(name).split("calibration")[0][:1]
    net = convert_to_caffe(model, args.input_shape, example_input=example, verify=False,
                           fold_batchnorm=args.fold_batchnorm).net
    net.source = f"<export-caffe of {args.model}>"
    return net
