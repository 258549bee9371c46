"""The real NVDLA compiler: find it, run it with a time limit, read the integers it programs.

Design notes: ``docs/nvdla.md``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CalibrationError

__all__ = [
    "COMPILER_ENV",
    "BiasQuant",
    "CompileResult",
    "Requant",
    "compile_caffe",
    "find_compiler",
    "parse_debugquant",
]

#: A folder holding ``bin/nvdla_compiler`` and ``bin/nvdla_compiler_debugquant``.
COMPILER_ENV = "TORCH_NVDLA_COMPILER"

_NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan)"
_RATIO = re.compile(rf"^(?:(?P<op>[\w-]+) )?(?P<what>Si \* Sw(?:\[k\])? / So|Si \* V\[k\] / So|Si / So) = "
                    rf"(?P<vals>{_NUM}(?: [*/] {_NUM})+) = (?P<m>-?\d+)\* 2\^-(?P<t>\d+)$")
_BIAS = re.compile(rf"^rawBias/Si\*Sw (?P<raw>{_NUM}) / +\( (?P<si>{_NUM}) \* (?P<sw>{_NUM}) \) = (?P<x>{_NUM}) "
                   rf"-> (?P<q>-?\d+) -> (?P<q16>-?\d+)\*2\^-(?P<s>\d+)$")


@dataclass(frozen=True)
class Requant:
    """One output-converter ratio the compiler programs: ``s_in * s_w / s_out = m * 2^-t``.

    Attributes:
        op: the compiler's op name (``bias-3``, ``sdp-bn-0``) or ``""``.
        kind: ``"conv"`` (a conv / fc, ``s_w`` its weight scale; one line per filter in
            per-filter mode), ``"bn"`` (a BatchNorm channel, ``s_w`` its factor) or
            ``"eltwise"`` (``s_w`` is 1).
        s_in, s_w, s_out: the scales as printed (6 significant digits).
        m, t: the int16 multiplier and the right shift.
    """

    op: str
    kind: str
    s_in: float
    s_w: float
    s_out: float
    m: int
    t: int


@dataclass(frozen=True)
class BiasQuant:
    """One bias value: ``raw / (s_in * s_w)`` rounded to ``q``, stored as ``q16 * 2^shift``."""

    raw: float
    s_in: float
    s_w: float
    q: int
    q16: int
    shift: int


@dataclass(frozen=True)
class CompileResult:
    """What one compiler run did.

    Attributes:
        ok: exit 0 and a loadable written.
        returncode: the exit code (124 on timeout).
        log: everything it printed.
        requant: the output converters in the order printed (debugquant build only).
        biases: the quantized biases in the order printed (debugquant build only).
    """

    ok: bool
    returncode: int
    log: str
    requant: tuple[Requant, ...]
    biases: tuple[BiasQuant, ...]

    @property
    def timed_out(self) -> bool:
        return self.returncode == 124


def find_compiler(debugquant: bool = False) -> Path | None:
    """The compiler binary: ``$TORCH_NVDLA_COMPILER/bin/...``, else ``../shared/nvdla/compiler``
    beside the project or the working directory; None when there is none."""
    name = "nvdla_compiler_debugquant" if debugquant else "nvdla_compiler"
    env = os.environ.get(COMPILER_ENV)
    if env:  # an explicit choice is never silently replaced by a default
        roots = [Path(env)]
    else:
        project = Path(__file__).resolve().parents[2]
        roots = [project.parent / "shared" / "nvdla" / "compiler", Path.cwd().parent / "shared" / "nvdla" / "compiler"]
    for root in roots:
        exe = root / "bin" / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def parse_debugquant(text: str) -> tuple[tuple[Requant, ...], tuple[BiasQuant, ...]]:
    """The ratios and biases a debugquant compiler printed, in order."""
    requant: list[Requant] = []
    biases: list[BiasQuant] = []
    for line in text.splitlines():
        line = re.sub(r"^libnvdla<\d+> ", "", line.strip())
        m = _RATIO.match(line)
        if m:
            vals = [float(v) for v in re.split(r" [*/] ", m.group("vals"))]
            what = m.group("what")
            kind = "eltwise" if what == "Si / So" else ("bn" if "V[k]" in what else "conv")
            s_in, s_w, s_out = (vals[0], 1.0, vals[1]) if kind == "eltwise" else tuple(vals[:3])
            requant.append(Requant(m.group("op") or "", kind, s_in, s_w, s_out, int(m.group("m")), int(m.group("t"))))
            continue
        b = _BIAS.match(line)
        if b:
            biases.append(BiasQuant(float(b.group("raw")), float(b.group("si")), float(b.group("sw")), int(b.group("q")),
                                    int(b.group("q16")), int(b.group("s"))))
    return tuple(requant), tuple(biases)


def compile_caffe(prototxt: str | os.PathLike, caffemodel: str | os.PathLike, calib_json: str | os.PathLike, *,
                  profile: str = "fast-math", weights: str = "per-kernel", target: str = "nv_full",
                  informat: str | None = None, timeout: float = 300, debugquant: bool = True,
                  compiler: str | os.PathLike | None = None) -> CompileResult:
    """Compile a Caffe net in INT8 with the real compiler, in a fresh lower-case folder.

    Args:
        prototxt, caffemodel, calib_json: the network and its table.
        profile: ``"fast-math"`` or ``"basic"``.
        weights: ``"per-kernel"`` or ``"per-filter"`` (``--quantizationMode``).
        target: ``nv_full``, ``nv_large`` or ``nv_small``.
        informat: ``--informat`` (``nhwc`` image input, the default; ``nchw`` feature).
        timeout: seconds before the run is killed (the compiler can loop forever).
        debugquant: use the build that prints every ratio and bias.
        compiler: a binary (default :func:`find_compiler`).

    Raises:
        CalibrationError: no compiler found.
    """
    exe = Path(compiler) if compiler else find_compiler(debugquant)
    if exe is None:
        raise CalibrationError(f"the NVDLA compiler was not found: set ${COMPILER_ENV} to its folder")
    base = Path(tempfile.gettempdir())
    if str(base) != str(base).lower():
        base = Path("/tmp")
    work = Path(tempfile.mkdtemp(prefix="nvdla_", dir=base))
    work = work.rename(work.with_name(work.name.lower())) if work.name != work.name.lower() else work
    try:
        shutil.copyfile(calib_json, work / "calib.json")
        cmd = [str(exe), "--prototxt", str(Path(prototxt).resolve()), "--caffemodel", str(Path(caffemodel).resolve()),
               "--cprecision", "int8", "--configtarget", target, "--calibtable", str(work / "calib.json"),
               "--profile", profile, "--quantizationMode", weights]
        if informat:
            cmd += ["--informat", informat]
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, errors="replace", timeout=timeout)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, log = 124, out
        ok = rc == 0 and any(p.suffix == ".nvdla" and p.stat().st_size > 0 for p in work.iterdir())
        requant, biases = parse_debugquant(log)
        return CompileResult(ok, rc, log, requant, biases)
    finally:
        shutil.rmtree(work, ignore_errors=True)
