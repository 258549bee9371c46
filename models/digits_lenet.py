"""A small LeNet-style CNN for scikit-learn's 8x8 digits, with committed weights.

``conv1 (1->8, 3x3, pad 1) -> relu1 -> pool1 (max 2) -> conv2 (8->16, 3x3, pad 1)
-> relu2 -> pool2 (max 2) -> flatten -> fc1 (64->32) -> relu3 -> fc2 (32->10)``.
Input is ``value / 16`` (see :func:`torch_nvdla.zoo.data.preprocess_digits`), N x 1 x 8 x 8;
output is logits. ``digits_lenet.pt`` beside this file is a plain state dict
trained by ``scripts/train_digits.py`` on the train part of the fixed digits split.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from torch_nvdla.errors import FileFormatError

__all__ = ["DIGITS_LENET_WEIGHTS", "DigitsLeNet", "load_digits_lenet"]

DIGITS_LENET_WEIGHTS = Path(__file__).resolve().parent / "digits_lenet.pt"
"""The committed trained weights."""


class DigitsLeNet(nn.Module):
    """LeNet-style CNN for 8x8 digits; every op is a named module."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(64, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map N x 1 x 8 x 8 inputs (``value / 16``) to N x 10 logits."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(x)


def load_digits_lenet(path: str | os.PathLike | None = None) -> DigitsLeNet:
    """Build :class:`DigitsLeNet` with trained weights.

    Args:
        path: a state-dict file; ``None`` uses the committed
            :data:`DIGITS_LENET_WEIGHTS`.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: the file is absent (run ``scripts/train_digits.py``).
        FileFormatError: the file is not a state dict that fits the model.
    """
    path = Path(path) if path is not None else DIGITS_LENET_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: digits LeNet weights not found; run scripts/train_digits.py"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        raise FileFormatError(path, f"cannot load torch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FileFormatError(path, "expected a plain state dict (name -> tensor)")
    model = DigitsLeNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(path, f"does not fit DigitsLeNet: {exc}") from exc
    return model.eval()
