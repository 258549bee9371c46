"""Batches: how a model is called on one, where its labels are, how to name it in a message."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError

__all__ = ["LABEL_KEYS", "call_args", "describe_batch", "first_float_tensor", "run_batch", "split_labels", "to_device"]

#: Keys of a dict batch that hold labels: never passed to the model.
LABEL_KEYS = frozenset({"label", "labels", "target", "targets", "y"})


def to_device(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def run_batch(model: nn.Module, batch: Any, device: torch.device | None = None, index: int = 0) -> Any:
    """Call the model on one batch, the way :func:`calibrate` does.

    A tensor is the input; a tuple/list is ``(inputs, target, ...)`` and its first element
    is the input; a dict is passed as keyword arguments without its label keys
    (``label(s)``, ``target(s)``, ``y``).

    Raises:
        CalibrationError: for any other batch type, naming it and the batch index.
    """
    if isinstance(batch, torch.Tensor):
        return model(to_device(batch, device))
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError(f"batch {index} is an empty {type(batch).__name__}")
        return model(to_device(batch[0], device))
    if isinstance(batch, dict):
        return model(**to_device({k: v for k, v in batch.items() if k not in LABEL_KEYS}, device))
    raise CalibrationError(
        f"batch {index} is a {type(batch).__name__}; expected a tensor, an (inputs, target) "
        "tuple/list or a dict; pass forward=lambda model, batch: ... for anything else"
    )


def first_float_tensor(x: Any) -> torch.Tensor | None:
    """The first floating dense tensor in a (nested) output, else None."""
    stack = [x]
    while stack:
        v = stack.pop(0)
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.layout == torch.strided:
                return v
        elif isinstance(v, (tuple, list)):
            stack[:0] = list(v)
        elif isinstance(v, dict):
            stack[:0] = list(v.values())
    return None


def describe_batch(batch: Any) -> str:
    """``input 8x1x28x28 float32`` or the batch's type, for messages."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, torch.Tensor):
        return f"input {'x'.join(map(str, x.shape))} {str(x.dtype).replace('torch.', '')}"
    return f"a {type(batch).__name__}"


def call_args(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` the model is called with for ``batch``, as :func:`run_batch` does.

    Raises:
        CalibrationError: a batch of another type.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    raise CalibrationError(f"a batch must be a tensor, an (inputs, target) pair or a dict, got {type(batch).__name__}")


def split_labels(batch: Any, index: int = 0) -> tuple[Any, torch.Tensor]:
    """Split a labelled batch into what the model is called with and the labels.

    ``(inputs, labels, ...)`` tuples/lists and dicts with a ``label(s)`` / ``target(s)`` /
    ``y`` key are labelled; the first part is passed on unchanged (``run_batch`` calls the
    model with it).

    Raises:
        CalibrationError: an unlabelled batch (a bare tensor, a 1-tuple, a dict without a
            label key), naming the batch index.
    """
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise CalibrationError(
                f"evaluation batch {index} has no labels: a {type(batch).__name__} of {len(batch)} item(s); "
                "evaluation needs (inputs, labels) batches"
            )
        labels = batch[1]
        inputs: Any = batch
    elif isinstance(batch, dict):
        key = next((k for k in batch if k in LABEL_KEYS), None)
        if key is None:
            raise CalibrationError(
                f"evaluation batch {index} is a dict without labels (keys {sorted(batch)}); add one of "
                f"{sorted(LABEL_KEYS)}"
            )
        labels = batch[key]
        inputs = batch
    elif isinstance(batch, torch.Tensor):
        raise CalibrationError(
            f"evaluation batch {index} is a bare tensor: evaluation needs labels, pass (inputs, labels) batches"
        )
    else:
        raise CalibrationError(f"evaluation batch {index} is a {type(batch).__name__}; expected (inputs, labels)")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise CalibrationError(
            f"evaluation batch {index}: labels must be a 1-D integer tensor of class indices, "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    return inputs, labels
