"""What the NVDLA compiler and hardware cannot run, read from a deploy prototxt.

Design notes: ``docs/nvdla.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_POOL_KERNEL", "TARGETS", "HardwareIssue", "hardware_issues"]

#: Targets the compiler accepts (``--configtarget``).
TARGETS = ("nv_full", "nv_large", "nv_small")
#: The pooling engine's largest kernel side; the compiler loops forever above it.
MAX_POOL_KERNEL = 8


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
    * Power and SoftmaxWithLoss: not deploy layers.
    """
    from ..caffe.prototxt import is_test_phase

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    issues: list[HardwareIssue] = []
    shapes = {k: tuple(v) for k, v in net.inputs.items()} if hasattr(net, "inputs") else {}

    def add(level: str, rule: str, layer, message: str) -> None:
        issues.append(HardwareIssue(level, rule, layer.name, layer.line, message))

    for layer in net.layers:
        if is_test_phase(layer):
            continue
        t, p = layer.type, layer.type_params
        if t in ("LRN", "Sigmoid", "TanH"):
            add("error", "no-int8", layer,
                f"{t} has no INT8 path in the open compiler"
                + (" (and nv_small has no LUT: 'Activation type not supported')" if target == "nv_small" else "")
                + "; run it outside the DLA or replace it")
        elif t == "Eltwise":
            op = str(p.get("operation", "SUM"))
            if op in ("PROD", "0"):
                add("error", "eltwise-prod", layer, "Eltwise PROD is mis-scaled in INT8 (the compiler rescales it "
                                                    "as a sum)")
            elif op in ("MAX", "2"):
                add("error", "eltwise-max", layer, "Eltwise MAX is not implemented in INT8")
            elif target == "nv_small":
                add("error", "eltwise-target", layer, "nv_small has no SDP element-wise unit (the compiler does not "
                                                      "check it): the loadable will not run")
            if len(layer.bottoms) > 2:
                add("error", "eltwise-inputs", layer, f"{len(layer.bottoms)} bottoms: the compiler uses only the "
                                                      "first two")
        elif t == "Pooling":
            kh, kw = _kernel(p)
            if str(p.get("global_pooling", "false")).lower() == "true":
                add("warning", "global-pool", layer, "global pooling: the kernel is the input plane; above "
                                                     f"{MAX_POOL_KERNEL}x{MAX_POOL_KERNEL} the compiler loops forever")
            elif max(kh, kw) > MAX_POOL_KERNEL:
                add("error", "pool-kernel", layer,
                    f"pooling kernel {kh}x{kw} is larger than the pooling engine's {MAX_POOL_KERNEL}: the compiler "
                    "loops forever (split it into pools of at most 8)")
        elif t == "Deconvolution":
            group = int(p.get("group", 1) or 1)
            if group != 1 or _pad(p):
                add("error", "deconv", layer, "Deconvolution needs group 1 and no padding in the compiler")
        elif t == "Convolution":
            group = int(p.get("group", 1) or 1)
            if group != 1:
                first = bool(set(layer.bottoms) & set(shapes))
                add("error" if first else "warning", "group-conv", layer,
                    f"group {group}: " + ("the image-input convolution cannot be grouped" if first else
                                          "grouped convolution is listed as not implemented in INT8; the compiler "
                                          "expands it to a dense kernel (group x the weights and MACs)"))
        elif t in ("Power", "SoftmaxWithLoss"):
            add("warning", "not-deploy", layer, f"{t} is parsed but is not an inference layer NVDLA accelerates")
    return issues
