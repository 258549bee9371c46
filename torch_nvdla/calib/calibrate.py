"""``calibrate(model, loader)``: one pass over data, one range per tap.

Design notes and the facts behind them: ``docs/calib.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import (
    CalibrationError,
    FileFormatError,
    NonFiniteActivationError,
    TorchNvdlaError,
)
from ..model.batch import describe_batch, first_float_tensor, run_batch
from ..model.state import (
    code_digest,
    eval_mode,
    hash_tensor,
    model_device,
    model_fingerprint,
)
from ..utils.console import progress_iter, say
from .table import ZERO_TAP_AMAX, CalibrationTable, ranges_from_histograms
from .taps import TapHooks, TapSelection

__all__ = ["CalibConfig", "CalibrationSession", "calibrate", "calibration_mode"]

METHODS = ("entropy", "minmax", "percentile", "mse")
#: Most bins per tap histogram (8 bytes each, per tap): beyond this memory, not resolution, rules.
MAX_BINS = 1 << 16


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
            from .strategies import threshold_to_percentile

            # Rounded: threshold=0.29 is percentile 29.0, not 28.999999999999996.
            object.__setattr__(self, "percentile", threshold_to_percentile(self.threshold))
            object.__setattr__(self, "method", "percentile")
        for name in (self.method, self.input_method or self.method):
            if name not in METHODS:
                raise CalibrationError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        if (isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 256 <= self.bins <= MAX_BINS
                or self.bins & (self.bins - 1)):
            raise CalibrationError(f"bins must be a power of two from 256 to {MAX_BINS}, got {self.bins!r}")
        if not (0.0 < float(self.percentile) <= 100.0):
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.num_batches is not None and (not isinstance(self.num_batches, int) or self.num_batches < 1):
            raise CalibrationError(f"num_batches must be a positive integer, got {self.num_batches!r}")

    def strategy_options(self) -> dict:
        return {"percentile": float(self.percentile)} if self.method == "percentile" else {}

    def overrides(self) -> dict[str, str]:
        """Per-tap strategies that differ from ``method``."""
        return {"data": self.input_method} if self.input_method else {}


class _Unfingerprintable(Exception):
    pass


def _hash_batch(h, batch: Any) -> None:
    """Feed one batch to ``h``: tensors by dtype, shape and bytes; containers recursively."""
    stack = [batch]
    while stack:
        b = stack.pop()
        if isinstance(b, torch.Tensor):
            hash_tensor(h, "t", b)
        elif isinstance(b, (list, tuple)):
            h.update(f"{type(b).__name__}{len(b)};".encode())
            stack.extend(reversed(b))
        elif isinstance(b, dict):
            h.update(f"dict{len(b)};".encode())
            for k in b:
                h.update(repr(k).encode())
                stack.append(b[k])
        elif isinstance(b, (int, float, str, bytes, bool, type(None))):
            h.update(repr(b).encode())
        elif type(b).__module__ == "numpy" and hasattr(b, "tobytes"):
            h.update(f"{getattr(b, 'dtype', '')}{getattr(b, 'shape', '')}".encode() + b.tobytes())
        else:
            raise _Unfingerprintable(type(b).__name__)


class _DataDigest:
    """A running hash of the batches a pass consumes, and how many."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self.batches = 0
        self.unhashable: str | None = None

    def update(self, batch: Any) -> None:
        self.batches += 1
        if self.unhashable is None:
            try:
                _hash_batch(self._h, batch)
            except _Unfingerprintable as e:
                self.unhashable = str(e)

    def value(self) -> str | None:
        return None if self.unhashable else f"{self._h.hexdigest()}/{self.batches}"


def _selection_key(taps: TapSelection) -> str:
    outputs = taps.outputs if isinstance(taps.outputs, bool) else f"predicate {code_digest(taps.outputs)}"
    derived = [(d.name, code_digest(d.fn)) if hasattr(d, "fn") else d.name for d in taps.derived]
    return repr((taps.model_input, outputs, taps.inputs, taps.unseen_inputs, taps.unfolded_batchnorms, derived,
                 taps.reuse))


def _cache_key(model: nn.Module, config: CalibConfig) -> dict:
    """What a table depends on besides the data (the data's digest is added to it)."""
    return {
        "fingerprint": model_fingerprint(model),
        "method": config.method,
        "bins": config.bins,
        "options": config.strategy_options(),
        "overrides": config.overrides(),
        "taps": _selection_key(config.taps),
    }


def _batches(loader: Iterable, config: CalibConfig):
    return loader if config.num_batches is None else itertools.islice(loader, config.num_batches)


def _try_cache(path: Path, key: dict, loader: Iterable, config: CalibConfig,
               progress: bool) -> CalibrationTable | None:
    """The cached table when it was made from this model, these options and this data."""
    if not path.exists():
        say(f"[dim]calibration cache {path} not found: calibrating[/]")
        return None
    try:
        table = CalibrationTable.load(path)
    except FileFormatError as e:
        say(f"[yellow]calibration cache unusable ({e}): recalibrating[/]")
        return None
    if table.saved_digest != table.digest():
        say(f"[yellow]calibration cache {path} was modified after it was written (its digest does not match "
            "its content): recalibrating[/]")
        return None
    stored = table.meta.get("cache_key")
    stored = stored if isinstance(stored, dict) else {}
    diff = sorted(k for k in key if stored.get(k) != key[k])
    if not diff and iter(loader) is loader:
        say(f"[yellow]calibration cache {path} not reused: a one-shot iterator cannot be fingerprinted without "
            "consuming it (pass a re-iterable loader): recalibrating[/]")
        return None
    if not diff:
        data = _DataDigest()
        for batch in progress_iter(_batches(loader, config), "checking the cache's data", None, progress):
            data.update(batch)
        if data.unhashable:
            say(f"[yellow]calibration cache {path} not reused: batches of type {data.unhashable} cannot be "
                "fingerprinted: recalibrating[/]")
            return None
        if stored.get("data") != data.value():
            diff = ["data (content or number of batches)"]
    if diff:
        say(f"[yellow]calibration cache {path} is for a different {'/'.join(diff)}: recalibrating[/]")
        return None
    say(f"[green]using calibration cache {path}[/] ({len(table)} taps)")
    return table


class CalibrationSession:
    """One calibration pass, as :func:`calibration_mode` yields it.

    Every forward of the model inside the block streams its taps into histograms; when
    the block ends without an error, :attr:`table` holds the ranges.

    Attributes:
        forwards: forward passes of the whole model observed so far.
    """

    def __init__(self, model: nn.Module, config: CalibConfig, progress: bool = True) -> None:
        self.model = model
        self.config = config
        self.progress = progress
        self.forwards = 0
        self.hooks = TapHooks(model, config.taps, config.bins)
        self._nonfinite: torch.Tensor | None = None  # a device flag: no host read per forward
        self._table: CalibrationTable | None = None

    @property
    def table(self) -> CalibrationTable:
        """The table (after the ``calibration_mode`` block)."""
        if self._table is None:
            raise CalibrationError("the table is ready when the calibration_mode block has ended")
        return self._table

    def _observe_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self.forwards += 1
        out = first_float_tensor(output)
        if out is not None and out.numel():
            bad = ~torch.isfinite(out).all()
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad.to(self._nonfinite.device)

    def _finish(self) -> None:
        model, config = self.model, self.config
        if self.forwards == 0:
            raise CalibrationError(f"no forward pass of {type(model).__name__} ran: nothing to calibrate on")
        from .distributed import reduce_histograms

        histograms = reduce_histograms({name: obs.histogram for name, obs in self.hooks.observers.items()})
        if histograms and not any(h.numel for h in histograms.values()):
            raise CalibrationError(f"no data: the {self.forwards} forward pass(es) held no elements (empty tensors); "
                                   "no table was written")
        ranges = ranges_from_histograms(histograms, config.method, config.overrides(), **config.strategy_options())
        if self._nonfinite is not None and bool(self._nonfinite):
            raise NonFiniteActivationError(
                f"the output of {type(model).__name__} held NaN or Inf, computed after the last observed module "
                "(in forward itself); fix the model or the data (no table was written)")
        zero = [n for n, h in histograms.items() if h.numel and h.max_abs() == 0.0]
        if zero and self.progress:
            say(f"[yellow]{len(zero)} tap(s) saw only zeros, amax set to {ZERO_TAP_AMAX}: {', '.join(zero[:8])}[/]")
        for r in ranges.values():
            if r.note and self.progress:
                say(f"[yellow]{r.name}: {r.note}[/]")
        meta = {
            "method": config.method,
            "options": config.strategy_options(),
            "overrides": config.overrides(),
            "bins": config.bins,
            "num_batches": self.forwards,
            "skipped": self.hooks.skipped,
            "reused": self.hooks.reused,
            "model": type(model).__name__,
        }
        self._table = CalibrationTable(ranges, self.hooks.infos, {n: h.to("cpu") for n, h in histograms.items()},
                                       meta)


def _config(config: CalibConfig | None, **options) -> CalibConfig:
    if config is not None:
        return config
    taps = options.pop("taps")
    device = options.pop("device")
    return CalibConfig(taps=taps if taps is not None else TapSelection(),
                       device=None if device is None else str(device), **options)


@contextlib.contextmanager
def calibration_mode(
    model: nn.Module,
    method: str = "entropy",
    *,
    bins: int = 2048,
    percentile: float = 99.99,
    threshold: float | None = None,
    taps: TapSelection | None = None,
    input_method: str | None = "minmax",
    progress: bool = True,
    config: CalibConfig | None = None,
) -> Iterator[CalibrationSession]:
    """Observe every forward pass of ``model`` inside the block; the table is ready after it.

    ``with calibration_mode(model) as cal: for x in loader: model(x)`` then ``cal.table``.
    Inside the block the model is in eval mode under ``torch.no_grad()``; on exit its
    modes, buffers and hooks are as before, also when the block raises (and then no
    table is made). Options as :func:`calibrate`.

    Raises:
        CalibrationError: no forward pass ran, or every tensor was empty.
        NonFiniteActivationError: NaN/Inf activations or outputs.
    """
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = _config(config, method=method, bins=bins, percentile=percentile, threshold=threshold, taps=taps,
                     input_method=input_method, device=None, num_batches=None)
    session = CalibrationSession(model, config, progress)
    handle = model.register_forward_hook(session._observe_output)
    try:
        with torch.no_grad(), eval_mode(model), session.hooks:
            yield session
    finally:
        handle.remove()
    session._finish()


def calibrate(
    model: nn.Module,
    loader: Iterable | None = None,
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
    forward_loop: Callable[[nn.Module], Any] | None = None,
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
        forward_loop: instead of a loader, ``forward_loop(model)`` runs the model on the
            calibration data itself (modelopt's convention); every forward is observed.

    Returns:
        A :class:`CalibrationTable` (``table[tap].amax``, ``table[tap].scale``).

    Raises:
        CalibrationError: empty loader, unsupported batch, bad option.
        NonFiniteActivationError: NaN/Inf activations (names the taps).
    """
    config = _config(config, method=method, bins=bins, percentile=percentile, threshold=threshold,
                     num_batches=num_batches, device=device, taps=taps, input_method=input_method)
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if (loader is None) == (forward_loop is None):
        raise CalibrationError("give calibrate a loader or a forward_loop (one of them)")
    if forward_loop is not None and cache is not None:
        raise CalibrationError("cache= needs a loader: its batches are part of the cache key")
    key = _cache_key(model, config)
    if cache is not None:
        cached = _try_cache(Path(cache), key, loader, config, progress)
        if cached is not None:
            return cached

    data = _DataDigest() if cache is not None else None
    with calibration_mode(model, config=config, progress=progress) as session:
        if forward_loop is not None:
            forward_loop(model)
        else:
            _run_loader(model, loader, config, forward, data, progress)
    table = session.table
    table.meta["cache_key"] = key
    if data is not None:
        key["data"] = data.value()
    if cache is not None:
        table.save(cache)
    return table


def _run_loader(model: nn.Module, loader: Iterable, config: CalibConfig, forward, data: _DataDigest | None,
                progress: bool) -> None:
    """Run the model on every batch (under a progress bar); a failing batch is named."""
    dev = torch.device(config.device) if config.device is not None else model_device(model)
    total = config.num_batches
    if hasattr(loader, "__len__"):
        total = len(loader) if total is None else min(total, len(loader))
    seen = 0
    for i, batch in enumerate(progress_iter(_batches(loader, config), "calibrating", total, progress)):
        if data is not None:
            data.update(batch)
        try:
            if forward is not None:
                forward(model, batch)
            else:
                run_batch(model, batch, dev, i)
        except TorchNvdlaError:
            raise
        except Exception as e:
            if hasattr(e, "add_note"):  # the CLI prints it; the exception keeps its type
                e.add_note(f"while running {type(model).__name__} on batch {i} ({describe_batch(batch)})")
            raise
        seen += 1
    if seen == 0:
        raise CalibrationError("the loader yielded no batches: nothing to calibrate on")
