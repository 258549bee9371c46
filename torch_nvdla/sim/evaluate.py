"""Accuracy verification: FP32 against INT8 (fake-quant and NVDLA integer) on labelled data.

Design notes and the facts behind them: ``docs/sim.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..calib.table import CalibrationTable
from ..errors import CalibrationError
from ..model.batch import LABEL_KEYS, run_batch, split_labels, to_device
from ..model.state import eval_mode, model_device
from ..utils.console import progress_iter
from .simulate import SimulationPlan, simulation_taps

__all__ = [
    "DEFAULT_METHODS",
    "Accuracy",
    "EvaluationReport",
    "EvaluationRow",
    "accuracy",
    "evaluate",
    "spread_subset",
]

#: The strategies compared by default (the TensorRT / NVDLA calibrators' three).
DEFAULT_METHODS = ("entropy", "minmax", "percentile")
_SIMULATIONS = ("fake", "nvdla")


@dataclass(frozen=True, kw_only=True)
class Accuracy:
    """Top-1 / top-k accuracy of one pass.

    Attributes:
        top1: percent of images whose largest output is the label.
        top5: percent whose label is among the ``k`` largest (``k = min(5, classes)``).
        images: images evaluated.
        correct1: images top-1 correct.
        correct5: images top-k correct.
    """

    top1: float
    top5: float
    images: int
    correct1: int
    correct5: int

    def __post_init__(self) -> None:
        if self.images < 0 or not (0 <= self.correct1 <= self.correct5 <= max(self.images, 0)):
            raise CalibrationError(f"inconsistent accuracy counts: {self.correct1}/{self.correct5} of {self.images}")




def _logits(output: Any, index: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        for v in output.values():
            if isinstance(v, torch.Tensor):
                return v
    raise CalibrationError(f"batch {index}: the model returned {type(output).__name__}, not class scores")


def _count(logits: torch.Tensor, labels: torch.Tensor, k: int, index: int) -> tuple[int, int]:
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise CalibrationError(
            f"batch {index}: expected class scores of shape (N, classes) with N = {labels.shape[0]} labels, "
            f"got {tuple(logits.shape)}"
        )
    labels = labels.to(logits.device)
    classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise CalibrationError(f"batch {index}: labels outside 0..{classes - 1}")
    c1 = int((logits.argmax(1) == labels).sum())
    kk = min(k, classes)
    topk = logits.topk(kk, dim=1).indices
    ck = int((topk == labels[:, None]).any(1).sum())
    return c1, max(ck, c1)


def accuracy(model: nn.Module, loader: Iterable, *, k: int = 5, device: str | torch.device | None = None,
             num_batches: int | None = None, progress: bool = False, description: str = "evaluating",
             hashes: set | None = None) -> Accuracy:
    """Top-1 / top-``k`` accuracy of ``model`` on labelled ``loader`` (eval mode, no grad).

    Args:
        model: the model (its train/eval flags are restored afterwards).
        loader: ``(inputs, labels)`` batches (or dicts with a label key).
        k: the second accuracy's k (5).
        device: where inputs go (default: the model's parameters' device).
        num_batches: stop after this many batches.
        progress: show a rich progress bar.
        description: the progress bar's label.
        hashes: if given, each input sample's hash is added to it.

    Raises:
        CalibrationError: unlabelled batches, labels that do not fit the outputs, an
            empty loader.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    total = None
    if hasattr(loader, "__len__"):
        total = len(loader) if num_batches is None else min(num_batches, len(loader))
    c1 = ck = n = 0
    with torch.no_grad(), eval_mode(model):
        for i, batch in enumerate(progress_iter(loader, description, total, progress)):
            if num_batches is not None and i >= num_batches:
                break
            inputs, labels = split_labels(batch, i)
            if hashes is not None:
                hashes.update(_sample_hashes(inputs))
            out = _logits(run_batch(model, inputs, dev, i), i)
            a, b = _count(out, labels, k, i)
            c1 += a
            ck += b
            n += int(labels.shape[0])
    if n == 0:
        raise CalibrationError("the evaluation loader yielded no images")
    return Accuracy(top1=100.0 * c1 / n, top5=100.0 * ck / n, images=n, correct1=c1, correct5=ck)


def spread_subset(inputs: torch.Tensor, labels: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples evenly spaced over a split (all of it when ``n`` is None or too large).

    The built-in splits are ordered by class (CIFAR-10) or by file; the first ``n`` images
    would be one or two classes, evenly spaced ones cover the split.
    """
    total = len(labels)
    if n is None or n >= total:
        return inputs, labels
    if n <= 0:
        raise CalibrationError(f"the number of images must be positive, got {n}")
    idx = (torch.arange(n, dtype=torch.float64) * (total / n)).floor().to(torch.int64)
    return inputs[idx], labels[idx]


# ------------------------------------------------------------------------------------------
# Disjointness
# ------------------------------------------------------------------------------------------


def _input_tensor(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    if isinstance(inputs, dict):
        for k, v in inputs.items():
            if k not in LABEL_KEYS and isinstance(v, torch.Tensor):
                return v
    return None


def _sample_hashes(inputs: Any) -> list[bytes]:
    x = _input_tensor(inputs)
    if x is None or x.dim() == 0:
        return []
    x = x.detach().to("cpu").contiguous()
    if x.layout != torch.strided:
        x = x.to_dense()
    # Bytes of any dtype (bfloat16 has no numpy twin): view the rows as uint8.
    flat = x.reshape(x.shape[0], -1).view(torch.uint8) if x.numel() else x.reshape(x.shape[0], 0).to(torch.uint8)
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=12).digest() for row in flat]


class _Hashing:
    """A loader wrapper that hashes every input sample it yields."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.hashes: set[bytes] = set()
        self.images = 0

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            hs = _sample_hashes(batch if isinstance(batch, torch.Tensor) else batch)
            self.hashes.update(hs)
            self.images += len(hs)
            yield batch


class _SizedHashing(_Hashing):
    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EvaluationRow:
    """One measured configuration.

    Attributes:
        method: calibration strategy (``""`` for FP32).
        simulation: ``"fp32"``, ``"fake"`` or ``"nvdla"``.
        weights: ``"per-filter"`` / ``"per-kernel"`` (``""`` for FP32).
        placement: fake-quant placement (``""`` otherwise).
        top1, top5: accuracy in percent.
        images: images evaluated.
        drop1, drop5: FP32 accuracy minus this one, in points.
    """

    method: str
    simulation: str
    weights: str
    placement: str
    top1: float
    top5: float
    images: int
    drop1: float
    drop5: float

    def __post_init__(self) -> None:
        if self.simulation not in ("fp32", *_SIMULATIONS):
            raise CalibrationError(f"unknown simulation {self.simulation!r}")


@dataclass(frozen=True, kw_only=True)
class EvaluationReport:
    """FP32 and INT8 accuracy side by side.

    Attributes:
        rows: FP32 first, then one row per strategy and simulation.
        calibration_images: images the ranges were calibrated on (0 when a table was given).
        evaluation_images: images evaluated.
        model: a display name.
        data: a display name.
        notes: what the simulations reported (fallbacks, fusions are in the plans).
        seconds: wall time.
        plans: strategy -> the :class:`~torch_nvdla.sim.simulate.SimulationPlan` its NVDLA
            simulation ran (layers, scales, fusions), when ``"nvdla"`` was simulated.
    """

    rows: tuple[EvaluationRow, ...]
    calibration_images: int
    evaluation_images: int
    model: str = ""
    data: str = ""
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    plans: Mapping[str, SimulationPlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rows or self.rows[0].simulation != "fp32":
            raise CalibrationError("an evaluation report starts with its FP32 row")

    @property
    def fp32(self) -> EvaluationRow:
        return self.rows[0]

    def row(self, method: str, simulation: str) -> EvaluationRow:
        """The row of one strategy and simulation (``"fp32"`` ignores the method)."""
        for r in self.rows:
            if r.simulation == simulation and (simulation == "fp32" or r.method == method):
                return r
        raise KeyError(f"no row for method {method!r}, simulation {simulation!r}")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "calibration_images": self.calibration_images,
            "evaluation_images": self.evaluation_images,
            "seconds": round(self.seconds, 3),
            "rows": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }

    def print(self, title: str | None = None) -> None:
        """A rich table on stdout."""
        from rich.table import Table

        from ..utils.report import stdout

        t = Table(caption="fake (P): fake-quant with placement P; NVDLA int8: the NVDLA integer pipeline",
                  title=title or f"{self.model} on {self.data}: FP32 vs INT8 "
                  f"({self.calibration_images} calibration / {self.evaluation_images} evaluation images)")
        for col, just in [("strategy", "left"), ("simulation", "left"), ("weights", "left"), ("top-1 %", "right"),
                          ("top-5 %", "right"), ("Δ top-1", "right"), ("Δ top-5", "right")]:
            t.add_column(col, justify=just)
        for r in self.rows:
            sim = {"fp32": "FP32", "nvdla": "NVDLA int8", "fake": f"fake ({r.placement})"}[r.simulation]
            d1 = "" if r.simulation == "fp32" else f"{0.0 - r.drop1:+.2f}"
            d5 = "" if r.simulation == "fp32" else f"{0.0 - r.drop5:+.2f}"
            style = "bold" if r.simulation == "fp32" else ("red" if r.drop1 > 1.0 else None)
            t.add_row(r.method or "-", sim, r.weights or "-", f"{r.top1:.2f}", f"{r.top5:.2f}", d1, d5, style=style)
        stdout.print(t)


# ------------------------------------------------------------------------------------------
# evaluate()
# ------------------------------------------------------------------------------------------


def _tables(calibration: Any, model: nn.Module, methods: Sequence[str], *, percentile: float, bins: int,
            taps, num_batches: int | None, device, progress: bool) -> tuple[list[tuple[str, CalibrationTable]], int,
                                                                            set[bytes] | None, list[str]]:
    """One table per strategy: from a given table, or one calibration pass re-picked per strategy."""
    from ..calib.calibrate import calibrate

    notes: list[str] = []
    if isinstance(calibration, Mapping):
        table = calibration
        if not isinstance(table, CalibrationTable):
            raise CalibrationError(f"calibration must be a CalibrationTable or a loader, got {type(table).__name__}")
        if not table.histograms:
            method = table.method or "table"
            if any(m != method for m in methods):
                notes.append(f"the table holds no histograms: only its own ranges ({method}) are evaluated")
            return [(method, table)], 0, None, notes
        out = []
        for m in methods:
            out.append((m, table if m == table.method else table.with_method(m, **_options(m, percentile))))
        return out, 0, None, notes
    if isinstance(calibration, (torch.Tensor, str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationError(
            f"calibration must be a CalibrationTable or an iterable of batches, got {type(calibration).__name__}"
        )
    if taps is None and iter(calibration) is not calibration:
        example = next(iter(calibration), None)
        if example is not None:  # observe what the simulation needs (':input' of functional ops' readers)
            dev = torch.device(device) if device is not None else model_device(model)
            taps = simulation_taps(model, to_device(example, dev))
    hashing = _SizedHashing(calibration) if hasattr(calibration, "__len__") else _Hashing(calibration)
    first = methods[0]
    table = calibrate(model, hashing, first, bins=bins, percentile=percentile, taps=taps, num_batches=num_batches,
                      device=device, progress=progress)
    out = [(first, table)]
    for m in methods[1:]:
        out.append((m, table.with_method(m, **_options(m, percentile))))
    return out, hashing.images, hashing.hashes, notes


def _options(method: str, percentile: float) -> dict:
    return {"percentile": float(percentile)} if method == "percentile" else {}


def evaluate(
    model: nn.Module,
    calibration: CalibrationTable | Iterable,
    data: Iterable,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    simulations: Sequence[str] = _SIMULATIONS,
    weights: str = "per-kernel",
    placement: str | None = None,
    taps=None,
    percentile: float = 99.99,
    bins: int = 2048,
    calib_batches: int | None = None,
    eval_batches: int | None = None,
    k: int = 5,
    missing: str = "error",
    device: str | torch.device | None = None,
    check_disjoint: bool = True,
    progress: bool = True,
    model_name: str = "",
    data_name: str = "",
) -> EvaluationReport:
    """FP32 vs INT8 top-1 / top-5 accuracy, per calibration strategy and simulation.

    Args:
        model: the model (left exactly as it was).
        calibration: a :class:`~torch_nvdla.CalibrationTable` (its histograms, when it
            holds them, are re-picked per strategy), or a loader of calibration batches
            (calibrated once, with ``methods[0]``, then re-picked).
        data: labelled evaluation batches ``(inputs, labels)``; must not share images with
            the calibration loader.
        methods: strategies to compare (``entropy``, ``minmax``, ``percentile``, ``mse``).
        simulations: ``"fake"`` (fake-quant) and/or ``"nvdla"`` (integer pipeline).
        weights: ``"per-filter"`` or ``"per-kernel"``.
        placement: fake-quant placement (default ``"all"``; see ``int8_simulation``).
        taps: the :class:`~torch_nvdla.TapSelection` to calibrate with.
        percentile: the percentile strategy's percentile.
        bins: histogram bins.
        calib_batches, eval_batches: limit the passes.
        k: the second accuracy's k.
        missing: ``"error"`` or ``"fp32"`` for taps the table lacks.
        device: where inputs go.
        check_disjoint: an evaluation image that is also a calibration image is an error
            (``False``: a note in the report).
        progress: rich progress bars on stderr.
        model_name, data_name: display names.

    Returns:
        An :class:`EvaluationReport` (``.print()``, ``.to_dict()``).

    Raises:
        CalibrationError: bad options, unlabelled data, overlapping calibration and
            evaluation images, tables that do not fit the model.
    """
    import time

    from .simulate import SimulationConfig, int8_simulation

    t0 = time.perf_counter()
    methods = tuple(methods)
    if not methods:
        raise CalibrationError("evaluate needs at least one calibration method")
    for s in simulations:
        if s not in _SIMULATIONS:
            raise CalibrationError(f"unknown simulation {s!r}; choose from {', '.join(_SIMULATIONS)}")
    for s in simulations:  # validate the options once, before any data pass
        SimulationConfig(mode=s, weights=weights, placement=placement if s == "fake" else None, missing=missing)
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if iter(data) is data:  # a one-shot iterator: every pass needs the same batches
        data = list(data)
    tables, calib_images, calib_hashes, notes = _tables(
        calibration, model, methods, percentile=percentile, bins=bins, taps=taps, num_batches=calib_batches,
        device=device, progress=progress)

    eval_hashes: set[bytes] = set()
    fp32 = accuracy(model, data, k=k, device=device, num_batches=eval_batches, progress=progress,
                    description="FP32", hashes=eval_hashes if calib_hashes is not None else None)
    if calib_hashes:
        shared = len(calib_hashes & eval_hashes)
        if shared:
            msg = (f"{shared} evaluation image(s) are also calibration images; calibration and evaluation data "
                   "must be disjoint")
            if check_disjoint:
                raise CalibrationError(msg + " (pass check_disjoint=False to evaluate anyway)")
            notes.append(msg)
    rows = [EvaluationRow(method="", simulation="fp32", weights="", placement="", top1=fp32.top1, top5=fp32.top5,
                          images=fp32.images, drop1=0.0, drop5=0.0)]
    plans: dict[str, SimulationPlan] = {}
    for method, table in tables:
        for sim in simulations:
            pl = (placement or "all") if sim == "fake" else "nvdla"
            with int8_simulation(model, table, mode=sim, weights=weights, placement=pl if sim == "fake" else None,
                                 missing=missing) as s:
                acc = accuracy(model, data, k=k, device=device, num_batches=eval_batches, progress=progress,
                               description=f"{method} {sim}")
                for layer, tap in s.missing[:20]:
                    note = f"{method}/{sim}: {layer} runs FP32 (no '{tap}' in the table)"
                    if note not in notes:
                        notes.append(note)
                functional = [layer.name for layer in (s.plan.layers if s.plan is not None and sim == "nvdla" else ())
                              if any(n.startswith("input producer unknown") for n in layer.notes)]
                note = (f"{sim}: {len(functional)} layer(s) read a functional op's result (a +, torch.cat ... in "
                        f"forward: {', '.join(functional[:4])}): the compiler's element-wise / concat scale rules "
                        "are not simulated there, the hardware may differ (write those ops as modules)")
                if functional and note not in notes:
                    notes.append(note)
                if sim == "nvdla" and s.plan is not None:
                    plans[method] = s.plan
            rows.append(EvaluationRow(method=method, simulation=sim, weights=weights, placement=pl,
                                      top1=acc.top1, top5=acc.top5, images=acc.images,
                                      drop1=fp32.top1 - acc.top1, drop5=fp32.top5 - acc.top5))
    return EvaluationReport(rows=tuple(rows), calibration_images=calib_images, evaluation_images=fp32.images,
                            model=model_name or type(model).__name__, data=data_name, notes=tuple(notes),
                            seconds=time.perf_counter() - t0, plans=plans)
