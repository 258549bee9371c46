"""``torch-nvdla convert-trt-cache``: a TensorRT calibration cache -> NVDLA calib.json."""

from __future__ import annotations

import argparse
import json

HELP = "convert a TensorRT calibration cache to an NVDLA calib.json, renaming tensors to layers"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS = {"output": "file"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="TensorRT calibration cache (TRT-<version>-<calibrator> header)")
    p.add_argument("-o", "--output", default="calib.json", help="calib.json to write (default calib.json)")
    p.add_argument("--names", default=None, metavar="MAP.json",
                   help="JSON object {TensorRT tensor name: NVDLA layer name or null}; wins over --prototxt")
    p.add_argument("--prototxt", default=None,
                   help="deploy prototxt: place blobs on their last writer, unnamed tensors on in-place layers, "
                        "order the file and report layers left without a scale")
    p.add_argument("--no-fill", action="store_true",
                   help="do not give in-place layers TensorRT did not name their blob's scale")
    p.add_argument("--allow-missing", action="store_true", help="write even if prototxt layers have no scale")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..nvdla.calibjson import print_findings, uppercase_path_finding
    from ..nvdla.trtcache import read_name_map, trt_cache_to_calib_json
    from ..utils.console import say

    names = read_name_map(args.names) if args.names else None
    conv = trt_cache_to_calib_json(args.cache, args.output, names=names, prototxt=args.prototxt,
                                   fill_inplace=not args.no_fill, allow_missing=args.allow_missing)
    findings = list(conv.findings)
    up = uppercase_path_finding(args.output, "warning")
    if up is not None:
        findings.append(up)
    if args.json:
        print(json.dumps({"path": args.output, "scales": conv.scales, "placed": conv.placed, "unplaced": conv.unplaced,
                          "filled": conv.filled, "missing": list(conv.missing),
                          "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        if findings:
            print_findings(findings, title=f"{args.cache} -> {args.output}")
        say(f"[green]wrote[/] {args.output}: {len(conv.scales)} layers from {len(conv.placed)} of "
            f"{len(conv.cache.scales)} TensorRT tensors ({conv.cache.algorithm}, TRT {conv.cache.version}); "
            f"{len(conv.unplaced)} not placed, {len(conv.filled)} filled, {len(conv.missing)} missing")
    return 1 if conv.missing and not args.allow_missing else 0
