"""The one place that decides how torch_nvdla talks to a person: rich progress bars and tables."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["console", "progress_iter", "say"]

T = TypeVar("T")

#: Messages and progress go to stderr, so ``--json`` output on stdout stays machine-readable.
console = Console(stderr=True)


def say(message: str) -> None:
    """One line of information for the user (stderr)."""
    console.print(message, highlight=False)


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    with progress:
        yield progress


def progress_iter(items: Iterable[T], description: str, total: int | None = None,
                  enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` under a rich progress bar (nothing shown when ``enabled`` is False)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with _progress(enabled) as progress:
        task = progress.add_task(description, total=total) if progress else None
        for item in items:
            yield item
            if progress:
                progress.advance(task)
