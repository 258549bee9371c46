"""Shared fixtures: the real-data folder (skips when absent) and the devices to run on."""

from __future__ import annotations

import pytest
import torch

from torch_nvdla.utils.paths import data_root

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def shared_data():
    """The ``../shared/data`` folder (or ``$TORCH_NVDLA_DATA``); skips the test when absent."""
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set TORCH_NVDLA_DATA to ../shared/data")
    return root


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test body once on the CPU and once on CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (small tensors: thread hand-offs cost more
    than they save), restoring the previous thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true", default=False,
                     help="also run the tests marked heavy (torchvision models through every step; minutes)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--heavy"):
        return
    skip = pytest.mark.skip(reason="heavy: run with --heavy (or scripts/coverage_matrix.py)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
