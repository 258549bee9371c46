#!/usr/bin/env python
"""Train the digits LeNet (``models/digits_lenet.pt``) on the train part of the digits split.

Deterministic: a fixed seed, the CPU, one thread and deterministic algorithms, so
the same library versions reproduce the same weights. Uses only the train part of
:func:`torch_nvdla.zoo.data.digits_split_indices` (1200 images); the calibration and
evaluation parts stay unseen. Takes a few seconds.

Usage::

    python scripts/train_digits.py                 # writes models/digits_lenet.pt (+ .json)
    python scripts/train_digits.py --out /tmp/w.pt --epochs 5
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Run against the checkout this script lives in, installed or not.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from torch_nvdla.models.digits_lenet import DIGITS_LENET_WEIGHTS, DigitsLeNet  # noqa: E402

from torch_nvdla.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from torch_nvdla.zoo.data import (  # noqa: E402
    DIGITS_SPLIT_SEED,
    batches,
    digits_split_indices,
    load_digits,
    preprocess_digits,
)

__all__ = ["main", "train"]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _random_shift(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift a batch by -1, 0 or +1 pixel in each direction (zero fill)."""
    padded = F.pad(xb, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + xb.shape[2], dx : dx + xb.shape[3]]


def train(
    epochs: int = 100,
    lr: float = 0.01,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    shift: bool = True,
    progress: bool = True,
) -> tuple[DigitsLeNet, dict]:
    """Train a fresh :class:`DigitsLeNet` on the digits train split.

    Recipe: AdamW with a cosine-annealed learning rate, cross-entropy with label
    smoothing, and random one-pixel shifts of each batch.

    Args:
        epochs: passes over the 1200 training images.
        lr: peak AdamW learning rate (cosine-annealed to zero).
        batch_size: images per step.
        seed: seeds the initial weights, the shuffles and the shifts.
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: cross-entropy label smoothing.
        shift: randomly shift each batch by up to one pixel.
        progress: show a ``rich`` progress bar over epochs.

    Returns:
        ``(model, record)``: the trained model (eval mode) and a JSON-able record
        with the settings and the train / calibration / evaluation accuracies.
    """
    torch.manual_seed(seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = load_digits()
        split = digits_split_indices(len(labels))
        x_all = preprocess_digits(images)
        x_train, y_train = x_all[split.train], labels[split.train]
        model = DigitsLeNet()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * ((len(y_train) + batch_size - 1) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        loss_value = float("nan")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = (
            TextColumn("[bold]training digits LeNet"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
        )
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("epochs", total=epochs, loss=loss_value)
            for _ in range(epochs):
                model.train()
                order = torch.randperm(len(y_train), generator=generator)
                total, count = 0.0, 0
                for xb, yb in batches(x_train[order], y_train[order], batch_size):
                    if shift:
                        xb = _random_shift(xb, generator)
                    optimizer.zero_grad()
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total += loss.item() * len(yb)
                    count += len(yb)
                loss_value = total / count
                bar.update(task, advance=1, loss=loss_value)
        model.eval()
        record = {
            "model": "DigitsLeNet",
            "data": "sklearn.datasets.load_digits, torch_nvdla.zoo.data.digits_split_indices",
            "split_seed": DIGITS_SPLIT_SEED,
            "train_images": len(split.train),
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "optimizer": "AdamW, cosine annealing",
            "weight_decay": weight_decay,
            "label_smoothing": label_smoothing,
            "random_shift": shift,
            "final_train_loss": round(loss_value, 6),
            "accuracy": {
                "train": round(_accuracy(model, x_train, y_train), 6),
                "calibration": round(
                    _accuracy(model, x_all[split.calibration], labels[split.calibration]), 6
                ),
                "evaluation": round(
                    _accuracy(model, x_all[split.evaluation], labels[split.evaluation]), 6
                ),
            },
            "seconds": round(time.perf_counter() - start, 2),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        return model, record
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DIGITS_LENET_WEIGHTS,
        help="state-dict file to write (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.01, help="peak LR (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)"
    )
    parser.add_argument(
        "--label-smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)"
    )
    parser.add_argument("--no-shift", action="store_true", help="no random one-pixel shifts")
    parser.add_argument("--no-record", action="store_true", help="do not write the .json record")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        parser.error("--epochs and --batch-size must be >= 1 and --lr > 0")
    if args.weight_decay < 0 or not 0 <= args.label_smoothing < 1:
        parser.error("--weight-decay must be >= 0 and --label-smoothing in [0, 1)")
    try:
        model, record = train(
            args.epochs,
            args.lr,
            args.batch_size,
            args.seed,
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            shift=not args.no_shift,
            progress=not args.quiet,
        )
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(args.out, buffer.getvalue())
    if not args.no_record:
        atomic_write_json(args.out.with_suffix(".json"), record)
    acc = record["accuracy"]
    print(
        f"wrote {args.out}: train {acc['train']:.2%}, calibration {acc['calibration']:.2%}, "
        f"evaluation {acc['evaluation']:.2%} ({record['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
