"""Exception types raised by torch_nvdla.

Every error names what is wrong (a tap, a layer, a file and line, a value) so a user
can act on it without reading a traceback.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "FileFormatError",
    "NonFiniteActivationError",
    "OutputError",
    "TorchNvdlaError",
]


class TorchNvdlaError(Exception):
    """Base class of every error torch_nvdla raises on purpose."""


class CalibrationError(TorchNvdlaError, ValueError):
    """Bad input to a calibration pass: empty loader, unsupported batch, bad option."""


class NonFiniteActivationError(CalibrationError):
    """A tap observed NaN or Inf values; the message names the tap."""


class FileFormatError(TorchNvdlaError, ValueError):
    """A file (calib.json, TensorRT cache, prototxt, caffemodel, table) is malformed.

    Attributes:
        path: the file.
        line: 1-based line number where known, else ``None``.
        problem: what is wrong.
    """

    def __init__(self, path, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class OutputError(TorchNvdlaError, OSError):
    """An output cannot be written (a folder in its place, no permission, no space...).

    Attributes:
        path: the user's path (never a temporary file's).
        problem: what is wrong.
    """

    def __init__(self, path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"
