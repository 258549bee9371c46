#!/usr/bin/env python
"""Which models each step of torch_nvdla serves: the coverage matrix.

For every model, in order, with one default ``calibrate(model, images)`` table:

* **calibrate** -- the default calibration (entropy);
* **fake** / **nvdla** -- ``int8_simulation`` in fake-quant and NVDLA-integer mode on that
  table (the cell gives the share of the batch whose top-1 matches FP32);
* **calib.json** -- ``calibrate_for_nvdla`` + ``export_calib_json`` (warnings counted);
* **caffe** -- ``export_caffe`` on the default table, BatchNorm folded into the
  convolutions (``fold_batchnorm=True``: no BatchNorm / Scale layers need ranges);
* **compile** -- the real NVDLA compiler on that export (``nv_full``, fast-math,
  per-kernel, feature input) where ``../shared/nvdla/compiler`` is found;
* **onnx** -- ``export_onnx`` (Q/DQ) on the default table (taps left in FP32 counted).

A cell is ``ok``, ``refused: <reason>`` (a torch_nvdla error raised before anything was
written: the expected answer for what NVDLA cannot run), ``error: <type>`` (anything else:
a bug), ``timeout`` (the compiler ran past ``--compiler-timeout``) or ``skipped``. Models: small hand-written nets (functional ops, module reuse, a
decoder) and torchvision's (random weights, random images).

Usage::

    python scripts/coverage_matrix.py                       # everything (minutes)
    python scripts/coverage_matrix.py --models functional decoder --markdown coverage.md
    python scripts/coverage_matrix.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from torch_nvdla.errors import TorchNvdlaError  # noqa: E402

__all__ = ["MODELS", "STEPS", "Cell", "Row", "main", "run_model"]

STEPS = ("calibrate", "fake", "nvdla", "calib.json", "caffe", "compile", "onnx")


# ------------------------------------------------------------------------------ small nets


class Functional(nn.Module):
    """Functional ops in ``forward``: a sum, ``F.relu``, ``torch.flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = F.relu(self.a(x) + self.b(x))
        y = F.max_pool2d(F.relu(self.c(y)), 2)
        return self.fc(torch.flatten(y, 1))


class ModuleReuse(nn.Module):
    """One ReLU and one convolution called several times."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(self.body(x))
        x = self.relu(self.body(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Decoder(nn.Module):
    """ConvTranspose2d, nearest Upsample, a concat skip, and the activations NVDLA lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act1 = nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.act2 = nn.LeakyReLU(0.1)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(8 + 3, 8, 3, padding=1)
        self.act3 = nn.Hardswish()
        self.head = nn.Conv2d(8, 1, 1)
        self.out = nn.Sigmoid()

    def forward(self, x):
        e = self.act1(self.enc(x))
        d = self.act2(self.up(e))
        d = torch.cat([d, x], 1)
        d = self.act3(self.fuse(d))
        return self.out(self.head(self.up2(F.max_pool2d(d, 2))))


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


#: name -> (builder, input size, heavy). Heavy models stay out of the default test run.
MODELS: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    "functional": (Functional, 16, False),
    "module-reuse": (ModuleReuse, 16, False),
    "decoder": (Decoder, 16, False),
    "alexnet": (_torchvision("alexnet"), 224, True),
    "vgg11_bn": (_torchvision("vgg11_bn"), 224, True),
    "resnet18": (_torchvision("resnet18"), 64, True),
    "resnet50": (_torchvision("resnet50"), 64, True),
    "resnext50_32x4d": (_torchvision("resnext50_32x4d"), 64, True),
    "googlenet": (_torchvision("googlenet", aux_logits=False, init_weights=False), 64, True),
    "densenet121": (_torchvision("densenet121"), 64, True),
    "squeezenet1_1": (_torchvision("squeezenet1_1"), 64, True),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), 64, True),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), 64, True),
    "shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0"), 64, True),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), 64, True),
    "regnet_x_400mf": (_torchvision("regnet_x_400mf"), 64, True),
}


# ------------------------------------------------------------------------------ the matrix


@dataclass
class Cell:
    """One step on one model: ``ok``, ``refused``, ``error`` or ``skipped``, and what it said."""

    status: str
    detail: str = ""
    seconds: float = 0.0

    def text(self, width: int = 70) -> str:
        detail = " ".join(self.detail.split())
        if len(detail) > width:
            detail = detail[: width - 3] + "..."
        return self.status if not detail else f"{self.status}: {detail}"


@dataclass
class Row:
    model: str
    size: int
    cells: dict[str, Cell] = field(default_factory=dict)


class _Timeout(Exception):
    """The compiler ran past its time limit (large nets take many minutes)."""


def _step(fn: Callable[[], str]) -> Cell:
    t0 = time.perf_counter()
    try:
        detail = fn()
        return Cell("ok", detail or "", time.perf_counter() - t0)
    except _Timeout as e:
        return Cell("timeout", str(e), time.perf_counter() - t0)
    except TorchNvdlaError as e:
        return Cell("refused", str(e), time.perf_counter() - t0)
    except Exception as e:  # anything else is a bug in torch_nvdla: report it as such
        return Cell("error", f"{type(e).__name__}: {e}", time.perf_counter() - t0)


def _agreement(model: nn.Module, table, x: torch.Tensor, mode: str) -> str:
    from torch_nvdla.sim.simulate import int8_simulation

    with torch.no_grad():
        ref = model(x).flatten(1).double()
        with int8_simulation(model, table, mode=mode, example=x) as sim:
            got = model(x).flatten(1).double()
            fp32 = len(sim.plan.fp32_layers) if sim.plan is not None else 0
    same = int((ref.argmax(1) == got.argmax(1)).sum())
    # random weights often give near-flat logits, where top-1 is a coin toss: the correlation
    # of the INT8 and FP32 outputs (each centred per sample) says whether the network
    # computes the same thing
    a, b = ref - ref.mean(1, keepdim=True), got - got.mean(1, keepdim=True)
    corr = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
    ties = int(((got == got.max(1, keepdim=True).values).sum(1) > 1).sum())  # INT8 top-1 shared by classes
    return (f"top-1 = FP32 on {same}/{len(x)}" + (f" ({ties} tied)" if ties else "") + f", corr >= {corr:.3f}"
            + (f"; {fp32} layer(s) FP32" if fp32 else ""))


def run_model(name: str, *, images: int = 4, compiler_timeout: float = 120.0, workdir: Path | None = None) -> Row:
    """Every step on one model of :data:`MODELS`."""
    from torch_nvdla import calibrate
    from torch_nvdla.export.caffe import export_caffe
    from torch_nvdla.nvdla.calibjson import export_calib_json
    from torch_nvdla.nvdla.compiler import compile_caffe, find_compiler
    from torch_nvdla.nvdla.naming import calibrate_for_nvdla

    build, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    row = Row(name, size)
    work = Path(workdir or tempfile.mkdtemp(prefix="coverage_")) / name
    state: dict = {}

    def do_calibrate() -> str:
        state["table"] = calibrate(model, [x], progress=False)
        return f"{len(state['table'])} taps"

    row.cells["calibrate"] = _step(do_calibrate)
    table = state.get("table")
    for mode in ("fake", "nvdla"):
        row.cells[mode] = _step(lambda m=mode: _agreement(model, table, x, m)) if table is not None else Cell("skipped")

    def do_calib_json() -> str:
        t, names = calibrate_for_nvdla(model, [x], progress=False)
        report = export_calib_json(t, work / "calib.json", names, show=False)
        warnings = [f for f in report.findings if f.level == "warning"]
        return f"{len(report.scales)} keys" + (f", {len(warnings)} warning(s) ({warnings[0].rule})" if warnings else "")

    row.cells["calib.json"] = _step(do_calib_json)

    def do_caffe() -> str:
        state["caffe"] = export_caffe(model, table, work / "caffe", input_shape=(1, 3, size, size),
                                      fold_batchnorm=True)
        return f"{len(state['caffe'].scales)} calib entries"

    row.cells["caffe"] = _step(do_caffe) if table is not None else Cell("skipped")
    exported = state.get("caffe")
    if exported is None or find_compiler() is None:
        row.cells["compile"] = Cell("skipped", "no export" if exported is None else "no compiler")
    else:
        def do_compile() -> str:
            r = compile_caffe(exported.prototxt, exported.caffemodel, exported.calib_json, informat="nchw",
                              timeout=compiler_timeout, debugquant=False)
            if r.timed_out:
                raise _Timeout(f"no result after {compiler_timeout:g} s")
            if not r.ok:
                raise RuntimeError(f"the compiler failed (rc {r.returncode}): {r.log.strip().splitlines()[-1:]}")
            return ""

        row.cells["compile"] = _step(do_compile)

    def do_onnx() -> str:
        from torch_nvdla.export.onnx import export_onnx

        res = export_onnx(model, table, work / "model.onnx", example_input=x[:2], show=False)
        return f"{len(res.quantized)} Q/DQ" + (f", {len(res.in_float)} tap(s) FP32" if res.in_float else "")

    row.cells["onnx"] = _step(do_onnx) if table is not None else Cell("skipped")
    return row


# ------------------------------------------------------------------------------ report


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| model | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    for r in rows:
        cells = [r.cells.get(s, Cell("skipped")).text(60).replace("|", "/") for s in STEPS]
        lines.append(f"| {r.model} ({r.size}px) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_rows(rows: Sequence[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    colour = {"ok": "green", "refused": "yellow", "error": "red", "skipped": "dim", "timeout": "magenta"}
    t = Table(title="torch_nvdla coverage (one default calibration; random weights and images)")
    t.add_column("model")
    for s in STEPS:
        t.add_column(s, overflow="fold")
    for r in rows:
        cells = [r.cells.get(s, Cell("skipped")) for s in STEPS]
        t.add_row(f"{r.model} ({r.size})", *[f"[{colour[c.status]}]{c.text(48)}[/]" for c in cells])
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(t)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL",
                   help="models to run (default: all)")
    p.add_argument("--images", type=int, default=4, help="calibration / simulation images (default 4)")
    p.add_argument("--compiler-timeout", type=float, default=120.0, help="seconds per compile (default 120)")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown there")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix; returns 1 when any cell is an ERROR (a bug), else 0."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from torch_nvdla.utils.console import progress_iter

    rows = []
    with tempfile.TemporaryDirectory(prefix="coverage_") as tmp:
        for name in progress_iter(args.models, "coverage (models)"):
            rows.append(run_model(name, images=args.images, compiler_timeout=args.compiler_timeout,
                                  workdir=Path(tmp)))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print_rows(rows)
    if args.markdown:
        args.markdown.write_text(markdown(rows))
    return 1 if any(c.status == "error" for r in rows for c in r.cells.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
