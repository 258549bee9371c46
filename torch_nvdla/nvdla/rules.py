"""What the NVDLA compiler and hardware cannot run, read from a deploy prototxt.

Design notes: ``docs/nvdla.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CBUF", "MAX_POOL_KERNEL", "TARGETS", "ConvBuffer", "HardwareIssue", "conv_buffer_banks",
           "hardware_issues"]

#: Targets the compiler accepts (``--configtarget``).
TARGETS = ("nv_full", "nv_large", "nv_small")
#: The pooling engine's largest kernel side; the compiler loops forever above it.
MAX_POOL_KERNEL = 8


@dataclass(frozen=True)
class ConvBuffer:
    """A target's convolution buffer (CBUF) as the compiler sizes it (``TargetConfig.cpp``).

    Attributes:
        banks: banks the compiler may use.
        entries_per_bank: entries of one bank.
        entry_width: bytes of one entry.
        memory_atomic: bytes of one memory atom (channels of an atom in INT8).
        atomic_k: output channels of one kernel group.
        profile_banks: banks the default profile allots to data, and to weights, when a
            layer must be split.
    """

    banks: int
    entries_per_bank: int
    entry_width: int
    memory_atomic: int
    atomic_k: int
    profile_banks: int = 8


#: The targets' convolution buffers.
CBUF = {
    "nv_full": ConvBuffer(banks=16, entries_per_bank=256, entry_width=128, memory_atomic=32, atomic_k=32),
    "nv_large": ConvBuffer(banks=16, entries_per_bank=512, entry_width=64, memory_atomic=32, atomic_k=32),
    "nv_small": ConvBuffer(banks=32, entries_per_bank=512, entry_width=8, memory_atomic=8, atomic_k=8),
}


def conv_buffer_banks(data: tuple[int, int, int], kernel: tuple[int, int, int, int],
                      target: str = "nv_full") -> tuple[int, int, int]:
    """Banks an INT8 direct convolution (or fully-connected layer) needs in CBUF.

    The compiler's formulas (``ConvCoreNode::calculateEPS`` and ``calculateTotalBanksFor*``),
    with one byte per element: the input ``(C, H, W)`` takes ``ceil(eps * H / entries)``
    banks, ``eps`` being the entries of one row (``C`` in memory atoms of
    ``memory_atomic`` bytes, ``entry_width / memory_atomic`` atoms to an entry); the
    weights ``(K, C, R, S)`` take ``ceil(align(K C R S, entry_width) / entry_width / entries)``
    banks, one kernel group the same with ``K = atomic_k``.

    Returns:
        ``(data_banks, weight_banks, kernel_group_banks)``.
    """
    cb = CBUF[target]
    c, h, w = data
    k, kc, r, s = kernel
    per_entry = cb.entry_width // cb.memory_atomic
    atoms = math.ceil(c / cb.memory_atomic)
    last = atoms % per_entry
    eps = (atoms // per_entry) * w + (w if last == 3 else math.ceil(last * w / per_entry))
    bank_bytes = cb.entry_width * cb.entries_per_bank

    def banks(nbytes: int) -> int:
        return math.ceil(math.ceil(nbytes / cb.entry_width) * cb.entry_width / bank_bytes)

    return math.ceil(eps * h / cb.entries_per_bank), banks(k * kc * r * s), banks(cb.atomic_k * kc * r * s)


def _weights_do_not_fit(data_banks: int, weight_banks: int, group_banks: int, cb: ConvBuffer) -> bool:
    """``ConvCoreNode::splitNodesInternal``'s "Not enough banks to hold weight data. No
    software split supported": the input fits the profile's data banks but neither all the
    weights nor one or two kernel groups fit beside it, and one kernel group alone fills
    the profile's weight banks."""
    if data_banks >= cb.profile_banks:
        return False  # the compiler splits the input instead
    fits = min(weight_banks, group_banks) + data_banks <= cb.banks
    return not fits and group_banks >= cb.profile_banks


@dataclass(frozen=True)
class HardwareIssue:
    """One layer the compiler fails on, hangs on or mis-scales.

    Attributes:
        level: ``"error"`` (the compiler fails, hangs, or the INT8 result is wrong) or
            ``"warning"``.
        rule: a short rule id.
        layer: the layer.
        line: its line in the prototxt.
        message: what happens and what to do.
    """

    level: str
    rule: str
    layer: str
    line: int | None
    message: str


def _ints(msg, name: str) -> list[int]:
    return [int(v) for v in msg.get_all(name)] if msg is not None else []


def _kernel(p) -> tuple[int, int]:
    k = _ints(p, "kernel_size")
    kh = int(p.get("kernel_h", k[0] if k else 0) or 0)
    kw = int(p.get("kernel_w", k[-1] if k else 0) or 0)
    return kh, kw


def _pad(p) -> int:
    pads = _ints(p, "pad") + [int(p.get("pad_h", 0) or 0), int(p.get("pad_w", 0) or 0)]
    return max(pads, default=0)


def _cbuf_problem(layer, shape: tuple[int, ...], target: str) -> str | None:
    """Why ``layer``'s weights cannot be placed in CBUF, or None."""
    p = layer.type_params
    _, c, h, w = shape
    k = int(p.get("num_output", 0) or 0)
    if k < 1:
        return None
    kernel = (k, c, *_kernel(p)) if layer.type == "Convolution" else (k, c, h, w)
    if min(kernel) < 1:
        return None
    cb = CBUF[target]
    data, weights, group = conv_buffer_banks((c, h, w), kernel, target)
    if not _weights_do_not_fit(data, weights, group, cb):
        return None
    return (f"the INT8 weights {kernel[0]}x{kernel[1]}x{kernel[2]}x{kernel[3]} need {weights} banks of {target}'s "
            f"convolution buffer ({group} for one group of {cb.atomic_k} kernels) beside {data} for the input, of "
            f"{cb.banks}: the compiler fails ('Not enough banks to hold weight data'). Reduce the layer (e.g. pool "
            "before it, or split its input channels into several layers and sum them)")


def hardware_issues(net, target: str = "nv_full") -> list[HardwareIssue]:
    """Every layer of ``net`` (a parsed prototxt) that the compiler cannot run in INT8 on
    ``target``, from the open compiler's parser and engine (``TOOLCHAIN_FACTS.md``):

    * LRN, Sigmoid, TanH: no usable INT8 path (and no LUT at all on ``nv_small``);
    * Eltwise PROD (mis-scaled) and MAX (not implemented in INT8); SUM only, on
      ``nv_small`` not in hardware at all;
    * pooling kernels above :data:`MAX_POOL_KERNEL` (the compiler loops forever), global
      pooling over a larger plane likewise;
    * Deconvolution with groups or padding; grouped convolution (listed as not
      implemented in INT8; the first layer cannot be grouped at all);
    * Power and SoftmaxWithLoss: not deploy layers;
    * a convolution or fully-connected layer whose INT8 weights do not fit the target's
      convolution buffer beside its input (:func:`conv_buffer_banks`; the compiler has no
      software split for it), when the net's input shapes are declared.
    """
    from ..caffe.prototxt import is_test_phase
    from ..caffe.shapes import blob_shapes

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    inputs = set(net.inputs) if hasattr(net, "inputs") else set()
    blobs = blob_shapes(net) if hasattr(net, "inputs") else {}
    issues: list[HardwareIssue] = []
    for layer in net.layers:
        if is_test_phase(layer):
            continue
        found: list[tuple[str, str, str]] = []
        rule = _TYPE_RULES.get(layer.type)
        if rule is not None:
            found.extend(rule(layer, target, inputs))
        bottom = blobs.get(layer.bottoms[0], ()) if layer.bottoms else ()
        if layer.type in ("Convolution", "InnerProduct") and len(bottom) in (2, 4):
            problem = _cbuf_problem(layer, (*bottom, 1, 1)[:4], target)
            if problem:
                found.append(("error", "cbuf-weights", problem))
        issues.extend(HardwareIssue(level, rid, layer.name, layer.line, message) for level, rid, message in found)
    return issues


def _lut_activation(layer, target: str, inputs) -> list[tuple[str, str, str]]:
    return [("error", "no-int8", f"{layer.type} has no INT8 path in the open compiler"
             + (" (and nv_small has no LUT: 'Activation type not supported')" if target == "nv_small" else "")
             + "; run it outside the DLA or replace it")]


def _eltwise(layer, target: str, inputs) -> list[tuple[str, str, str]]:
    op = str(layer.type_params.get("operation", "SUM"))
    out = []
    if op in ("PROD", "0"):
        out.append(("error", "eltwise-prod", "Eltwise PROD is mis-scaled in INT8 (the compiler rescales it as a sum)"))
    elif op in ("MAX", "2"):
        out.append(("error", "eltwise-max", "Eltwise MAX is not implemented in INT8"))
    elif target == "nv_small":
        out.append(("error", "eltwise-target", "nv_small has no SDP element-wise unit (the compiler does not check "
                                               "it): the loadable will not run"))
    if len(layer.bottoms) > 2:
        out.append(("error", "eltwise-inputs", f"{len(layer.bottoms)} bottoms: the compiler uses only the first two"))
    return out


def _pooling(layer, target: str, inputs) -> list[tuple[str, str, str]]:
    p = layer.type_params
    kh, kw = _kernel(p)
    if str(p.get("global_pooling", "false")).lower() == "true":
        return [("warning", "global-pool", "global pooling: the kernel is the input plane; above "
                                           f"{MAX_POOL_KERNEL}x{MAX_POOL_KERNEL} the compiler loops forever")]
    if max(kh, kw) > MAX_POOL_KERNEL:
        return [("error", "pool-kernel", f"pooling kernel {kh}x{kw} is larger than the pooling engine's "
                                         f"{MAX_POOL_KERNEL}: the compiler loops forever (split it into pools of at "
                                         "most 8)")]
    return []


def _deconvolution(layer, target: str, inputs) -> list[tuple[str, str, str]]:
    group = int(layer.type_params.get("group", 1) or 1)
    if group != 1 or _pad(layer.type_params):
        return [("error", "deconv", "Deconvolution needs group 1 and no padding in the compiler")]
    return []


def _convolution(layer, target: str, inputs) -> list[tuple[str, str, str]]:
    group = int(layer.type_params.get("group", 1) or 1)
    if group == 1:
        return []
    if set(layer.bottoms) & inputs:
        return [("error", "group-conv", f"group {group}: the image-input convolution cannot be grouped")]
    return [("warning", "group-conv", f"group {group}: grouped convolution is listed as not implemented in INT8; the "
                                      "compiler expands it to a dense kernel (group x the weights and MACs)")]


def _not_deploy(layer, target: str, inputs) -> list[tuple[str, str, str]]:
    return [("warning", "not-deploy", f"{layer.type} is parsed but is not an inference layer NVDLA accelerates")]


#: Caffe layer type -> its rule: ``(layer, target, input blobs) -> [(level, rule, message)]``.
_TYPE_RULES = {"LRN": _lut_activation, "Sigmoid": _lut_activation, "TanH": _lut_activation, "Eltwise": _eltwise,
               "Pooling": _pooling, "Deconvolution": _deconvolution, "Convolution": _convolution,
               "Power": _not_deploy, "SoftmaxWithLoss": _not_deploy}
