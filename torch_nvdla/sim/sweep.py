"""Layer-by-layer accuracy-drop sweep: which layers cost accuracy in INT8, and what to keep in FP16.

Design notes and the facts behind them: ``docs/sim.md``.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import CalibrationError
from ..model.batch import run_batch, split_labels, to_device
from ..model.state import eval_mode, model_device
from ..utils.console import progress_iter
from ..utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .evaluate import _count, _logits
from .simulate import simulation_taps

__all__ = ["SWEEP_ORDERS", "SweepReport", "SweepRow", "sweep"]

SWEEP_ORDERS = ("cumulative", "isolated", "both")


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    """One step of a sweep.

    Attributes:
        order: ``"cumulative"`` or ``"isolated"``.
        index: the layer's position in network order (0-based).
        layer: the layer's name (its head tap).
        label: the fused taps, e.g. ``layer1.0.conv1+bn1+relu1``.
        kind: ``conv``, ``fc``, ``eltwise``, ``relu``, ``maxpool``, ``avgpool``, ``float``.
        accuracy: top-1 accuracy in percent after this step.
        drop: FP32 accuracy minus ``accuracy`` (points).
        change: ``accuracy`` minus the previous row's (the first row: minus FP32).
    """

    order: str
    index: int
    layer: str
    label: str
    kind: str
    accuracy: float
    drop: float
    change: float

    def __post_init__(self) -> None:
        if self.order not in ("cumulative", "isolated"):
            raise CalibrationError(f"sweep row {self.layer!r}: order must be cumulative or isolated, got {self.order!r}")
        if not (0.0 <= self.accuracy <= 100.0):
            raise CalibrationError(f"sweep row {self.layer!r}: accuracy {self.accuracy!r} is not a percentage")


@dataclass(frozen=True, kw_only=True)
class SweepReport:
    """The result of :func:`sweep`.

    Attributes:
        fp32: FP32 top-1 accuracy (percent).
        int8: top-1 with every layer INT8.
        images: images per step.
        simulation: ``"nvdla"`` or ``"fake"``.
        weights: ``"per-filter"`` or ``"per-kernel"``.
        layers: every layer in network order.
        cumulative: the cumulative rows (empty when not run).
        isolated: the isolated rows (empty when not run).
        sensitive: the ``top_k`` layers with the largest drop, most sensitive first.
        budget: the allowed drop (points), or ``None``.
        fallback: layers to keep in FP16 so the drop is within the budget (``None``
            without a budget; empty when INT8 already meets it).
        fallback_accuracy: the measured accuracy with that fallback.
        fallback_met: whether the budget is met (``False``: even the full list did not).
        seconds: wall time of the sweep (without calibration).
        notes: what the simulation reported.
    """

    fp32: float
    int8: float
    images: int
    simulation: str
    weights: str
    layers: tuple[str, ...]
    cumulative: tuple[SweepRow, ...] = ()
    isolated: tuple[SweepRow, ...] = ()
    sensitive: tuple[str, ...] = ()
    budget: float | None = None
    fallback: tuple[str, ...] | None = None
    fallback_accuracy: float | None = None
    fallback_met: bool | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget >= 0):
            raise CalibrationError(f"budget must be a finite drop >= 0 (points), got {self.budget!r}")

    @property
    def rows(self) -> tuple[SweepRow, ...]:
        return self.cumulative + self.isolated

    def to_dict(self) -> dict:
        return {
            "fp32": self.fp32, "int8": self.int8, "drop": self.fp32 - self.int8, "images": self.images,
            "simulation": self.simulation, "weights": self.weights, "layers": list(self.layers),
            "cumulative": [asdict(r) for r in self.cumulative], "isolated": [asdict(r) for r in self.isolated],
            "sensitive": list(self.sensitive), "budget": self.budget,
            "fallback": None if self.fallback is None else list(self.fallback),
            "fallback_accuracy": self.fallback_accuracy, "fallback_met": self.fallback_met,
            "seconds": round(self.seconds, 3), "notes": list(self.notes),
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["order", "index", "layer", "label", "kind", "accuracy", "drop", "change"])
        for r in self.rows:
            w.writerow([r.order, r.index, r.layer, r.label, r.kind, f"{r.accuracy:.4f}", f"{r.drop:.4f}",
                        f"{r.change:.4f}"])
        return buf.getvalue()

    def save(self, prefix: str | Path, *, plot: bool = True) -> dict[str, Path]:
        """Write ``<prefix>.csv``, ``<prefix>.json`` and ``<prefix>.png`` (atomically).

        Returns:
            ``{"csv": path, "json": path, "png": path}`` (no ``png`` without matplotlib
            or with ``plot=False``).
        """
        prefix = Path(prefix)
        out = {"csv": atomic_write_text(prefix.with_name(prefix.name + ".csv"), self.to_csv()),
               "json": atomic_write_json(prefix.with_name(prefix.name + ".json"), self.to_dict())}
        if plot:
            png = self.plot(prefix.with_name(prefix.name + ".png"))
            if png is not None:
                out["png"] = png
        return out

    def plot(self, path: str | Path) -> Path | None:
        """A PNG of accuracy against layer (cumulative and isolated), FP32 and budget lines."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        n = len(self.layers)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2.5), 4.2), dpi=100)
        ax.axhline(self.fp32, color="#2ca02c", linestyle="--", linewidth=1, label=f"FP32 {self.fp32:.2f}")
        if self.budget is not None:
            ax.axhline(self.fp32 - self.budget, color="#d62728", linestyle=":", linewidth=1,
                       label=f"FP32 - budget ({self.budget:g} points)")
        if self.cumulative:
            ax.plot([r.index for r in self.cumulative], [r.accuracy for r in self.cumulative], marker="o",
                    markersize=3, color="#1f77b4", label="cumulative (layers 0..i INT8)")
        if self.isolated:
            ax.plot([r.index for r in self.isolated], [r.accuracy for r in self.isolated], marker="s",
                    markersize=3, linestyle="none" if self.cumulative else "-", color="#ff7f0e",
                    label="isolated (layer i alone INT8)")
        ax.set_xticks(range(n))
        ax.set_xticklabels(self.layers, rotation=90, fontsize=7)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"INT8 sweep ({self.simulation}, {self.weights}, {self.images} images)", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return atomic_write_bytes(path, buf.getvalue())

    def print(self, title: str | None = None) -> None:
        """Rich tables on stdout: the sweep(s), the sensitive layers, the fallback."""
        from rich.table import Table

        from ..utils.report import stdout

        for order, rows in (("cumulative", self.cumulative), ("isolated", self.isolated)):
            if not rows:
                continue
            t = Table(title=title or f"{order} INT8 sweep ({self.simulation}, {self.weights}; FP32 {self.fp32:.2f} %, "
                      f"all INT8 {self.int8:.2f} %, {self.images} images)")
            for col, just in [("#", "right"), ("layer", "left"), ("kind", "left"), ("accuracy %", "right"),
                              ("drop", "right"), ("change", "right")]:
                t.add_column(col, justify=just)
            hot = set(self.sensitive)
            for r in rows:
                style = "bold red" if r.layer in hot else None
                t.add_row(str(r.index), r.label, r.kind, f"{r.accuracy:.2f}", f"{r.drop:+.2f}", f"{r.change:+.2f}",
                          style=style)
            stdout.print(t)
        if self.sensitive:
            stdout.print(f"most sensitive: {', '.join(self.sensitive)}")
        if self.fallback is not None:
            if not self.fallback:
                stdout.print(f"all layers INT8 are within the {self.budget:g}-point budget "
                             f"(drop {self.fp32 - self.int8:.2f})")
            else:
                met = "meets" if self.fallback_met else "does NOT meet"
                stdout.print(f"FP16 fallback ({len(self.fallback)} layer(s)) {met} the {self.budget:g}-point budget: "
                             f"{', '.join(self.fallback)} -> {self.fallback_accuracy:.2f} % "
                             f"(drop {self.fp32 - (self.fallback_accuracy or 0.0):.2f})")


def _reiterable(data: Iterable) -> Iterable:
    if iter(data) is data:  # a one-shot iterator: keep its batches
        return list(data)
    return data


def sweep(
    model: nn.Module,
    calibration,
    data: Iterable,
    *,
    method: str = "entropy",
    order: str = "cumulative",
    simulation: str = "nvdla",
    weights: str = "per-kernel",
    budget: float | None = None,
    top_k: int = 5,
    missing: str = "error",
    device: str | torch.device | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> SweepReport:
    """Measure the accuracy drop layer by layer.

    Args:
        model: the model (left exactly as it was).
        calibration: a :class:`~torch_nvdla.CalibrationTable`, or calibration batches to
            calibrate on with ``method`` (once), as :func:`~torch_nvdla.evaluate` takes it.
        data: labelled batches ``(inputs, labels)``; iterated several times (a one-shot
            iterator is kept in memory).
        method: calibration strategy (when ``calibration`` is data).
        order: ``"cumulative"``, ``"isolated"`` or ``"both"``.
        simulation: ``"nvdla"`` (integer) or ``"fake"`` (fake-quant on the same graph).
        weights: ``"per-filter"`` or ``"per-kernel"``.
        budget: allowed top-1 drop in points; with it a verified FP16-fallback list is
            suggested.
        top_k: how many sensitive layers to name.
        missing: ``"error"`` or ``"fp32"`` (layers the table cannot serve stay FP32 and
            are not swept).
        device: where inputs go.
        num_batches: use only the first batches of ``data``.
        progress: a rich progress bar over the whole sweep.

    Returns:
        A :class:`SweepReport` (``.print()``, ``.save(prefix)`` writes CSV, JSON and PNG).

    Raises:
        CalibrationError: bad options, no table and no calibration data, unlabelled data.
    """
    from .simulate import int8_simulation

    _check_sweep_options(order, budget, top_k, simulation, weights, missing)
    table = _sweep_table(model, calibration, method, device, progress)
    data = _reiterable(data)
    batches = data if num_batches is None else list(_take(data, num_batches))
    first = next(iter(batches), None)
    if first is None:
        raise CalibrationError("the sweep's data loader yielded no batches")
    inputs0, _ = split_labels(first, 0)
    dev = torch.device(device) if device is not None else model_device(model)
    t0 = time.perf_counter()
    orders = ("cumulative", "isolated") if order == "both" else (order,)

    with torch.no_grad(), eval_mode(model), int8_simulation(
            model, table, mode=simulation, weights=weights, placement="nvdla", layers=(), missing=missing,
            example=to_device(inputs0, dev)) as sim:
        plan = sim.plan
        swept = [layer for layer in plan.layers if layer.name not in plan.fp32_layers]
        run = _SweepRun(sim, model, dev, [layer.name for layer in swept])
        steps = list(_steps(orders, len(run.names), run.all_in_cumulative(orders)))
        total = len(batches) * len(steps) if hasattr(batches, "__len__") else None
        work = ((b, batch, step) for b, batch in enumerate(batches) for step in steps)
        for b, batch, step in progress_iter(work, "INT8 sweep", total, progress):
            run.step(step, b, *split_labels(batch, b))
        fp32, int8 = run.percent(run.fp32), run.percent(run.all)
        cumulative = _rows("cumulative", swept, [run.percent(c) for c in run.cumulative], fp32) \
            if "cumulative" in orders else ()
        isolated = _rows("isolated", swept, [run.percent(c) for c in run.isolated], fp32) \
            if "isolated" in orders else ()
        ranking = _ranking(run.names, isolated, cumulative)
        sensitive = tuple(_sensitive(ranking, isolated, cumulative)[:top_k])
        fallback = fallback_acc = met = None
        if budget is not None:
            fallback, fallback_acc, met = _fallback(sim, model, batches, dev, run.names, ranking,
                                                    fp32, int8, float(budget), progress)
        notes = tuple(plan.notes)
    return SweepReport(fp32=fp32, int8=int8, images=run.images, simulation=simulation, weights=weights,
                       layers=tuple(run.names), cumulative=tuple(cumulative), isolated=tuple(isolated),
                       sensitive=sensitive, budget=None if budget is None else float(budget),
                       fallback=None if fallback is None else tuple(fallback), fallback_accuracy=fallback_acc,
                       fallback_met=met, seconds=time.perf_counter() - t0, notes=notes)


def _check_sweep_options(order: str, budget, top_k, simulation: str, weights: str, missing: str) -> None:
    from .simulate import SimulationConfig

    if order not in SWEEP_ORDERS:
        raise CalibrationError(f"order must be one of {', '.join(SWEEP_ORDERS)}, got {order!r}")
    if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise CalibrationError(f"budget must be a finite drop >= 0 (points), got {budget!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise CalibrationError(f"top_k must be a non-negative integer, got {top_k!r}")
    SimulationConfig(mode=simulation, weights=weights, placement="nvdla", missing=missing)


def _sweep_table(model: nn.Module, calibration, method: str, device, progress: bool):
    """The table given, or one calibrated (once) on the batches given, with the simulation's taps."""
    if isinstance(calibration, Mapping):
        return calibration
    if calibration is None:
        raise CalibrationError("sweep needs a calibration table or calibration data")
    from ..calib.calibrate import calibrate

    dev = torch.device(device) if device is not None else model_device(model)
    example = next(iter(calibration), None) if iter(calibration) is not calibration else None
    taps = simulation_taps(model, to_device(example, dev)) if example is not None else None
    return calibrate(model, calibration, method, device=device, taps=taps, progress=progress)


@dataclass(frozen=True)
class _Step:
    """One forward of a batch: ``kind`` is ``base`` (FP32, cached), ``cumulative`` (layers
    ``0..index`` INT8), ``isolated`` (layer ``index`` alone) or ``all`` (every layer)."""

    kind: str
    index: int = -1


def _steps(orders: Sequence[str], n_layers: int, all_in_cumulative: bool):
    """The forwards each batch takes, in order."""
    yield _Step("base")
    for o in orders:
        for i in range(n_layers):
            yield _Step(o, i)
    if not all_in_cumulative:
        yield _Step("all")


class _SweepRun:
    """Correct-prediction counters of a sweep, and the forwards that feed them.

    Each batch runs once in FP32 with every call's output kept (``base``); a forward with
    some layers INT8 then recomputes only the calls downstream of the layer that changed
    and replays the rest (:meth:`~torch_nvdla.sim.simulate.Simulation.replaying`).
    """

    def __init__(self, sim, model: nn.Module, dev, names: list[str]) -> None:
        self.sim, self.model, self.dev, self.names = sim, model, dev, names
        self.downstream = {name: sim.plan.downstream([name]) for name in names}
        self.images = self.fp32 = self.all = 0
        self.cumulative = [0] * len(names)
        self.isolated = [0] * len(names)
        self._base: dict = {}
        self._cur: dict = {}

    @staticmethod
    def all_in_cumulative(orders: Sequence[str]) -> bool:
        """The cumulative order's last forward is the all-INT8 one."""
        return "cumulative" in orders

    def percent(self, correct: int) -> float:
        return 100.0 * correct / self.images if self.images else 0.0

    def _correct(self, out, labels, b: int) -> int:
        return _count(_logits(out, b), labels, 1, b)[0]

    def step(self, step: _Step, b: int, inputs, labels) -> None:
        sim, model, dev = self.sim, self.model, self.dev
        if step.kind == "base":
            sim.set_layers(())
            with sim.replaying(None, None) as rp:
                out = run_batch(model, inputs, dev, b)
            self._base, self._cur = rp.out, dict(rp.out)
            self.fp32 += self._correct(out, labels, b)
            self.images += int(labels.shape[0])
        elif step.kind == "all":
            sim.set_layers(self.names)
            self.all += self._correct(run_batch(model, inputs, dev, b), labels, b)
        elif step.kind == "isolated":
            name = self.names[step.index]
            sim.set_layers([name])
            with sim.replaying(self._base, self.downstream[name]) as rp:
                out = run_batch(model, inputs, dev, b)
            for idx, entry in rp.out.items():  # stale entries recomputed in FP32: keep the fresh ones
                if idx not in self.downstream[name]:
                    self._base[idx] = entry
            self.isolated[step.index] += self._correct(out, labels, b)
        else:
            name = self.names[step.index]
            sim.set_layers(self.names[: step.index + 1])
            with sim.replaying(self._cur, self.downstream[name]) as rp:
                out = run_batch(model, inputs, dev, b)
            self._cur.update(rp.out)
            c = self._correct(out, labels, b)
            self.cumulative[step.index] += c
            if step.index == len(self.names) - 1:
                self.all += c


def _ranking(names: Sequence[str], isolated, cumulative) -> list[str]:
    """Layers from the most to the least sensitive: the largest isolated drop first, then the
    most negative cumulative change, then network order."""
    iso = {r.layer: r for r in isolated}
    cum = {r.layer: r for r in cumulative}

    def key(i_name):
        i, name = i_name
        return (-(iso[name].drop if iso else 0.0), cum[name].change if cum else 0.0, i)

    return [name for _, name in sorted(enumerate(names), key=key)]


def _sensitive(ranking: Sequence[str], isolated, cumulative) -> list[str]:
    """The ranked layers that cost accuracy (an isolated drop, or a cumulative loss)."""
    iso = {r.layer: r for r in isolated}
    cum = {r.layer: r for r in cumulative}
    return [n for n in ranking if (iso and iso[n].drop > 0) or (cum and cum[n].change < 0)]


def _take(data: Iterable, n: int):
    for i, batch in enumerate(data):
        if i >= n:
            break
        yield batch




def _rows(order: str, layers, accs: Sequence[float], fp32: float) -> tuple[SweepRow, ...]:
    rows = []
    prev = fp32
    for i, (layer, acc) in enumerate(zip(layers, accs)):
        rows.append(SweepRow(order=order, index=i, layer=layer.name, label=layer.label, kind=layer.kind,
                             accuracy=acc, drop=fp32 - acc, change=acc - prev))
        prev = acc
    return tuple(rows)


def _measure(sim, model, batches, dev, layers: Sequence[str]) -> float:
    sim.set_layers(layers)
    c = n = 0
    for b, batch in enumerate(batches):
        inputs, labels = split_labels(batch, b)
        c += _count(_logits(run_batch(model, inputs, dev, b), b), labels, 1, b)[0]
        n += int(labels.shape[0])
    return 100.0 * c / max(n, 1)


def _fallback(sim, model, batches, dev, names: Sequence[str], ranked: Sequence[str], fp32: float, int8: float,
              budget: float, progress: bool) -> tuple[list[str], float, bool]:
    """Greedy, verified: add the most sensitive layer to FP16 until the drop fits the budget."""
    if fp32 - int8 <= budget:
        return [], int8, True
    order = list(ranked) + [n for n in names if n not in ranked]
    chosen: list[str] = []
    acc = int8
    for name in progress_iter(order, "FP16 fallback", len(order), progress):
        chosen.append(name)
        acc = _measure(sim, model, batches, dev, [n for n in names if n not in chosen])
        if fp32 - acc <= budget:
            return chosen, acc, True
    return chosen, acc, False
