"""The calibration table: one symmetric range per tap, in network order.

Vocabulary, said once for the whole package: a tap's **amax** is the symmetric range
``[-amax, amax]`` mapped onto int8; its **scale** is ``amax / 127`` (one int8 step), so a
value ``x`` quantizes to ``clamp(round(x / scale), -128, 127)``.

A tap that only ever saw zeros has no range to pick; it gets ``amax = 1.0``
(:data:`ZERO_TAP_AMAX`): any scale represents zero exactly, and a unit range keeps the
NVDLA compiler's requantization ratios ``S_in * S_w / S_out`` representable (a zero scale
makes the compiler fail).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CalibrationError, FileFormatError, NonFiniteActivationError
from ..utils.io import atomic_write_bytes, atomic_write_json, read_json
from .histogram import Histogram
from .strategies import compute_amax, entropy_amax_batch
from .taps import TapInfo

__all__ = ["CalibrationTable", "TapRange", "ZERO_TAP_AMAX", "ranges_from_histograms"]

ZERO_TAP_AMAX = 1.0
TABLE_FORMAT = "torch_nvdla.calibration_table"
TABLE_VERSION = 1


@dataclass(frozen=True)
class TapRange:
    """The range picked for one tap.

    Attributes:
        name: the tap name.
        amax: the symmetric range (> 0).
        method: the strategy that picked it.
        min: smallest value observed.
        max: largest value observed.
        note: why the range is not the strategy's own pick (a degenerate search that
            fell back to another strategy), else ``""``.
    """

    name: str
    amax: float
    method: str
    min: float = 0.0
    max: float = 0.0
    note: str = ""

    @property
    def scale(self) -> float:
        """``amax / 127``: the size of one int8 step."""
        return self.amax / 127.0


class CalibrationTable(Mapping):
    """Ranges per tap, in network order; ``table[name]`` is a :class:`TapRange`.

    Args:
        ranges: tap name -> :class:`TapRange`, in network order.
        infos: tap name -> :class:`TapInfo` (where the tensor comes from).
        histograms: tap name -> :class:`Histogram` (kept when the table was calibrated
            here, not when loaded from a file).
        meta: method, options, model fingerprint, number of samples...
    """

    def __init__(self, ranges: Mapping[str, TapRange], infos: Mapping[str, TapInfo] | None = None,
                 histograms: Mapping[str, Histogram] | None = None, meta: Mapping[str, Any] | None = None) -> None:
        self._ranges = dict(ranges)
        self.infos = dict(infos or {})
        self.histograms = dict(histograms or {})
        self.meta = dict(meta or {})
        #: The digest a loaded file carried (see :meth:`digest`); None for a table made here.
        self.saved_digest: str | None = None
        for name, r in self._ranges.items():
            if not (math.isfinite(r.amax) and r.amax > 0):
                raise ValueError(f"tap {name!r}: amax must be finite and > 0, got {r.amax!r}")

    # -- Mapping ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TapRange:
        try:
            return self._ranges[name]
        except KeyError:
            close = [n for n in self._ranges if name in n or n in name][:5]
            hint = f"; similar: {close}" if close else ""
            raise KeyError(f"no tap {name!r} in the calibration table{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def __repr__(self) -> str:
        return f"CalibrationTable({len(self)} taps, method={self.meta.get('method')!r})"

    @property
    def method(self) -> str | None:
        return self.meta.get("method")

    def amaxes(self) -> dict[str, float]:
        """Tap name -> amax, in network order."""
        return {n: r.amax for n, r in self._ranges.items()}

    def scales(self) -> dict[str, float]:
        """Tap name -> scale (``amax / 127``), in network order."""
        return {n: r.scale for n, r in self._ranges.items()}

    def with_method(self, method: str, **options) -> "CalibrationTable":
        """The same histograms, ranges re-picked by another strategy (no new data pass)."""
        if not self.histograms:
            raise ValueError("this table holds no histograms (loaded from a file?); recalibrate")
        overrides = {k: v for k, v in self.meta.get("overrides", {}).items() if k in self.histograms}
        ranges = ranges_from_histograms(self.histograms, method, overrides, **options)
        meta = {**self.meta, "method": method, "options": options}
        # The cache key says how the stored ranges were picked: a re-picked table saved as a
        # cache must not pass for a calibration with the original method.
        meta.pop("cache_key", None)
        return CalibrationTable(ranges, self.infos, self.histograms, meta)

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        taps = []
        for name, r in self._ranges.items():
            entry = {"name": name, "amax": r.amax, "scale": r.scale, "method": r.method,
                     "min": r.min, "max": r.max}
            if r.note:
                entry["note"] = r.note
            if name in self.infos:
                info = asdict(self.infos[name])
                info.pop("name")
                entry["info"] = info
            taps.append(entry)
        meta = {**self.meta, "digest": self.digest()}
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "meta": meta, "taps": taps}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON, atomically (a reusable calibration cache)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationTable":
        """Read a table written by :meth:`save`, validating all of it.

        Raises:
            FileFormatError: naming the file and the tap when it is not such a table: a
                wrong type anywhere, a duplicate tap, an amax that is not a finite number
                > 0, a scale that is not ``amax / 127``.
        """
        path = Path(path)
        obj = read_json(path, "calibration table")
        if not isinstance(obj, dict) or obj.get("format") != TABLE_FORMAT:
            raise FileFormatError(path, f"not a torch_nvdla calibration table (no \"format\": \"{TABLE_FORMAT}\")")
        if obj.get("version") != TABLE_VERSION:
            raise FileFormatError(path, f"unsupported table version {obj.get('version')!r}")
        taps = obj.get("taps")
        if not isinstance(taps, list):
            raise FileFormatError(path, "\"taps\" must be a list")
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise FileFormatError(path, f"\"meta\" must be an object, got {_json_type(meta)}")
        ranges, infos = {}, {}
        for i, t in enumerate(taps):
            name, r, info = _tap_from_dict(path, i, t)
            if name in ranges:
                raise FileFormatError(path, f"tap #{i}: {name!r} appears twice")
            ranges[name] = r
            if info is not None:
                infos[name] = info
        meta = dict(meta)
        saved = meta.pop("digest", None)
        table = cls(ranges, infos, None, meta)
        table.saved_digest = saved if isinstance(saved, str) else None
        return table

    def digest(self) -> str:
        """A SHA-256 over the ranges (names, amax, method, min, max, in order) and the meta:
        :meth:`save` writes it into the file's meta, so an edited file is noticed."""
        body = {"meta": self.meta,
                "taps": [[n, r.amax, r.method, r.min, r.max] for n, r in self._ranges.items()]}
        return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()

    def save_histograms(self, directory: str | os.PathLike, *, plots: bool = True) -> Path:
        """Write each tap's |x| histogram (the NVDLA calibrator's ``-histdir``).

        Per tap ``<tap>.npz`` holds ``counts``, ``edges`` and ``amax``; ``index.json`` maps
        taps to files. With matplotlib installed, ``<tap>.png`` plots the histogram on a log
        scale with the chosen amax marked.
        """
        import io

        import numpy as np

        if not self.histograms:
            raise ValueError("this table holds no histograms (loaded from a file?); recalibrate")
        directory = Path(directory)
        plt = None
        if plots:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                plt = None
        index = {}
        for name, hist in self.histograms.items():
            stem = _safe_filename(name)
            counts, edges = hist.abs_histogram()
            counts, edges = counts.cpu().numpy(), edges.cpu().numpy()
            amax = self._ranges[name].amax if name in self._ranges else float("nan")
            buf = io.BytesIO()
            np.savez(buf, counts=counts, edges=edges, amax=np.float64(amax))
            atomic_write_bytes(directory / f"{stem}.npz", buf.getvalue())
            index[name] = {"file": f"{stem}.npz", "amax": amax, "max_abs": hist.max_abs(), "numel": hist.numel}
            if plt is not None:
                index[name]["plot"] = f"{stem}.png"
                _plot_histogram(plt, directory / f"{stem}.png", name, counts, edges, amax,
                                self._ranges[name].method if name in self._ranges else "")
        atomic_write_json(directory / "index.json", index)
        return directory


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

    scalars = {name: h.scalars() for name, h in histograms.items()}  # (range, min, max, finite)
    bad = [name for name, (_, _, _, finite) in scalars.items() if not finite]
    if bad:
        raise NonFiniteActivationError(
            f"NaN or Inf activations in {len(bad)} tap(s): {', '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "") + "; fix the model or the data (no table was written)"
        )
    overrides = dict(overrides or {})
    keys: dict[str, int] = {}
    unique: dict[int, tuple[Histogram, str]] = {}  # taps sharing one histogram search once
    alike: dict[tuple, list[int]] = {}  # (method, range, min, max, numel) -> unique histograms with them
    for name, h in histograms.items():
        if h.numel:
            tap_method = overrides.get(name, method)
            similar = alike.setdefault((tap_method, *scalars[name][:3], h.numel), [])
            key = next((k for k in similar if torch.equal(unique[k][0].counts, h.counts)), None)
            if key is None:
                key = len(unique)
                unique[key] = (h, tap_method)
                similar.append(key)
            keys[name] = key
    picked = _pick_all(unique, method, options)
    ranges = {}
    for name, h in histograms.items():
        amax, tap_method, note = picked[keys[name]] if name in keys else (0.0, overrides.get(name, method), "")
        if not amax > 0.0:
            amax = ZERO_TAP_AMAX
        _, lo, hi, _ = scalars[name] if h.numel else (0.0, 0.0, 0.0, True)
        ranges[name] = TapRange(name, amax, tap_method, lo, hi, note)
    return ranges


def _pick_all(unique: Mapping[int, tuple[Histogram, str]], method: str,
              options: Mapping) -> dict[int, tuple[float, str, str]]:
    """``(amax, method used, note)`` of every distinct histogram. The entropy searches run
    as one batch per bin count and device (:func:`entropy_amax_batch`), the others one by
    one."""
    raw: dict[int, float] = {}
    clipped: dict[int, float] = {}
    batches: dict[tuple, list[int]] = {}
    for key, (h, tap_method) in unique.items():
        if tap_method == "entropy":
            batches.setdefault((h.bins, h.device), []).append(key)
    for group in batches.values():
        counts, edges = Histogram.abs_histograms([unique[key][0] for key in group])
        opts = options if method == "entropy" else {}
        try:
            picks = entropy_amax_batch(counts, edges, **opts)
        except TypeError as exc:  # an option entropy does not take, said as compute_amax says it
            raise CalibrationError(f"bad options for method 'entropy': {exc}") from None
        raw.update(zip(group, picks))
        capped = [min(p, unique[key][0].max_abs()) for key, p in zip(group, picks)]
        clipped.update(zip(group, _clipped_fractions(counts, edges, capped)))
    return {key: _pick(h, tap_method, options if tap_method == method else {}, raw.get(key), clipped.get(key))
            for key, (h, tap_method) in unique.items()}


def _pick(h: Histogram, method: str, options: Mapping, raw: float | None = None,
          clipped: float | None = None) -> tuple[float, str, str]:
    """One histogram's ``(amax, method used, note)``: the strategy's pick (``raw`` when
    already computed, with the share it clips, ``clipped``), capped at the exact largest
    |x|, or the fallback when the pick is degenerate."""
    if raw is not None and clipped is not None and not (method in DEGENERATE_CHECKED and clipped > DEGENERATE_CLIP):
        return min(raw, h.max_abs()), method, ""
    counts, edges = h.abs_histogram()
    if raw is None:
        raw = float(compute_amax(method, counts, edges, **options))
    amax = min(raw, h.max_abs())
    clipped = _clipped_fractions(counts[None], edges[None], [amax])[0]
    if method in DEGENERATE_CHECKED and clipped > DEGENERATE_CLIP:
        note = (f"{method} picked {amax:.4g}, clipping {100 * clipped:.1f} % of the nonzero values "
                f"(a degenerate search on a narrow band): {DEGENERATE_FALLBACK} used instead")
        return min(float(compute_amax(DEGENERATE_FALLBACK, counts, edges)), h.max_abs()), DEGENERATE_FALLBACK, note
    return amax, method, ""


#: Strategies whose pick is checked for degeneracy, the largest share of the nonzero
#: values a pick may clip, and the strategy used instead.
DEGENERATE_CHECKED = ("entropy", "mse")
DEGENERATE_CLIP = 0.05
DEGENERATE_FALLBACK = "minmax"


def _clipped_fractions(counts: torch.Tensor, edges: torch.Tensor, amax: list[float]) -> list[float]:
    """For every row of ``counts`` (``T x N``) and ``edges`` (``T x (N + 1)``): the share of
    the values above the first bin (nonzero |x|) that lie above its ``amax`` (integer sums;
    0.0 when there are none)."""
    body = counts[:, 1:]
    nonzero = body.sum(1)
    limit = torch.tensor(amax, dtype=edges.dtype, device=edges.device)[:, None]
    above = torch.where(edges[:, 1:-1] >= limit, body, torch.zeros_like(body)).sum(1)
    return [float(a) / float(n) if n > 0 else 0.0 for a, n in zip(above.tolist(), nonzero.tolist())]


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), f"the number {v!r}")


def _number(path: Path, where: str, key: str, v: Any, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FileFormatError(path, f"{where}: \"{key}\" must be a number, got {_json_type(v)}")
    f = float(v)
    if not math.isfinite(f) or (positive and not f > 0):
        raise FileFormatError(path, f"{where}: \"{key}\" must be a finite number{' > 0' if positive else ''}, "
                                    f"got {v if abs(f) < 1e300 else 'a number out of range'}")
    return f


_INFO_FIELDS = {"module": str, "call": int, "kind": str, "module_type": str, "order": int, "derived": str}


def _tap_from_dict(path: Path, i: int, t: Any) -> tuple[str, TapRange, TapInfo | None]:
    """One ``"taps"`` entry of a saved table, every field checked."""
    if not isinstance(t, dict):
        raise FileFormatError(path, f"tap #{i} must be an object, got {_json_type(t)}")
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise FileFormatError(path, f"tap #{i}: \"name\" must be a non-empty string, got {_json_type(name)}")
    where = f"tap #{i} ({name!r})"
    if "amax" not in t:
        raise FileFormatError(path, f"{where}: no \"amax\"")
    amax = _number(path, where, "amax", t["amax"], positive=True)
    lo = _number(path, where, "min", t.get("min", 0.0))
    hi = _number(path, where, "max", t.get("max", 0.0))
    if "scale" in t:
        scale = _number(path, where, "scale", t["scale"], positive=True)
        if abs(scale - amax / 127.0) > 1e-9 * amax:
            raise FileFormatError(path, f"{where}: \"scale\" {scale!r} is not amax / 127 = {amax / 127.0!r}")
    method = t.get("method", "")
    note = t.get("note", "")
    for key, v in (("method", method), ("note", note)):
        if not isinstance(v, str):
            raise FileFormatError(path, f"{where}: \"{key}\" must be a string, got {_json_type(v)}")
    info = None
    if "info" in t:
        raw = t["info"]
        if not isinstance(raw, dict) or set(raw) - set(_INFO_FIELDS) or not {"module", "call", "kind", "module_type",
                                                                              "order"} <= set(raw):
            raise FileFormatError(path, f"{where}: \"info\" must be an object with {', '.join(_INFO_FIELDS)}")
        for k, typ in _INFO_FIELDS.items():
            if k in raw and (isinstance(raw[k], bool) or not isinstance(raw[k], typ)):
                raise FileFormatError(path, f"{where}: info \"{k}\" must be {typ.__name__}, got {_json_type(raw[k])}")
        info = TapInfo(name=name, **raw)
    return name, TapRange(name, amax, method, lo, hi, note), info


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "tap"


def _plot_histogram(plt, path: Path, name: str, counts, edges, amax: float, method: str) -> None:
    import io

    last = int(max((counts > 0).nonzero()[0].max(initial=0) + 1, 1))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    # One filled step path, not one bar patch per bin (2048 patches take seconds to draw).
    ax.stairs(counts[:last], edges[: last + 1], fill=True, color="#4878d0", linewidth=0)
    ax.set_yscale("log")
    ax.axvline(amax, color="#d62728", linestyle="--", label=f"amax {amax:.4g} ({method})")
    ax.set_xlabel("|x|")
    ax.set_ylabel("count")
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
