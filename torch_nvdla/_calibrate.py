"""``calibrate(model, loader)``: one pass over data, one range per tap.

The pass runs the model in eval mode under ``torch.no_grad()`` with forward hooks that
stream every tap into a device-side histogram (:mod:`torch_nvdla._histogram`). Afterwards
each tap's range is picked from its histogram by a pure strategy
(:mod:`torch_nvdla._strategies`). Hooks are removed and every module's train/eval flag is
restored in ``finally``: after ``calibrate`` -- even one that raised -- the model has no
hooks left and an identical state_dict.

Policies:
    * NaN / Inf activations: an error naming every tap that saw one
      (:class:`NonFiniteActivationError`); a range from poisoned data is never written.
    * All-zero taps: ``amax = 1.0`` (see :data:`torch_nvdla._table.ZERO_TAP_AMAX`), reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ._console import progress_iter, say
from ._errors import CalibrationError, FileFormatError, NonFiniteActivationError
from ._histogram import Histogram
from ._table import ZERO_TAP_AMAX, CalibrationTable, TapRange
from ._taps import TapHooks, TapSelection

__all__ = ["CalibConfig", "calibrate", "eval_mode", "model_fingerprint", "ranges_from_histograms", "run_batch"]

METHODS = ("entropy", "minmax", "percentile", "mse")
_LABEL_KEYS = frozenset({"label", "labels", "target", "targets", "y"})


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """Options of a calibration pass.

    Attributes:
        method: ``"entropy"`` (TensorRT EntropyCalibrator2-style KL search),
            ``"minmax"`` (max |x|), ``"percentile"`` or ``"mse"``.
        bins: histogram bins of |x| per tap (a power of two).
        percentile: for ``"percentile"``: the percentile of |x| kept (0 < p <= 100).
        threshold: the NVDLA Caffe calibrator's spelling of the percentile, a fraction
            (0.9 = ignore the histogram above the 90th percentile); implies ``"percentile"``.
        num_batches: stop after this many batches (None: the whole loader).
        device: move the model input there (default: the model's parameters' device).
        taps: what is observed (see :class:`TapSelection`).
        input_method: strategy for the model input tap ``data`` (None: ``method``).
            Default ``"minmax"``: an input's range is fixed by its preprocessing and its
            values are discrete (pixels), where the KL search degenerates: on 8-bit
            images it keeps the first level above zero and clips almost everything
            (modelopt's entropy gives the same answer on the same histogram).
    """

    method: str = "entropy"
    bins: int = 2048
    percentile: float = 99.99
    threshold: float | None = None
    num_batches: int | None = None
    device: str | None = None
    taps: TapSelection = field(default_factory=TapSelection)
    input_method: str | None = "minmax"

    def __post_init__(self) -> None:
        if self.threshold is not None:
            from ._strategies import threshold_to_percentile

            # Rounded: threshold=0.29 is percentile 29.0, not 28.999999999999996.
            object.__setattr__(self, "percentile", threshold_to_percentile(self.threshold))
            object.__setattr__(self, "method", "percentile")
        for name in (self.method, self.input_method or self.method):
            if name not in METHODS:
                raise CalibrationError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.bins, int) or self.bins < 256 or self.bins & (self.bins - 1):
            raise CalibrationError(f"bins must be a power of two >= 256, got {self.bins!r}")
        if not (0.0 < float(self.percentile) <= 100.0):
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.num_batches is not None and (not isinstance(self.num_batches, int) or self.num_batches < 1):
            raise CalibrationError(f"num_batches must be a positive integer, got {self.num_batches!r}")

    def strategy_options(self) -> dict:
        return {"percentile": float(self.percentile)} if self.method == "percentile" else {}

    def overrides(self) -> dict[str, str]:
        """Per-tap strategies that differ from ``method``."""
        return {"data": self.input_method} if self.input_method else {}


def ranges_from_histograms(histograms: Mapping[str, Histogram], method: str,
                           overrides: Mapping[str, str] | None = None, **options) -> dict[str, TapRange]:
    """Pick each tap's range from its histogram with one strategy.

    Args:
        histograms: tap -> histogram.
        method: the strategy.
        overrides: tap -> strategy for taps that use another one (e.g. ``data``).
        **options: the strategy's options (``percentile=``); ignored by the others.

    Raises:
        NonFiniteActivationError: naming every tap whose data held NaN or Inf.
    """
    from ._strategies import compute_amax

    bad = [name for name, h in histograms.items() if not bool(h.finite)]
    if bad:
        raise NonFiniteActivationError(
            f"NaN or Inf activations in {len(bad)} tap(s): {', '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "") + "; fix the model or the data (no table was written)"
        )
    ranges = {}
    overrides = dict(overrides or {})
    for name, h in histograms.items():
        amax = 0.0
        tap_method = overrides.get(name, method)
        if h.numel:
            counts, edges = h.abs_histogram()
            opts = options if tap_method == method else {}
            amax = min(float(compute_amax(tap_method, counts, edges, **opts)), h.max_abs())
        if not amax > 0.0:
            amax = ZERO_TAP_AMAX
        lo = float(h.min) if h.numel else 0.0
        hi = float(h.max) if h.numel else 0.0
        ranges[name] = TapRange(name, amax, tap_method, lo, hi)
    return ranges


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode; restore each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _to(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def run_batch(model: nn.Module, batch: Any, device: torch.device | None = None, index: int = 0) -> Any:
    """Call the model on one batch, the way :func:`calibrate` does.

    A tensor is the input; a tuple/list is ``(inputs, target, ...)`` and its first element
    is the input; a dict is passed as keyword arguments without its label keys
    (``label(s)``, ``target(s)``, ``y``).

    Raises:
        CalibrationError: for any other batch type, naming it and the batch index.
    """
    if isinstance(batch, torch.Tensor):
        return model(_to(batch, device))
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError(f"batch {index} is an empty {type(batch).__name__}")
        return model(_to(batch[0], device))
    if isinstance(batch, dict):
        return model(**_to({k: v for k, v in batch.items() if k not in _LABEL_KEYS}, device))
    raise CalibrationError(
        f"batch {index} is a {type(batch).__name__}; expected a tensor, an (inputs, target) "
        "tuple/list or a dict; pass forward=lambda model, batch: ... for anything else"
    )


def _model_device(model: nn.Module) -> torch.device | None:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return None


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model: module paths, types, parameter shapes, and a cheap weight
    signature (each parameter's sum and sum of absolute values) so that a retrained model
    of the same architecture does not reuse a stale cache."""
    h = hashlib.sha256()
    with torch.no_grad():
        for path, module in model.named_modules():
            h.update(f"{path}:{type(module).__name__};".encode())
            for pname, p in module.named_parameters(recurse=False):
                q = p.detach().double()
                h.update(f"{pname}{tuple(p.shape)}:{float(q.sum()):.12e}:{float(q.abs().sum()):.12e};".encode())
    return h.hexdigest()[:16]


def _cache_key(model: nn.Module, config: CalibConfig) -> dict:
    return {
        "fingerprint": model_fingerprint(model),
        "method": config.method,
        "bins": config.bins,
        "options": config.strategy_options(),
        "overrides": config.overrides(),
        "taps": repr(config.taps.inputs) + repr([d.name for d in config.taps.derived])
        + repr(config.taps.model_input) + repr(config.taps.outputs if isinstance(config.taps.outputs, bool) else "custom"),
    }


def _try_cache(path: Path, key: dict) -> CalibrationTable | None:
    if not path.exists():
        say(f"[dim]calibration cache {path} not found: calibrating[/]")
        return None
    try:
        table = CalibrationTable.load(path)
    except FileFormatError as e:
        say(f"[yellow]calibration cache unusable ({e}): recalibrating[/]")
        return None
    stored = table.meta.get("cache_key")
    if stored != key:
        diff = sorted(k for k in key if not isinstance(stored, dict) or stored.get(k) != key[k])
        say(f"[yellow]calibration cache {path} is for a different {'/'.join(diff) or 'setup'}: recalibrating[/]")
        return None
    say(f"[green]using calibration cache {path}[/] ({len(table)} taps)")
    return table


def calibrate(
    model: nn.Module,
    loader: Iterable,
    method: str = "entropy",
    *,
    num_batches: int | None = None,
    bins: int = 2048,
    percentile: float = 99.99,
    threshold: float | None = None,
    device: str | torch.device | None = None,
    taps: TapSelection | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    cache: str | os.PathLike | None = None,
    input_method: str | None = "minmax",
    progress: bool = True,
    config: CalibConfig | None = None,
) -> CalibrationTable:
    """Calibrate ``model`` on ``loader``: one range (amax) per tap.

    Args:
        model: any ``nn.Module``; left exactly as it was (hooks removed, modes restored).
        loader: an iterable of batches: tensors, ``(inputs, target)`` tuples/lists or dicts.
        method: ``"entropy"``, ``"minmax"``, ``"percentile"`` or ``"mse"``.
        num_batches: stop after this many batches.
        bins: histogram bins per tap.
        percentile: percentile of |x| kept by ``"percentile"``.
        threshold: NVDLA Caffe calibrator spelling: a fraction (0.9 = 90th percentile).
        device: where to run the model input (default: where the model's parameters are).
        taps: what to observe (default: the model input and every leaf module's output).
        forward: ``forward(model, batch) -> output`` for batches of any other shape.
        input_method: strategy for the model input ``data`` (see :class:`CalibConfig`).
        cache: a table file: reused when it was made for the same model and options,
            otherwise recalibrated and overwritten (TensorRT's readCalibrationCache).
        progress: show a rich progress bar.
        config: a :class:`CalibConfig` instead of the keyword options.

    Returns:
        A :class:`CalibrationTable` (``table[tap].amax``, ``table[tap].scale``).

    Raises:
        CalibrationError: empty loader, unsupported batch, bad option.
        NonFiniteActivationError: NaN/Inf activations (names the taps).
    """
    if config is None:
        config = CalibConfig(method=method, bins=bins, percentile=percentile, threshold=threshold,
                             num_batches=num_batches, device=None if device is None else str(device),
                             taps=taps if taps is not None else TapSelection(), input_method=input_method)
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    key = _cache_key(model, config)
    if cache is not None:
        cached = _try_cache(Path(cache), key)
        if cached is not None:
            return cached

    dev = torch.device(config.device) if config.device is not None else _model_device(model)
    batches = loader if config.num_batches is None else itertools.islice(loader, config.num_batches)
    total = config.num_batches
    if hasattr(loader, "__len__"):
        total = len(loader) if total is None else min(total, len(loader))
    seen = 0
    hooks = TapHooks(model, config.taps, config.bins)
    with torch.no_grad(), eval_mode(model), hooks:
        for i, batch in enumerate(progress_iter(batches, "calibrating", total, progress)):
            if forward is not None:
                forward(model, batch)
            else:
                run_batch(model, batch, dev, i)
            seen += 1
    if seen == 0:
        raise CalibrationError("the loader yielded no batches: nothing to calibrate on")
    histograms = {name: obs.histogram for name, obs in hooks.observers.items()}

    from ._distributed import reduce_histograms

    histograms = reduce_histograms(histograms)
    ranges = ranges_from_histograms(histograms, config.method, config.overrides(), **config.strategy_options())
    zero = [n for n, h in histograms.items() if h.numel and h.max_abs() == 0.0]
    if zero and progress:
        say(f"[yellow]{len(zero)} tap(s) saw only zeros, amax set to {ZERO_TAP_AMAX}: {', '.join(zero[:8])}[/]")
    meta = {
        "method": config.method,
        "options": config.strategy_options(),
        "overrides": config.overrides(),
        "bins": config.bins,
        "num_batches": seen,
        "skipped": hooks.skipped,
        "reused": hooks.reused,
        "model": type(model).__name__,
        "cache_key": key,
    }
    table = CalibrationTable(ranges, hooks.infos, {n: h.to("cpu") for n, h in histograms.items()}, meta)
    if cache is not None:
        table.save(cache)
    return table
