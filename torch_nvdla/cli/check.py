"""``torch-nvdla check``: check a calib.json the way the NVDLA compiler will read it."""

from __future__ import annotations

import argparse
import json

HELP = "check a calib.json against a deploy prototxt and the NVDLA compiler's rules"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("calib", help="the calib.json, as it will be passed to the compiler's --calibtable")
    p.add_argument("--prototxt", default=None, help="the deploy prototxt the compiler will read")
    p.add_argument("--blobs", default=None, metavar="BLOBS.npz",
                   help="Caffe blobs as .npz (<layer>.weight): exact requantization m >> t per layer")
    p.add_argument("--profile", default="fast-math", choices=["fast-math", "basic"], help="compiler profile (default fast-math)")
    p.add_argument("--target", default="nv_full", choices=["nv_full", "nv_large", "nv_small"],
                   help="the compiler's --configtarget (default nv_full)")
    p.add_argument("--quiet", action="store_true", help="hide info rows")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ..nvdla.calibjson import check_calib_json, print_findings
    from ..utils.console import say

    result = check_calib_json(args.calib, args.prototxt, blobs=args.blobs, profile=args.profile, target=args.target)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if any(f.level != "info" or not args.quiet for f in result.findings):
            print_findings(result.findings, title=f"check {args.calib}", show_info=not args.quiet)
        n_err = len(result.errors)
        n_warn = sum(f.level == "warning" for f in result.findings)
        against = f" against {len(result.layers)} prototxt layers" if args.prototxt else " (no prototxt: keys not checked)"
        verdict = "[bold red]FAIL[/]" if n_err else "[bold green]OK[/]"
        say(f"{verdict} {args.calib}: {len(result.entries)} entries{against}, {n_err} error(s), {n_warn} warning(s)")
    return 0 if result.ok else 1
