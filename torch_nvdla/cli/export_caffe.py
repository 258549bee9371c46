"""``torch-nvdla export-caffe``: deploy.prototxt + model.caffemodel + calib.json for the NVDLA compiler."""

from __future__ import annotations

import argparse
import functools
import json

from .common import add_calibration_options, add_model_options, add_weights_option, input_shape

HELP = "write deploy.prototxt, model.caffemodel and calib.json (matching names) for the NVDLA compiler"


#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output_dir": "folder", "save_table": "file"}


def configure(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--table", default=None,
                   help="use this saved calibration table (calibrated with the taps export-caffe needs) instead of calibrating")
    p.add_argument("--save-table", default=None, help="also save the calibration table here")
    add_calibration_options(p)
    p.add_argument("--input-shape", type=input_shape, default=None, metavar="N,C,H,W",
                   help="the Input layer's shape (default: batch 1 and the data set's image shape)")
    p.add_argument("--preset", default="auto", choices=["auto", "caffe-lenet", "resnet-caffe", "generic"],
                   help="layer naming preset (default: auto-detect)")
    p.add_argument("--names", default=None, metavar="MAP.json",
                   help="user names: a JSON object {tap or layer: name}; wins over the preset")
    p.add_argument("--net-name", default=None, help="the Caffe net name (default: the model's class name)")
    add_weights_option(p)
    p.add_argument("--target", default="nv_full", choices=["nv_full", "nv_large", "nv_small"],
                   help="the compiler's --configtarget: layers it cannot run are refused (default nv_full)")
    p.add_argument("--compile", action="store_true",
                   help="compile the export with the NVDLA compiler when it is found ($TORCH_NVDLA_COMPILER or "
                        "../shared/nvdla/compiler)")
    p.add_argument("--eltwise", default="report", choices=["report", "unify"],
                   help="element-wise inputs with different ranges: report them, or unify them to the largest")
    p.add_argument("-o", "--output-dir", default="caffe_export",
                   help="folder for deploy.prototxt, model.caffemodel and calib.json (default caffe_export; "
                        "use lower case: the compiler lowercases the --calibtable path)")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="fold each BatchNorm into the convolution before it (no BatchNorm/Scale layers; a plain "
                        "calibration then has every range)")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading the files and comparing them with PyTorch")
    p.add_argument("--json", action="store_true", help="print what was written as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..calib.table import CalibrationTable
    from ..export.caffe import convert_to_caffe, export_caffe
    from ..nvdla.trtcache import read_name_map
    from ..utils.console import say
    from ..zoo.registry import get_model
    from .common import calibration_kwargs, calibration_loader

    overrides = read_name_map(args.names) if args.names else None
    model = get_model(args.model)
    example = None
    data = None
    if args.table is None or args.input_shape is None:
        data, loader = calibration_loader(args)
        if args.input_shape is None:
            # a real image drives tracing and verification
            example = data.calibration[0][:1].to(next(model.parameters()).dtype)
    # One conversion (verified unless --no-verify): its selection drives the calibration.
    conversion = convert_to_caffe(model, args.input_shape, example_input=example, names=args.preset,
                                  overrides=overrides, net_name=args.net_name, verify=not args.no_verify,
                                  fold_batchnorm=args.fold_batchnorm)
    if args.table is not None:
        table = CalibrationTable.load(args.table)
    else:
        from ..calib.calibrate import calibrate

        table = calibrate(model, loader, taps=conversion.selection, progress=not args.json, **calibration_kwargs(args))
    if args.save_table:
        table.save(args.save_table)
    result = export_caffe(model, table, args.output_dir, eltwise=args.eltwise, target=args.target,
                          conversion=conversion)
    conv = result.conversion
    if args.json:
        print(json.dumps({
            "prototxt": str(result.prototxt),
            "caffemodel": str(result.caffemodel),
            "calib_json": str(result.calib_json),
            "preset": conv.preset,
            "input_shape": list(conv.input_shape),
            "layers": [{"name": i.name, "type": i.type, "bottoms": list(i.bottoms), "tops": list(i.tops),
                        "shape": list(i.shape), "tap": i.tap, "rule": i.rule} for i in conv.layers],
            "scales": result.scales,
            "max_abs_diff": conv.max_abs_diff,
            "output_max_abs": conv.output_max_abs,
            "notes": list(conv.notes),
            "findings": [f.to_dict() for f in result.calib_report.findings if f.level != "info"],
        }, indent=2))
        return 0
    result.print()
    for note in conv.notes:
        say(f"[dim]note:[/] {note}")
    if result.calib_report is not None:
        for f in result.calib_report.findings:
            if f.level != "info":
                say(f"[yellow]{f.level}:[/] {f.layer}: {f.message}")
    if not args.no_verify:
        say(f"[green]verified:[/] the files read back as a PyTorch module whose output differs from the model's by "
            f"{conv.max_abs_diff:.3g} (largest output {conv.output_max_abs:.3g})")
    flags = f"--cprecision int8 --configtarget {args.target} --quantizationMode {args.weights} --informat nchw"
    say(f"compile with: nvdla_compiler --prototxt {result.prototxt} --caffemodel {result.caffemodel} "
        f"--calibtable {result.calib_json} {flags}")
    say("[dim]input: a feature tensor (--informat nchw): the application writes int8 round(x / S) of the model's "
        "own input, S the calib.json 'data' scale; this is the program int8_simulation(mode='nvdla', "
        f"weights='{args.weights}') predicts. The runtime's image input (nhwc) writes round(127 p / 255) without "
        "normalization" + ("." if args.fold_batchnorm else " and runs the first conv's BatchNorm unfused "
                           "(--fold-batchnorm avoids that).") + "[/]")
    if args.compile and result.calib_json is not None:
        from ..utils.io import current_stage

        step = functools.partial(compile_published, result, args.weights, args.target)
        stage = current_stage()
        if stage is None:
            return step()
        stage.after_publish(step)
    return 0


def compile_published(result, weights: str, target: str, *, missing_ok: bool = False) -> int:
    """Compile a published Caffe export with the real compiler (feature input); 1 (and its
    last lines) when it fails. ``missing_ok``: no compiler found is a note, not an error."""
    from ..errors import CalibrationError
    from ..nvdla.compiler import compile_caffe
    from ..utils.console import say

    try:
        run = compile_caffe(result.prototxt, result.caffemodel, result.calib_json, weights=weights, informat="nchw",
                            target=target, debugquant=False)
    except CalibrationError as e:
        if missing_ok:
            say(f"[dim]not compiled: {e}[/]")
            return 0
        say(f"[bold red]error:[/] {e} (the export itself was written)")
        return 1
    if not run.ok:
        tail = " | ".join(run.log.strip().splitlines()[-3:])
        say(f"[bold red]error:[/] the NVDLA compiler failed (exit {run.returncode}) on {result.prototxt}: {tail}")
        return 1
    say(f"[green]compiled:[/] the NVDLA compiler accepted {result.prototxt} ({target}, {weights}, feature input)")
    return 0
