"""Atomic file writes: a reader never sees a half-written file.

The data goes to a temporary file in the destination's directory, is flushed and
fsync'ed, then ``os.replace``d over the destination (atomic on POSIX and Windows).
A process killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ._errors import FileFormatError

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json", "read_text"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o777  # keep the mode of the file being replaced
    except FileNotFoundError:
        mode = 0o666  # as a plain open() would: the umask applies
    # A fresh, exclusive name in the destination's folder (same file system for replace).
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """Read a UTF-8 text file (a leading byte-order mark is dropped).

    Raises:
        FileNotFoundError: ``"<path>: <what> not found"``.
        FileFormatError: unreadable, or not UTF-8 (naming the line and byte).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as e:
        raise FileFormatError(path, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(path, f"not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x})",
                              line=raw[: e.start].count(b"\n") + 1) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not UTF-8 or invalid/truncated JSON, naming the line.
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
