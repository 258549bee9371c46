"""Quantized conv / fc weights as the NVDLA compiler computes them, under NVDLA layer names.

A thin layer over :mod:`torch_nvdla.nvdla.weights` (the compiler's formulas: ``S_w = max|W| /
127`` per kernel or per filter, ``q = clamp(floor(W / S_w + 0.5), -128, 127)``, bias in
int32 at ``S_in * S_w``, optional BatchNorm folding). What this module adds is *which*
numbers go in: every conv / fc layer of an :class:`~torch_nvdla.nvdla.naming.NvdlaNames`, its
module's weight and bias, and ``S_in`` = the scale the compiler will use for the layer's
input -- the calib.json entry of the layer producing it, after the NVDLA rules (so a conv
after a pool uses the pool's entry, which equals the pool's producer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError
from ..utils.io import atomic_write_json
from .naming import LayerName, NvdlaNames

__all__ = ["export_quantized_weights"]


def _module(model: nn.Module, path: str, layer: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise CalibrationError(f"layer {layer!r}: the model has no module {path!r}") from None


def _bn_after(layers: dict[str, LayerName], consumers: dict[str, list[str]], conv: LayerName) -> LayerName | None:
    """The BatchNorm (Caffe ``BatchNorm`` + ``Scale``) applied right after ``conv``, if any."""
    for c in consumers.get(conv.name, []):
        bn = layers[c]
        if bn.kind == "bn" and bn.inputs == (conv.name,) and bn.module:
            return bn
        if bn.kind == "scale" and bn.inputs == (conv.name,) and bn.module:  # BN with no split tap
            return bn
    return None


def export_quantized_weights(model: nn.Module, table, names: NvdlaNames, out_dir: str | os.PathLike, *,
                             weights: str = "per-kernel", fold_batchnorm: bool = False, eltwise: str = "report",
                             stem: str = "weights") -> list[dict[str, Any]]:
    """Quantize every conv / fc layer the compiler's way and write ``.npz`` + JSON summary.

    Writes ``<out_dir>/<stem>.npz`` (per layer ``<layer>.weight_q`` int8,
    ``<layer>.weight_scale`` float32, ``<layer>.bias_q`` int32) and
    ``<out_dir>/<stem>.json`` (one object per layer: ``layer``, ``mode``, ``shape``,
    ``s_in``, ``scales``, ``max_abs_error``, ``has_bias``, plus ``module``, ``input`` --
    the NVDLA layer whose scale is ``s_in`` -- and ``folded_bn``), both atomically, via
    :func:`torch_nvdla.nvdla.weights.save_quantized_weights`.

    Args:
        model: the calibrated model.
        table: its calibration table.
        names: the NVDLA names (:meth:`NvdlaNames.for_model`); conv / fc layers need a
            ``module`` and an input.
        out_dir: output folder (created).
        weights: ``"per-kernel"`` (the compiler's default) or ``"per-filter"``.
        fold_batchnorm: fold a BatchNorm that follows a conv into its weights and bias first,
            as the compiler's fast-math profile does (``S_w`` is then taken after
            folding).
        eltwise: passed to the NVDLA rules (``"report"`` / ``"unify"``); use what the
            calib.json export used, so ``S_in`` matches the file.
        stem: file name stem.

    Returns:
        The summary list written.

    Raises:
        CalibrationError: a layer whose module or input scale is unknown (names it), or
            no conv / fc layer at all.
        ValueError: from :mod:`torch_nvdla.nvdla.weights` (non-finite weights ...), naming the
            layer.
    """
    from .calibjson import nvdla_ranges
    from .weights import fold_batchnorm, save_quantized_weights

    if not isinstance(names, NvdlaNames):
        raise CalibrationError(f"names must be NvdlaNames (e.g. NvdlaNames.for_model(model)), got {type(names).__name__}")
    ranges = nvdla_ranges(table, names, eltwise=eltwise, allow_missing=True)
    scales = ranges.scales()
    by_name = {layer.name: layer for layer in names.layers}
    consumers: dict[str, list[str]] = {}
    for layer in names.layers:
        for i in layer.inputs:
            consumers.setdefault(i, []).append(layer.name)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor | None, float]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for layer in names.layers:
        if layer.kind not in ("conv", "fc"):
            continue
        if not layer.module:
            raise CalibrationError(f"layer {layer.name!r}: no module path, cannot read its weights")
        module = _module(model, layer.module, layer.name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise CalibrationError(f"layer {layer.name!r}: module {layer.module!r} ({type(module).__name__}) has no weight")
        bias = getattr(module, "bias", None)
        if layer.inputs and layer.inputs[0] in scales:
            src = layer.inputs[0]
            s_in = scales[src]
        elif layer.tap and f"{layer.tap}:input" in table:
            src = f"{layer.tap}:input"
            s_in = float(table[src].amax) / 127.0
        else:
            raise CalibrationError(
                f"layer {layer.name!r}: its input scale is unknown (no known producer and no tap "
                f"{(layer.tap or layer.name) + ':input'!r}); calibrate with taps=names.selection"
            )
        w = weight.detach().float().cpu()
        b = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
        layout = None
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # Its weight is (in, out / groups, k...): the filters (output channels) are axis 1.
            if module.groups != 1:
                raise CalibrationError(f"layer {layer.name!r}: {type(module).__name__} with groups={module.groups}; "
                                       "the compiler's Deconvolution takes group 1 only")
            w = w.transpose(0, 1).contiguous()
            layout = "filters first (out, in, k...): transposed from the module's (in, out, k...)"
        folded = None
        if fold_batchnorm:
            bn_layer = _bn_after(by_name, consumers, layer)
            if bn_layer is not None:
                bn = _module(model, bn_layer.module, bn_layer.name)
                if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                    raise CalibrationError(f"layer {bn_layer.name!r}: module {bn_layer.module!r} is not a BatchNorm with running statistics")
                w, b = fold_batchnorm(
                    w, b, bn.running_mean.detach().cpu(), bn.running_var.detach().cpu(), float(bn.eps),
                    bn.weight.detach().cpu() if bn.weight is not None else None,
                    bn.bias.detach().cpu() if bn.bias is not None else None,
                )
                folded = bn_layer.module
        entries[layer.name] = (w, b, s_in)
        extra[layer.name] = {"module": layer.module, "input": src, "folded_bn": folded}
        if layout:
            extra[layer.name]["layout"] = layout
    if not entries:
        raise CalibrationError(f"no conv / fc layer among the {len(names)} NVDLA layers: nothing to quantize")
    out_dir = Path(out_dir)
    json_path = out_dir / f"{stem}.json"
    summary = save_quantized_weights(out_dir / f"{stem}.npz", json_path, entries, weights=weights)
    for item in summary:
        item.update(extra[item["layer"]])
    atomic_write_json(json_path, summary)
    return summary
