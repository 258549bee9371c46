"""Built-in models and data sets the CLI knows by name, plus ``module:function`` entry points.

Models: ``digits-lenet`` (the default; weights ship with the package),
``caffe-lenet``, ``cifar-resnet20`` / ``32`` / ``44`` / ``56``. Data sets:
``digits`` (scikit-learn), ``mnist``, ``cifar10`` (the shared data folder,
``$TORCH_NVDLA_DATA``). Each model has a default data set
(:func:`default_dataset_for`).

Anything else of the form ``package.module:function`` (or ``module:Class.attr``) is
imported and called with no arguments: for a model it must return an
:class:`torch.nn.Module`; for a data set a :class:`DatasetSplits`, or a pair
``((calib_inputs, calib_labels), (eval_inputs, eval_labels))``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import CalibrationError, TorchNvdlaError
from ..utils.paths import DATA_ENV
from . import data as _data

__all__ = [
    "DATASETS",
    "DEFAULT_MODEL",
    "MODELS",
    "BuiltinDataset",
    "BuiltinModel",
    "DatasetSplits",
    "dataset_names",
    "default_dataset_for",
    "get_dataset",
    "get_model",
    "is_entry_point",
    "load_entry_point",
    "model_names",
]

DEFAULT_MODEL = "digits-lenet"
_SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Preprocessed calibration and evaluation data, kept disjoint.

    Attributes:
        name: the data set's name (a built-in name or the entry-point string).
        calibration: ``(inputs, labels)``: float NCHW inputs ready for the model and
            ``int64`` labels.
        evaluation: ``(inputs, labels)`` of the same kind, no image shared with
            ``calibration``.
    """

    name: str
    calibration: tuple[torch.Tensor, torch.Tensor]
    evaluation: tuple[torch.Tensor, torch.Tensor]

    def __post_init__(self) -> None:
        for split in _SPLITS:
            pair = getattr(self, split)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CalibrationError(
                    f"data set {self.name!r}: {split} must be an (inputs, labels) pair"
                )
            inputs, labels = pair
            if not torch.is_tensor(inputs) or not torch.is_tensor(labels):
                raise CalibrationError(
                    f"data set {self.name!r}: {split} inputs and labels must be tensors"
                )
            if len(inputs) != len(labels):
                raise CalibrationError(
                    f"data set {self.name!r}: {split} has {len(inputs)} inputs but "
                    f"{len(labels)} labels"
                )
            object.__setattr__(self, split, (inputs, labels))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch dimension, e.g. ``(1, 8, 8)``."""
        return tuple(self.calibration[0].shape[1:])

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(inputs, labels)`` of ``"calibration"`` or ``"evaluation"``.

        Raises:
            CalibrationError: any other split name.
        """
        if split not in _SPLITS:
            raise CalibrationError(
                f"unknown split {split!r}; expected one of: {', '.join(_SPLITS)}"
            )
        return getattr(self, split)

    def loader(self, split: str, batch_size: int = 64, limit: int | None = None) -> "_data.Batches":
        """``(inputs, labels)`` batches of one split, in a fixed order (re-iterable, sized).

        Args:
            split: ``"calibration"`` or ``"evaluation"``.
            batch_size: samples per batch (the last batch may be short).
            limit: use only the first ``limit`` samples of the split.

        Raises:
            CalibrationError: an unknown split or a non-positive batch size.
        """
        inputs, labels = self.split(split)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise CalibrationError(f"limit must be a positive integer, got {limit!r}")
            inputs, labels = inputs[:limit], labels[:limit]
        return _data.batches(inputs, labels, batch_size)


@dataclass(frozen=True)
class BuiltinModel:
    """A model the CLI knows by name.

    Attributes:
        name: CLI name, e.g. ``"caffe-lenet"``.
        dataset: name of its default data set.
        description: one line for ``--help`` / listings.
        factory: builds the model with trained weights.
        needs_shared_data: whether its weights come from the shared data folder.
    """

    name: str
    dataset: str
    description: str
    factory: Callable[[], nn.Module]
    needs_shared_data: bool


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set the CLI knows by name.

    Attributes:
        name: CLI name, e.g. ``"mnist"``.
        description: one line for ``--help`` / listings.
        factory: loads and preprocesses it.
        needs_shared_data: whether it reads the shared data folder.
    """

    name: str
    description: str
    factory: Callable[[], DatasetSplits]
    needs_shared_data: bool


# --------------------------------------------------------------------------- factories


def _digits_lenet() -> nn.Module:
    from torch_nvdla.models.digits_lenet import load_digits_lenet

    return load_digits_lenet()


def _caffe_lenet() -> nn.Module:
    from torch_nvdla.models.caffe_lenet import load_caffe_lenet

    return load_caffe_lenet()


def _resnet(depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torch_nvdla.models.resnet_cifar import load_resnet_cifar

        return load_resnet_cifar(depth)

    return build


def _splits(
    name: str, x: torch.Tensor, y: torch.Tensor, split: _data.SplitIndices
) -> DatasetSplits:
    return DatasetSplits(
        name=name,
        calibration=(x[split.calibration], y[split.calibration]),
        evaluation=(x[split.evaluation], y[split.evaluation]),
    )


def _digits() -> DatasetSplits:
    images, labels = _data.load_digits()
    split = _data.digits_split_indices(len(labels))
    return _splits("digits", _data.preprocess_digits(images), labels, split)


def _mnist() -> DatasetSplits:
    images, labels = _data.load_mnist_test()
    split = _data.mnist_split_indices(len(labels))
    return _splits("mnist", _data.preprocess_mnist_caffe(images), labels, split)


def _cifar10() -> DatasetSplits:
    images, labels = _data.load_cifar10_test()
    split = _data.cifar10_split_indices(labels)
    return _splits("cifar10", _data.preprocess_cifar10(images), labels, split)


MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        "digits-lenet": BuiltinModel(
            "digits-lenet", "digits", "small LeNet for 8x8 sklearn digits (weights included)",
            _digits_lenet, False,
        ),
        "caffe-lenet": BuiltinModel(
            "caffe-lenet", "mnist", "BVLC Caffe LeNet (TensorRT sampleINT8), MNIST", _caffe_lenet,
            True,
        ),
        **{
            f"cifar-resnet{depth}": BuiltinModel(
                f"cifar-resnet{depth}", "cifar10",
                f"ResNet-{depth} for CIFAR-10 (He et al., option-A shortcuts)", _resnet(depth),
                True,
            )
            for depth in (20, 32, 44, 56)
        },
    }
)  # fmt: skip
"""Built-in models by CLI name."""

DATASETS: Mapping[str, BuiltinDataset] = MappingProxyType(
    {
        "digits": BuiltinDataset(
            "digits", "sklearn 8x8 digits: 200 calibration / 397 evaluation images, value/16",
            _digits, False,
        ),
        "mnist": BuiltinDataset(
            "mnist", "MNIST test split: 500 calibration / 9500 evaluation images, pixel/256",
            _mnist, True,
        ),
        "cifar10": BuiltinDataset(
            "cifar10", "CIFAR-10 JPEG test set: 500 calibration / 9500 evaluation, mean/std",
            _cifar10, True,
        ),
    }
)  # fmt: skip
"""Built-in data sets by CLI name."""


def model_names() -> tuple[str, ...]:
    """The built-in model names, default first."""
    return tuple(MODELS)


def dataset_names() -> tuple[str, ...]:
    """The built-in data-set names."""
    return tuple(DATASETS)


# --------------------------------------------------------------------------- entry points


def is_entry_point(name: str) -> bool:
    """Whether ``name`` looks like ``package.module:function``."""
    module, sep, attr = name.partition(":")
    return bool(sep and module.strip() and attr.strip())


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A console script does not have the working directory on sys.path; a user's
        # ``mymodel:build`` most often means ./mymodel.py, so retry from there once.
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise CalibrationError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module_name)
        except Exception as exc2:
            raise CalibrationError(
                f"cannot import {module_name!r} for {spec!r}: {exc2}"
            ) from exc2
        finally:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass
    except Exception as exc:  # the module itself failed while importing
        raise CalibrationError(
            f"importing {module_name!r} for {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def load_entry_point(spec: str) -> Any:
    """Import ``package.module:function`` and return ``function()`` (called with no arguments).

    The part after the colon may be a dotted attribute path (``module:Class.create``).

    Args:
        spec: the entry-point string.

    Raises:
        CalibrationError: a malformed string, an import failure, a missing or
            non-callable attribute, or an exception from the call; the message names
            ``spec``.
    """
    if not isinstance(spec, str) or not is_entry_point(spec):
        raise CalibrationError(
            f"{spec!r} is not an entry point of the form 'package.module:function'"
        )
    module_name, _, attr_path = (part.strip() for part in spec.partition(":"))
    target: Any = _import_module(module_name, spec)
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError as exc:
            raise CalibrationError(
                f"{spec!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    if not callable(target):
        raise CalibrationError(f"{spec!r}: {attr_path!r} is not callable")
    try:
        return target()
    except TorchNvdlaError:
        raise
    except Exception as exc:
        raise CalibrationError(f"calling {spec!r} failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- lookups


def _unknown(kind: str, name: Any, known: tuple[str, ...]) -> CalibrationError:
    return CalibrationError(
        f"unknown {kind} {name!r}; known {kind}s: {', '.join(known)} "
        "(or a 'package.module:function' entry point)"
    )


def _shared_data_error(name: str, exc: FileNotFoundError) -> CalibrationError:
    return CalibrationError(
        f"{name!r} needs the real data folder: set ${DATA_ENV} to the shared data folder "
        f"(../shared/data); {exc}"
    )


def get_model(name: str) -> nn.Module:
    """Build a model by built-in name or entry point, in eval mode.

    Args:
        name: one of :func:`model_names` or ``package.module:function``.

    Raises:
        CalibrationError: unknown name (the message lists the known ones), missing
            shared data (the message says to set ``$TORCH_NVDLA_DATA``), or a failing
            entry point.
    """
    if isinstance(name, str) and name in MODELS:
        builtin = MODELS[name]
        try:
            model = builtin.factory()
        except FileNotFoundError as exc:
            if builtin.needs_shared_data:
                raise _shared_data_error(name, exc) from exc
            raise CalibrationError(f"model {name!r}: {exc}") from exc
    elif isinstance(name, str) and is_entry_point(name):
        model = load_entry_point(name)
        if not isinstance(model, nn.Module):
            raise CalibrationError(
                f"{name!r} returned {type(model).__name__}, expected a torch.nn.Module"
            )
    else:
        raise _unknown("model", name, model_names())
    return model.eval()


def _as_splits(name: str, value: Any) -> DatasetSplits:
    if isinstance(value, DatasetSplits):
        return value
    calibration = getattr(value, "calibration", None)
    evaluation = getattr(value, "evaluation", None)
    if calibration is None and isinstance(value, (tuple, list)) and len(value) == 2:
        calibration, evaluation = value
    if calibration is None or evaluation is None:
        raise CalibrationError(
            f"{name!r} returned {type(value).__name__}; expected a DatasetSplits or "
            "((calib_inputs, calib_labels), (eval_inputs, eval_labels))"
        )
    return DatasetSplits(name=name, calibration=tuple(calibration), evaluation=tuple(evaluation))


def get_dataset(name: str) -> DatasetSplits:
    """Load a data set by built-in name or entry point.

    Args:
        name: one of :func:`dataset_names` or ``package.module:function``.

    Raises:
        CalibrationError: unknown name (the message lists the known ones), missing
            shared data (the message says to set ``$TORCH_NVDLA_DATA``), missing
            scikit-learn for ``digits``, or a failing entry point.
    """
    if isinstance(name, str) and name in DATASETS:
        builtin = DATASETS[name]
        try:
            return builtin.factory()
        except FileNotFoundError as exc:
            if builtin.needs_shared_data:
                raise _shared_data_error(name, exc) from exc
            raise CalibrationError(f"data set {name!r}: {exc}") from exc
        except ImportError as exc:
            raise CalibrationError(f"data set {name!r}: {exc}") from exc
    if isinstance(name, str) and is_entry_point(name):
        return _as_splits(name, load_entry_point(name))
    raise _unknown("dataset", name, dataset_names())


def default_dataset_for(model_name: str) -> str | None:
    """The built-in data set a model calibrates on by default.

    Args:
        model_name: a built-in model name or an entry point.

    Returns:
        The data-set name, or ``None`` for an entry point (the user must choose).

    Raises:
        CalibrationError: an unknown built-in name.
    """
    if isinstance(model_name, str) and model_name in MODELS:
        return MODELS[model_name].dataset
    if isinstance(model_name, str) and is_entry_point(model_name):
        return None
    raise _unknown("model", model_name, model_names())
