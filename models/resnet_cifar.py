"""He et al. (2015) CIFAR-10 ResNets (20/32/44/56 layers) with "option A" shortcuts.

Every operation is a module so that forward hooks see every tensor: each
:class:`BasicBlock` is ``conv1 -> bn1 -> relu1 -> conv2 -> bn2 -> add(., shortcut(x))
-> relu2``, where ``shortcut`` is :class:`torch.nn.Identity` or, where the block
halves the resolution and widens the channels, a parameter-free :class:`PadShortcut`
(stride-2 subsampling plus zero channels, the paper's option A). The network is
``conv1 -> bn1 -> relu -> layer1 (16 ch) -> layer2 (32) -> layer3 (64) -> avgpool
-> flatten -> linear``, with ``n = (depth - 2) / 6`` blocks per stage.

Parameter names match the public checkpoints ``resnet{20,32,44,56}-*.th``
(``{'best_prec1', 'state_dict'}`` with ``module.``-prefixed keys). Input is
``RGB / 255`` normalised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
0.225) (see :func:`torch_nvdla.zoo.data.preprocess_cifar10`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torch_nvdla.errors import CalibrationError, FileFormatError

__all__ = [
    "RESNET_CIFAR_DEPTHS",
    "BasicBlock",
    "PadShortcut",
    "ResidualAdd",
    "ResNetCifar",
    "load_resnet_cifar",
    "resnet_cifar_checkpoint",
]

RESNET_CIFAR_DEPTHS = (20, 32, 44, 56)
"""Depths with a checkpoint in the shared data folder's ``resnet-cifar10/``."""


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel, zero-pad the new channels.

    Args:
        in_planes: input channels.
        out_planes: output channels (at least ``in_planes``); the extra channels are
            zeros split evenly before and after the input's (the extra count is
            even for every CIFAR ResNet).
        stride: spatial subsampling step.
    """

    #: How torch_nvdla's Caffe export writes it (a fixed 1x1 strided convolution).
    nvdla_export = "pad-shortcut"

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2) -> None:
        super().__init__()
        if out_planes < in_planes or stride < 1:
            raise CalibrationError(
                f"PadShortcut needs out_planes >= in_planes and stride >= 1, got "
                f"{in_planes} -> {out_planes}, stride {stride}"
            )
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample H and W by ``stride`` and zero-pad the channel dimension."""
        extra = self.out_planes - self.in_planes
        before = extra // 2
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, before, extra - before))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class ResidualAdd(nn.Module):
    """Element-wise sum of the residual branch and the shortcut, as a module."""

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """Return ``residual + shortcut``."""
        return residual + shortcut


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a residual connection.

    Submodules: ``conv1``, ``bn1``, ``relu1``, ``conv2``, ``bn2``, ``shortcut``,
    ``add``, ``relu2``.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of ``conv1`` (2 at the first block of layer2 and layer3).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.add = ResidualAdd()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``; ``forward`` returns logits (N x num_classes).

    Args:
        depth: total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: outputs of ``linear``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise CalibrationError(
                f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56), got {depth!r}"
            )
        blocks = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self._in_planes = 16
        self.layer1 = self._make_layer(16, blocks, stride=1)
        self.layer2 = self._make_layer(32, blocks, stride=2)
        self.layer3 = self._make_layer(64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self._in_planes, planes, block_stride))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map N x 3 x 32 x 32 normalised images to N x num_classes logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def resnet_cifar_checkpoint(depth: int, root: str | os.PathLike | None = None) -> Path:
    """Find ``resnet{depth}-*.th`` in the shared data folder's ``resnet-cifar10/``.

    Args:
        depth: one of :data:`RESNET_CIFAR_DEPTHS`.
        root: the shared data folder, the ``resnet-cifar10/`` folder, or ``None``
            for :func:`torch_nvdla.utils.paths.data_root`.

    Raises:
        CalibrationError: no checkpoint for that depth.
        FileNotFoundError: the data folder is absent (the message names
            ``$TORCH_NVDLA_DATA``).
    """
    from torch_nvdla.utils.paths import DATA_ENV, data_root

    base = Path(root) if root is not None else data_root()
    if base is None:
        raise FileNotFoundError(
            f"the real data folder (holding resnet-cifar10/) was not found; set ${DATA_ENV} "
            "to the shared data folder (../shared/data)"
        )
    folder = base / "resnet-cifar10" if (base / "resnet-cifar10").is_dir() else base
    found = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not found:
        if depth not in RESNET_CIFAR_DEPTHS:
            raise CalibrationError(
                f"no CIFAR ResNet checkpoint for depth {depth!r}; known depths: "
                + ", ".join(map(str, RESNET_CIFAR_DEPTHS))
            )
        raise FileNotFoundError(f"{folder}/resnet{depth}-*.th not found; set ${DATA_ENV}")
    return found[0]


def load_resnet_cifar(depth: int = 20, path: str | os.PathLike | None = None) -> ResNetCifar:
    """Build a :class:`ResNetCifar` and load a checkpoint into it.

    Args:
        depth: network depth (20, 32, 44 or 56 for the shared checkpoints).
        path: a ``.th`` checkpoint (``{'state_dict': ...}`` with optional ``module.``
            key prefix, or a bare state dict); ``None`` finds
            ``resnet-cifar10/resnet{depth}-*.th`` in the shared data folder.

    Returns:
        The model in eval mode.

    Raises:
        FileFormatError: the checkpoint is unreadable or its keys/shapes do not fit.
        CalibrationError: a bad depth.
    """
    model = ResNetCifar(depth)
    path = Path(path) if path is not None else resnet_cifar_checkpoint(depth)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR ResNet checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        raise FileFormatError(path, f"cannot load torch checkpoint ({exc})") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FileFormatError(path, "expected a state dict or {'state_dict': state dict}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(path, f"does not fit a depth-{depth} CIFAR ResNet: {exc}") from exc
    return model.eval()
