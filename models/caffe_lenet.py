"""BVLC Caffe LeNet for MNIST, with module names that mirror ``lenet.prototxt``.

The network (the one TensorRT's sampleINT8 calibrates)::

    data (N,1,28,28) -> conv1 (20, k5) -> pool1 (max 2/2) -> conv2 (50, k5)
    -> pool2 (max 2/2) -> ip1 (500) -> relu1 -> ip2 (10) -> prob (softmax)

Input is ``pixel / 256`` (see :func:`torch_nvdla.zoo.data.preprocess_mnist_caffe`).
Caffe's InnerProduct flattens its NCHW bottom blob in C order, which is exactly
``torch.flatten(x, 1)``, so the Caffe ``ip1`` weights load unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_nvdla.errors import FileFormatError

__all__ = ["CAFFE_LENET_SHAPES", "CaffeLeNet", "load_caffe_lenet"]

CAFFE_LENET_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (20, 1, 5, 5),
    "conv1.bias": (20,),
    "conv2.weight": (50, 20, 5, 5),
    "conv2.bias": (50,),
    "ip1.weight": (500, 800),
    "ip1.bias": (500,),
    "ip2.weight": (10, 500),
    "ip2.bias": (10,),
}
"""Blob name -> shape of every parameter in ``lenet_iter_10000.npz``."""


class CaffeLeNet(nn.Module):
    """Caffe LeNet; ``forward`` returns the softmax probabilities (the ``prob`` blob).

    Submodules, in order: ``conv1``, ``pool1``, ``conv2``, ``pool2``, ``ip1``,
    ``relu1``, ``ip2``, ``prob``, named after the prototxt layers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, stride=1)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, stride=1)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.ip1 = nn.Linear(800, 500)
        self.relu1 = nn.ReLU()
        self.ip2 = nn.Linear(500, 10)
        self.prob = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map N x 1 x 28 x 28 inputs (``pixel / 256``) to N x 10 class probabilities."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = torch.flatten(x, 1)
        x = self.relu1(self.ip1(x))
        return self.prob(self.ip2(x))


def load_caffe_lenet(npz_path: str | os.PathLike | None = None) -> CaffeLeNet:
    """Build :class:`CaffeLeNet` from the Caffe blobs saved as numpy arrays.

    Args:
        npz_path: ``lenet_iter_10000.npz`` (keys ``conv1.weight`` ... ``ip2.bias``);
            ``None`` looks for ``caffe-lenet-mnist/lenet_iter_10000.npz`` in the
            shared data folder (:func:`torch_nvdla.utils.paths.data_root`).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: no file (the message names ``$TORCH_NVDLA_DATA``).
        FileFormatError: a blob is missing, extra, or has the wrong shape.
    """
    if npz_path is None:
        from torch_nvdla.zoo.data import resolve_data_dir

        npz_path = resolve_data_dir(None, "caffe-lenet-mnist", "lenet_iter_10000.npz")
        npz_path = npz_path / "lenet_iter_10000.npz"
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Caffe LeNet weights not found")
    try:
        with np.load(path, allow_pickle=False) as blobs:
            arrays = {name: np.asarray(blobs[name]) for name in blobs.files}
    except (OSError, ValueError, EOFError) as exc:
        raise FileFormatError(path, f"not a readable .npz archive ({exc})") from exc
    missing = sorted(set(CAFFE_LENET_SHAPES) - set(arrays))
    extra = sorted(set(arrays) - set(CAFFE_LENET_SHAPES))
    if missing or extra:
        raise FileFormatError(
            path, f"blob names differ from Caffe LeNet: missing {missing}, unexpected {extra}"
        )
    state = {}
    for name, shape in CAFFE_LENET_SHAPES.items():
        array = arrays[name]
        if tuple(array.shape) != shape:
            raise FileFormatError(
                path, f"blob {name} has shape {tuple(array.shape)}, expected {shape}"
            )
        if not np.isfinite(array).all():
            raise FileFormatError(path, f"blob {name} holds NaN or Inf")
        state[name] = torch.from_numpy(array.astype(np.float32))
    model = CaffeLeNet()
    model.load_state_dict(state)
    return model.eval()
