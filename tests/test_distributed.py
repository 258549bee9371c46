"""Calibration across processes: two gloo ranks on loopback each see half the data.

Both ranks must end with the table a single process computes over all the data: the same
histograms bit for bit (so the same ranges, whatever the method), because ranges and counts
are reduced exactly (:mod:`torch_nvdla.calib.distributed`).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torch_nvdla import CalibrationError, calibrate

WORLD = 2
TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Small(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 5)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.bias.fill_(0.5)
            self.conv2.bias.fill_(-1.0)

    def forward(self, x):
        x = self.relu(self.bn(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    # Different scales per batch: each rank's local range differs from the global one.
    return [torch.randn(6, 3, 8, 8, generator=g) * s for s in (0.5, 1.0, 3.0, 0.25, 8.0, 1.5)]


def _summary(table) -> dict:
    return {
        "amax": table.amaxes(),
        "hist": {n: h.state_dict() for n, h in table.histograms.items()},
        "order": list(table),
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD)
        try:
            mine = _batches()[rank::WORLD]
            table = calibrate(Small(), mine, progress=False)
            result["entropy"] = _summary(table)
            result["minmax"] = _summary(calibrate(Small(), mine, "minmax", progress=False))
            result["percentile"] = _summary(table.with_method("percentile", percentile=99.0))
            # Ranks that observe different taps must fail together, naming the problem.
            try:
                calibrate(Small() if rank == 0 else _Extra(), mine, progress=False)
                result["mismatch"] = None
            except CalibrationError as e:
                result["mismatch"] = str(e)
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent through the file
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out) / f"rank{rank}.pt")


class _Extra(Small):
    """Small with one more leaf module: one more tap."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Identity()

    def forward(self, x):
        return self.extra(super().forward(x))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path) -> list[dict]:
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed calibration did not finish within {TIMEOUT_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_ranks(tmp_path_factory.mktemp("dist"))


def _bin_width(state: dict) -> float:
    return state["range"] / state["bins"]


@pytest.mark.parametrize("method", ["entropy", "minmax", "percentile"])
def test_every_rank_gets_the_single_process_table(ranks, method):
    full = calibrate(Small(), _batches(), "minmax" if method == "minmax" else "entropy", progress=False)
    if method == "percentile":
        full = full.with_method("percentile", percentile=99.0)
    for rank, res in enumerate(ranks):
        got = res[method]
        assert got["order"] == list(full), rank
        for name, h in full.histograms.items():
            state = got["hist"][name]
            assert state["range"] == float(h.range), (rank, name)
            assert torch.equal(state["counts"], h.counts), (rank, name)
            assert state["numel"] == h.numel
            assert state["min"] == float(h.min) and state["max"] == float(h.max)
            assert state["finite"] is True
            amax, ref = got["amax"][name], full[name].amax
            if method == "entropy":
                assert abs(amax - ref) <= _bin_width(state), (rank, name, amax, ref)
            else:
                assert amax == ref, (rank, name, amax, ref)


def test_ranks_agree_with_each_other(ranks):
    for method in ("entropy", "minmax", "percentile"):
        assert ranks[0][method]["amax"] == ranks[1][method]["amax"]


def test_ranks_with_different_taps_fail_together(ranks):
    for rank, res in enumerate(ranks):
        assert res["mismatch"] is not None, rank
        assert "different taps" in res["mismatch"] and f"rank {rank}" in res["mismatch"]


def test_without_a_process_group_reduction_is_the_identity():
    from torch_nvdla.calib.distributed import reduce_histograms
    from torch_nvdla.calib.histogram import Histogram

    assert not dist.is_initialized()
    hs = {"a": Histogram.of(torch.randn(10))}
    out = reduce_histograms(hs)
    assert out["a"] is hs["a"]
