"""Histograms from many processes: when ``torch.distributed`` is initialized, every rank
ends with the histograms of all the data.

Because histograms live on power-of-two ranges (:mod:`torch_nvdla.calib.histogram`), the
reduction is exact: all-reduce MAX of the ranges, re-bin each rank's counts to the common
range, all-reduce SUM of the counts (int64), MIN/MAX of the extremes. Three collectives
in all, whatever the number of taps.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
import torch.distributed as dist

from ..errors import CalibrationError
from .histogram import Histogram

__all__ = ["reduce_histograms"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_histograms(histograms: Mapping[str, Histogram]) -> dict[str, Histogram]:
    """All-reduce per-tap histograms across ranks (identity without a process group).

    Raises:
        CalibrationError: when ranks observed different sets of taps.
    """
    histograms = dict(histograms)
    if not _active():
        return histograms
    names = list(histograms)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    digest = hashlib.sha256("\n".join(names).encode()).digest()[:8]
    tag = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    tags = [torch.zeros_like(tag) for _ in range(dist.get_world_size())]
    dist.all_gather(tags, tag)
    if any(int(t) != int(tag) for t in tags):
        raise CalibrationError(
            f"rank {dist.get_rank()}: ranks observed different taps ({len(names)} here); "
            "every rank must run the same model on batches of the same kind"
        )
    hs = [histograms[n].to(device) for n in names]
    ranges = torch.stack([h.range for h in hs])
    dist.all_reduce(ranges, op=dist.ReduceOp.MAX)
    # Counts re-binned to the common range, with numel as one more column: one SUM.
    numel = torch.tensor([[h.numel] for h in hs], dtype=torch.int64, device=device)
    counts = torch.cat([torch.stack([h.rebinned(r) for h, r in zip(hs, ranges)]), numel], dim=1)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    # min, -max and -(not finite) in one MIN.
    ext = torch.stack([torch.stack([h.min, -h.max, -(~h.finite).to(torch.float64)]) for h in hs])
    dist.all_reduce(ext, op=dist.ReduceOp.MIN)
    out = {}
    for i, n in enumerate(names):
        out[n] = Histogram(
            counts=counts[i, :-1].clone(), range=ranges[i].clone(), min=ext[i, 0].clone(), max=-ext[i, 1],
            finite=ext[i, 2] == 0, numel=int(counts[i, -1]),
        )
    return out
