"""Real data sets for calibration and evaluation: MNIST, CIFAR-10 (JPEG) and sklearn digits.

Design notes and the facts behind them: ``docs/zoo.md``.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from ..errors import CalibrationError, FileFormatError
from ..utils.paths import DATA_ENV, data_root

__all__ = [
    "CIFAR10_CALIB_PER_CLASS",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_CALIB_SIZE",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TRAIN_SIZE",
    "IDX_MAGIC_IMAGES",
    "IDX_MAGIC_LABELS",
    "MNIST_CALIB_SIZE",
    "SplitIndices",
    "batches",
    "cifar10_split_indices",
    "digits_split_indices",
    "load_cifar10_test",
    "load_digits",
    "load_mnist_test",
    "mnist_split_indices",
    "preprocess_cifar10",
    "preprocess_digits",
    "preprocess_mnist_caffe",
    "read_idx",
    "resolve_data_dir",
]

IDX_MAGIC_IMAGES = 0x00000803
"""IDX magic of an unsigned-byte array with 3 dimensions (MNIST images)."""
IDX_MAGIC_LABELS = 0x00000801
"""IDX magic of an unsigned-byte array with 1 dimension (MNIST labels)."""

MNIST_CALIB_SIZE = 500
"""MNIST test images ``0..MNIST_CALIB_SIZE-1`` calibrate; the rest evaluate."""

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""The CIFAR-10 class names in label order (sorted folder order)."""
CIFAR10_CALIB_PER_CLASS = 50
"""The first this-many files (by name) of each CIFAR-10 class calibrate."""
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)

DIGITS_SPLIT_SEED = 20240607
"""Seed of the fixed ``numpy.random.RandomState`` permutation that splits digits."""
DIGITS_TRAIN_SIZE = 1200
DIGITS_CALIB_SIZE = 200

_MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
_MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
_CIFAR10_TAR = "test-jpg-q75.tar"
_CIFAR10_SIZE = 32
_IDX_DTYPE_UBYTE = 0x08


class SplitIndices(NamedTuple):
    """Disjoint index sets into one data set (``int64`` tensors, ascending)."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    train: torch.Tensor


# --------------------------------------------------------------------------- paths


def resolve_data_dir(root: str | os.PathLike | None, subdir: str, marker: str) -> Path:
    """Find the folder holding one data set.

    Args:
        root: the shared data folder (holding ``subdir``), the data set's folder
            itself, or ``None`` for :func:`torch_nvdla.utils.paths.data_root`.
        subdir: the data set's folder name inside the shared data folder.
        marker: a file that must exist in the data set's folder.

    Returns:
        The folder that holds ``marker``.

    Raises:
        FileNotFoundError: no such folder; the message says to set ``$TORCH_NVDLA_DATA``.
    """
    if root is None:
        found = data_root()
        if found is None:
            raise FileNotFoundError(
                f"the real data folder (holding {subdir}/{marker}) was not found; "
                f"set ${DATA_ENV} to the shared data folder (../shared/data)"
            )
        root = found
    root = Path(root)
    for candidate in (root / subdir, root):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(
        f"{root / subdir / marker} not found; set ${DATA_ENV} to the shared data folder "
        f"(../shared/data) holding {subdir}/"
    )


# --------------------------------------------------------------------------- IDX / MNIST


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a file, un-gzipping it when it starts with the gzip magic."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise FileFormatError(path, f"corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or plain) holding unsigned bytes.

    The format: a big-endian 32-bit magic ``0x000008DD`` (two zero bytes, type code
    ``0x08`` = unsigned byte, ``DD`` = number of dimensions), then one big-endian
    32-bit size per dimension, then the data in C order.

    Args:
        path: the file.
        expected_magic: e.g. :data:`IDX_MAGIC_IMAGES` (``0x803``) or
            :data:`IDX_MAGIC_LABELS` (``0x801``); ``None`` accepts any unsigned-byte IDX.

    Returns:
        A read-only ``uint8`` array of the declared shape.

    Raises:
        FileFormatError: bad magic, a truncated header or body, or trailing bytes.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise FileFormatError(path, f"truncated IDX header: {len(data)} bytes, need at least 4")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise FileFormatError(
            path, f"bad IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_DTYPE_UBYTE or data[3] == 0:
        raise FileFormatError(
            path, f"bad IDX magic 0x{magic:08x}: expected 0x000008NN (unsigned bytes, NN dims)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FileFormatError(
            path, f"truncated IDX header: {len(data)} bytes, need {header} for {ndim} dimensions"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape, dtype=np.int64))
    body = len(data) - header
    if body < count:
        raise FileFormatError(
            path, f"truncated IDX data: shape {shape} needs {count} bytes, found {body}"
        )
    if body > count:
        raise FileFormatError(
            path, f"{body - count} unexpected trailing bytes after IDX data of shape {shape}"
        )
    array = np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(shape)
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=4)
def _mnist_cached(folder: str) -> tuple[np.ndarray, np.ndarray]:
    folder_path = Path(folder)
    images_path = folder_path / _MNIST_IMAGES
    labels_path = folder_path / _MNIST_LABELS
    images = read_idx(images_path, IDX_MAGIC_IMAGES)
    labels = read_idx(labels_path, IDX_MAGIC_LABELS)
    if images.shape[1:] != (28, 28):
        raise FileFormatError(images_path, f"MNIST images must be N x 28 x 28, got {images.shape}")
    if labels.shape[0] != images.shape[0]:
        raise FileFormatError(
            labels_path, f"{labels.shape[0]} labels for {images.shape[0]} images"
        )
    if labels.size and int(labels.max()) > 9:
        raise FileFormatError(labels_path, f"label {int(labels.max())} out of range 0..9")
    return images, labels


def load_mnist_test(root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the MNIST test split (``t10k-*-idx*-ubyte.gz``).

    Args:
        root: the shared data folder (holding ``mnist/``), the ``mnist/`` folder
            itself, or ``None`` for :func:`torch_nvdla.utils.paths.data_root`.

    Returns:
        ``(images, labels)``: ``uint8`` N x 28 x 28 raw pixels and ``int64`` N labels.
        Fresh tensors (the decoded files are cached in-process).

    Raises:
        FileNotFoundError: the files are absent.
        FileFormatError: a file is malformed.
    """
    folder = resolve_data_dir(root, "mnist", _MNIST_IMAGES)
    images, labels = _mnist_cached(str(folder.resolve()))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def mnist_split_indices(n: int = 10000) -> SplitIndices:
    """MNIST split: images ``0..499`` calibrate, the other ``n - 500`` evaluate.

    Args:
        n: number of images (10000 for the test split).
    """
    if n <= MNIST_CALIB_SIZE:
        raise CalibrationError(f"MNIST split needs more than {MNIST_CALIB_SIZE} images, got {n}")
    return SplitIndices(
        calibration=torch.arange(MNIST_CALIB_SIZE),
        evaluation=torch.arange(MNIST_CALIB_SIZE, n),
        train=torch.arange(0),
    )


# --------------------------------------------------------------------------- CIFAR-10


def _require_pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow ships with torchvision
        raise ImportError(
            "decoding the CIFAR-10 JPEGs needs Pillow: pip install pillow "
            "(or pip install torch_nvdla[vision])"
        ) from exc
    return Image


@functools.lru_cache(maxsize=2)
def _cifar10_cached(tar_path: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    image_module = _require_pil()
    path = Path(tar_path)
    entries: dict[tuple[str, str], bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = member.name.split("/")
                if len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                handle = archive.extractfile(member)
                if handle is None:  # pragma: no cover - regular files always extract
                    continue
                entries[(parts[-2], parts[-1])] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FileFormatError(path, f"cannot read tar archive ({exc})") from exc
    if not entries:
        raise FileFormatError(path, "no <class>/<file>.jpg images found in the archive")
    keys = sorted(entries)
    classes = tuple(sorted({cls for cls, _ in keys}))
    class_index = {cls: i for i, cls in enumerate(classes)}
    images = np.empty((len(keys), _CIFAR10_SIZE, _CIFAR10_SIZE, 3), dtype=np.uint8)
    labels = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        try:
            with image_module.open(io.BytesIO(entries[key])) as img:
                pixels = np.asarray(img.convert("RGB"))
        except Exception as exc:  # PIL raises several unrelated types on bad data
            raise FileFormatError(path, f"cannot decode image {key[0]}/{key[1]} ({exc})") from exc
        if pixels.shape != (_CIFAR10_SIZE, _CIFAR10_SIZE, 3):
            raise FileFormatError(
                path, f"image {key[0]}/{key[1]} is {pixels.shape}, expected 32 x 32 x 3"
            )
        images[i] = pixels
        labels[i] = class_index[key[0]]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels, classes


def load_cifar10_test(
    root: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the CIFAR-10 test split from ``cifar10/test-jpg-q75.tar``.

    Images are ordered by class (sorted folder name) then file name; the class
    index is the position of the folder in sorted order (airplane = 0 ... truck = 9).
    The decoded arrays are cached in-process, so only the first call pays for
    decoding the 10000 JPEGs.

    Args:
        root: the shared data folder (holding ``cifar10/``), the ``cifar10/`` folder
            itself, or ``None`` for :func:`torch_nvdla.utils.paths.data_root`.

    Returns:
        ``(images, labels)``: ``uint8`` N x 32 x 32 x 3 (RGB, HWC) and ``int64`` N.

    Raises:
        FileNotFoundError: the archive is absent.
        FileFormatError: the archive or an image in it is malformed.
        ImportError: Pillow is not installed.
    """
    folder = resolve_data_dir(root, "cifar10", _CIFAR10_TAR)
    images, labels, _ = _cifar10_cached(str((folder / _CIFAR10_TAR).resolve()))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def cifar10_split_indices(labels: torch.Tensor) -> SplitIndices:
    """CIFAR-10 split: the first 50 images of each class calibrate, the rest evaluate.

    Relies on :func:`load_cifar10_test`'s order (by class, then file name), so "first"
    means the 50 lowest file names of each class.

    Args:
        labels: the ``int64`` labels returned by :func:`load_cifar10_test`.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    calib = torch.zeros(labels.numel(), dtype=torch.bool)
    for cls in torch.unique(labels).tolist():
        positions = torch.nonzero(labels == cls).reshape(-1)
        calib[positions[:CIFAR10_CALIB_PER_CLASS]] = True
    return SplitIndices(
        calibration=torch.nonzero(calib).reshape(-1),
        evaluation=torch.nonzero(~calib).reshape(-1),
        train=torch.arange(0),
    )


# --------------------------------------------------------------------------- digits


def _require_sklearn_digits():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "the 8x8 digits data set comes from scikit-learn: pip install torch_nvdla[demo]"
        ) from exc
    return sk_load_digits


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[np.ndarray, np.ndarray]:
    bunch = _require_sklearn_digits()()
    images = np.asarray(bunch.images)
    if images.ndim != 3 or images.shape[1:] != (8, 8) or images.min() < 0 or images.max() > 16:
        raise CalibrationError(
            f"unexpected sklearn digits data: shape {images.shape}, values "
            f"{images.min()}..{images.max()} (expected N x 8 x 8 in 0..16)"
        )
    pixels = images.astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's 8x8 handwritten digits (1797 images, values 0..16).

    Returns:
        ``(images, labels)``: ``uint8`` N x 8 x 8 (values 0..16) and ``int64`` N.

    Raises:
        ImportError: scikit-learn is missing (``pip install torch_nvdla[demo]``).
    """
    images, labels = _digits_cached()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def digits_split_indices(n: int = 1797, seed: int = DIGITS_SPLIT_SEED) -> SplitIndices:
    """The fixed digits split: a seeded permutation cut into train / calibration / evaluation.

    ``numpy.random.RandomState(seed).permutation(n)``; positions ``0..1199`` train,
    ``1200..1399`` calibrate, ``1400..n-1`` (397 for the full set) evaluate. Each
    index set is returned sorted.

    Args:
        n: number of images (1797 for the full set).
        seed: permutation seed; keep the default, the committed model was trained
            on its train part.
    """
    if n <= DIGITS_TRAIN_SIZE + DIGITS_CALIB_SIZE:
        raise CalibrationError(
            f"digits split needs more than {DIGITS_TRAIN_SIZE + DIGITS_CALIB_SIZE} images, got {n}"
        )
    order = np.random.RandomState(seed).permutation(n)
    cut1, cut2 = DIGITS_TRAIN_SIZE, DIGITS_TRAIN_SIZE + DIGITS_CALIB_SIZE

    def part(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.sort(values).astype(np.int64))

    return SplitIndices(
        calibration=part(order[cut1:cut2]),
        evaluation=part(order[cut2:]),
        train=part(order[:cut1]),
    )


# --------------------------------------------------------------------------- preprocessing


def _check_images(images: torch.Tensor, hw: tuple[int, int], what: str) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() == 2 and tuple(images.shape) == hw:
        images = images.unsqueeze(0)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or tuple(images.shape[1:]) != hw:
        raise CalibrationError(
            f"{what} expects N x {hw[0]} x {hw[1]} images, got shape {tuple(images.shape)}"
        )
    return images


def preprocess_mnist_caffe(images: torch.Tensor) -> torch.Tensor:
    """Caffe LeNet input: ``pixel / 256`` (scale 0.00390625, no mean subtraction).

    Args:
        images: ``uint8`` N x 28 x 28 (or N x 1 x 28 x 28) raw pixels.

    Returns:
        ``float32`` N x 1 x 28 x 28.
    """
    images = _check_images(images, (28, 28), "preprocess_mnist_caffe")
    return (images.to(torch.float32) * 0.00390625).unsqueeze(1).contiguous()


def preprocess_cifar10(images: torch.Tensor) -> torch.Tensor:
    """CIFAR ResNet input: ``RGB / 255`` normalised with ImageNet mean/std, NCHW.

    Args:
        images: ``uint8`` N x 32 x 32 x 3 (HWC, RGB), as :func:`load_cifar10_test` returns.

    Returns:
        ``float32`` N x 3 x 32 x 32: ``(pixel / 255 - mean) / std`` per channel with
        mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    """
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise CalibrationError(
            f"preprocess_cifar10 expects N x H x W x 3 RGB images, got shape {tuple(images.shape)}"
        )
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def preprocess_digits(images: torch.Tensor) -> torch.Tensor:
    """Digits input: ``value / 16`` (values 0..16 become 0..1).

    Args:
        images: N x 8 x 8 (or N x 1 x 8 x 8) values 0..16.

    Returns:
        ``float32`` N x 1 x 8 x 8.
    """
    images = _check_images(images, (8, 8), "preprocess_digits")
    return (images.to(torch.float32) / 16.0).unsqueeze(1).contiguous()


# --------------------------------------------------------------------------- batching


class Batches:
    """A re-iterable, sized sequence of ``(inputs, target)`` batches over two tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batch_iter(self.x, self.y, self.batch_size)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Batches:
    """``(inputs, target)`` tuples of consecutive slices, the last one possibly short.

    The result can be iterated many times and has a ``len`` (for progress bars).

    Args:
        x: inputs, first dimension = samples.
        y: targets, same number of samples.
        batch_size: samples per batch (positive).

    Raises:
        CalibrationError: a non-positive batch size or mismatched lengths (raised
            here, not on first use).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise CalibrationError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise CalibrationError(f"{len(x)} inputs but {len(y)} targets")
    return Batches(x, y, batch_size)


def _batch_iter(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
