"""``torch-nvdla decode-output``: a runtime's ``output.dimg`` as scores, with the right scale."""

from __future__ import annotations

import argparse
import json

HELP = "decode nvdla_runtime --rawdump output (output.dimg) into real values and the top classes"

#: Output options, checked before the command runs: option -> "file", "folder" or "prefix".
OUTPUTS: dict[str, str] = {}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dimg", help="output.dimg written by nvdla_runtime --rawdump (values in c, h, w order)")
    p.add_argument("--calib", required=True, help="the calib.json the network was compiled with")
    p.add_argument("--layer", default=None,
                   help="the output layer's calib.json key (default: the file's last entry, the network's output)")
    p.add_argument("--top", type=int, default=5, help="how many classes to list (default 5)")
    p.add_argument("--json", action="store_true", help="print the values and the top classes as JSON on stdout")


def decode_dimg(path, scale: float) -> list[float]:
    """The real values of a raw dump: each integer ``q`` read as ``q * scale``.

    The runtime writes one number per element, separated by spaces (rt/DlaImage.cpp
    ``packData`` with ``asRaw``): int8 for an INT8 network, fp16 / fp32 values otherwise
    (then taken as they are, ``scale`` ignored).

    Raises:
        FileFormatError: naming the file and the token that is not a number.
    """
    from ..errors import FileFormatError
    from ..utils.io import read_text

    tokens = read_text(path, "runtime output dump").split()
    if not tokens:
        raise FileFormatError(path, "empty: expected the numbers nvdla_runtime --rawdump writes")
    out = []
    for i, tok in enumerate(tokens):
        try:
            out.append(int(tok) * scale)
        except ValueError:
            try:
                out.append(float(tok))
            except ValueError:
                raise FileFormatError(path, f"value #{i} {tok[:20]!r} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..errors import CalibrationError
    from ..nvdla.calibjson import read_calib_json
    from ..utils.report import stdout

    if args.top < 1:
        raise CalibrationError(f"--top must be at least 1, got {args.top}")
    scales = read_calib_json(args.calib)
    layer = args.layer or list(scales)[-1]
    if layer not in scales:
        raise CalibrationError(f"{args.calib}: no entry {layer!r} (entries: {', '.join(list(scales)[-5:])} ...)")
    values = decode_dimg(args.dimg, scales[layer])
    order = sorted(range(len(values)), key=lambda i: -values[i])[: args.top]
    if args.json:
        print(json.dumps({"layer": layer, "scale": scales[layer], "values": values,
                          "top": [{"index": i, "value": values[i]} for i in order]}, indent=2))
        return 0
    t = Table(title=f"{args.dimg}: {len(values)} values x scale {scales[layer]:.6g} ({layer})")
    for col in ("rank", "index", "value"):
        t.add_column(col, justify="right")
    for rank, i in enumerate(order, 1):
        t.add_row(str(rank), str(i), f"{values[i]:.6g}")
    stdout.print(t)
    return 0
