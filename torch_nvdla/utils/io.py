"""Files in and out: atomic writes published together, bounded and validated reads.

A write goes to a hidden temporary file beside the destination, is fsync'ed, then
``os.replace``d over it. Inside :func:`publish_together` every write of the block is
staged and published only when the block succeeds: a run's outputs appear together or
not at all. Temporary files left by a killed process are removed by the next write in
that folder. Reads are bounded in size and every problem is a :class:`FileFormatError`
naming the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import secrets
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

from ..errors import FileFormatError, OutputError

__all__ = [
    "MAX_READ_BYTES",
    "Stage",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "JsonProblem",
    "check_output",
    "check_strings",
    "current_stage",
    "json_decoder",
    "parse_json",
    "publish_together",
    "read_bytes",
    "read_json",
    "read_npz",
    "read_text",
]

#: The largest file any reader accepts (calib.json, tables, caches, prototxt, caffemodel).
MAX_READ_BYTES = int(os.environ.get("TORCH_NVDLA_MAX_READ_BYTES", 2 << 30))
#: Longest integer literal a JSON reader converts exactly; longer ones become floats.
_MAX_INT_DIGITS = 300
#: Characters of the destination's name kept in a temporary file's name (NAME_MAX is 255).
_TMP_NAME_CHARS = 64
_TMP_RE = re.compile(r"^\..*\.(\d+)\.[0-9a-f]{12}\.tmp$")


class Stage:
    """Writes staged by :func:`publish_together`: destination -> temporary file, and
    what to run once they are published (:meth:`after_publish`)."""

    def __init__(self) -> None:
        self.pending: dict[Path, Path] = {}
        self.made_dirs: list[Path] = []
        self.after: list = []

    def after_publish(self, fn) -> None:
        """Call ``fn()`` once every file is published (e.g. to compile what was written)."""
        self.after.append(fn)


_STAGE: contextvars.ContextVar[Stage | None] = contextvars.ContextVar("torch_nvdla_stage", default=None)
_swept: set[Path] = set()


@contextlib.contextmanager
def publish_together() -> Iterator[Stage]:
    """Stage every atomic write of the block; publish them all when it succeeds.

    On an exception no staged file is published, the temporary files are removed and so
    are the folders the block created. Nested blocks join the outermost one. Yields the
    :class:`Stage`; its ``after`` callbacks are the caller's to run once published.
    """
    outer = _STAGE.get()
    if outer is not None:
        yield outer
        return
    stage = Stage()
    token = _STAGE.set(stage)
    try:
        yield stage
        _STAGE.reset(token)
        token = None
        for dest, tmp in stage.pending.items():
            try:
                os.replace(tmp, dest)
            except OSError as e:
                raise OutputError(dest, e.strerror or str(e)) from None
            stage.pending[dest] = dest  # published
    except BaseException:
        for dest, tmp in stage.pending.items():
            if tmp != dest:
                _unlink(tmp)
        for d in reversed(stage.made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: nothing of the user's goes
        raise
    finally:
        if token is not None:
            _STAGE.reset(token)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _sweep_stale(directory: Path) -> None:
    """Remove temporary files that a killed writer left in ``directory`` (once per process)."""
    key = directory.resolve()
    if key in _swept:
        return
    _swept.add(key)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
        elif entry.name.startswith(".export-caffe-") and entry.is_dir(follow_symlinks=False):
            # Left by earlier versions' export_caffe when killed; it held only its own files.
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > 3600:
                    import shutil

                    shutil.rmtree(entry.path, ignore_errors=True)


def _make_dirs(directory: Path, stage: Stage | None, path: Path) -> None:
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(path, f"cannot create the folder {d}: {e.strerror or e}") from None
        if stage is not None:
            stage.made_dirs.append(d)
    if not directory.is_dir():
        raise OutputError(path, f"{directory} is not a folder")


def check_output(path: str | os.PathLike, kind: str = "file") -> Path:
    """Fail early, before a long job, when ``path`` cannot be written.

    Args:
        path: the output.
        kind: ``"file"``, ``"folder"`` or ``"prefix"`` (files named ``<path>.<ext>``).

    Raises:
        OutputError: a folder where a file is wanted (or the reverse), a name longer than
            the file system allows, a parent that is a file or not writable.
    """
    path = Path(path)
    if len(os.fsencode(path.name)) + (8 if kind == "prefix" else 0) > 255:
        raise OutputError(path, "the file name is longer than the file system allows (255 bytes)")
    if kind == "file" and path.is_dir():
        raise OutputError(path, "is a folder; give a file name")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(path, "is a file; give a folder")
    probe = path if kind == "folder" else path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(path, f"{probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(path, f"cannot write in {probe} (permission denied or read-only)")
    return path


def current_stage() -> Stage | None:
    """The :class:`Stage` of the innermost :func:`publish_together` block, if any."""
    return _STAGE.get()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Inside :func:`publish_together` the file is published when the block ends.

    Raises:
        OutputError: the path is a folder, or cannot be written (naming ``path``).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, "is a folder; give a file name")
    directory = path.parent if str(path.parent) else Path(".")
    stage = _STAGE.get()
    _make_dirs(directory, stage, path)
    _sweep_stale(directory)
    try:
        mode = os.stat(path).st_mode & 0o777  # keep the mode of the file being replaced
    except (FileNotFoundError, NotADirectoryError):
        mode = 0o666  # as a plain open() would: the umask applies
    except OSError as e:
        raise OutputError(path, e.strerror or str(e)) from None
    # A fresh, exclusive name in the destination's folder (same file system for replace).
    tmp = directory / f".{path.name[:_TMP_NAME_CHARS]}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    except OSError as e:
        raise OutputError(path, f"cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if stage is None:
            os.replace(tmp, path)
        else:
            old = stage.pending.pop(path, None)
            if old is not None:
                _unlink(old)
            stage.pending[path] = tmp
    except BaseException as e:
        _unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(path, f"cannot write: {e.strerror or e}") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int | None = None) -> bytes:
    """Read a whole file, refusing more than ``limit`` bytes (default :data:`MAX_READ_BYTES`).

    Raises:
        FileNotFoundError: ``"<path>: <what> not found"``.
        FileFormatError: a folder, unreadable, or larger than the limit.
    """
    path = Path(path)
    limit = MAX_READ_BYTES if limit is None else limit
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise FileFormatError(path, f"is a folder, not a {what}") from None
    except OSError as e:
        raise FileFormatError(path, f"cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise FileFormatError(path, f"larger than the {limit} bytes a {what} may have "
                                    "(set TORCH_NVDLA_MAX_READ_BYTES to raise the limit)")
    return data


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """Read a UTF-8 text file (a leading byte-order mark is dropped).

    Raises:
        FileNotFoundError: ``"<path>: <what> not found"``.
        FileFormatError: unreadable, too large, or not UTF-8 (naming the line and byte).
    """
    raw = read_bytes(path, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(path, f"not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x})",
                              line=raw[: e.start].count(b"\n") + 1) from None
    return text[1:] if text.startswith("\ufeff") else text


class JsonProblem(ValueError):
    """Raised by :func:`json_decoder`'s hooks: a duplicate key, a lone surrogate, NaN."""

    def __init__(self, problem: str, needle: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.needle = needle


def _parse_int(s: str) -> int | float:
    # Exact for ordinary integers; a huge literal becomes a float (inf past 1e308), which
    # every validator then rejects as out of range instead of overflowing later.
    return int(s) if len(s) <= _MAX_INT_DIGITS else float(s)


def _reject_constant(name: str):
    raise JsonProblem(f"{name} is not a JSON number", name)


def _check_string(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonProblem(f"the string {s!r} holds a lone surrogate (not valid Unicode)") from None
    return s


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        _check_string(k)
        if k in out:
            raise JsonProblem(f"duplicate key {k!r}", json.dumps(k))
        out[k] = v
    return out


def json_decoder(*, constants: bool = False) -> json.JSONDecoder:
    """A decoder that raises :class:`JsonProblem` on a duplicate key or a key that is not
    valid Unicode, turns integers too long to convert exactly into floats, and rejects
    NaN / Infinity (unless ``constants``: then they decode as floats for the caller to judge).
    Nesting deeper than Python's recursion limit raises ``RecursionError``."""
    kw = {} if constants else {"parse_constant": _reject_constant}
    return json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_parse_int, **kw)


_STRICT = json_decoder()


def _line_of(text: str, needle: str | None, nth: int = 2) -> int | None:
    if not needle:
        return None
    pos = -1
    for _ in range(nth):
        pos = text.find(needle, pos + 1)
        if pos < 0:
            return None
    return text.count("\n", 0, pos) + 1


def parse_json(text: str, path: str | os.PathLike) -> Any:
    """Parse JSON text strictly: no NaN/Infinity, no duplicate keys, valid Unicode strings,
    bounded nesting; integers too long to convert exactly become floats.

    Raises:
        FileFormatError: naming ``path`` and, where known, the line.
    """
    try:
        obj = _STRICT.decode(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    except RecursionError:
        raise FileFormatError(path, "invalid JSON: nested too deeply") from None
    except JsonProblem as e:
        raise FileFormatError(path, f"invalid JSON: {e.problem}", line=_line_of(text, e.needle, 2 if e.needle and
                                                                                   e.needle.startswith('"') else 1)) from None
    except ValueError as e:  # e.g. Python's limit on int digits
        raise FileFormatError(path, f"invalid JSON: {e}") from None
    try:
        check_strings(obj)
    except JsonProblem as e:
        raise FileFormatError(path, f"invalid JSON: {e.problem}") from None
    return obj


def check_strings(obj: Any) -> None:
    """Raise :class:`JsonProblem` if any string in a decoded JSON value is not valid Unicode."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            _check_string(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file (see :func:`parse_json`).

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not UTF-8, too large or invalid JSON, naming the line.
    """
    return parse_json(read_text(path, what), path)


def read_npz(path: str | os.PathLike, what: str = ".npz archive") -> dict[str, Any]:
    """Read every array of an ``.npz`` with bounded memory (no pickles).

    The archive's members are checked before anything is inflated: the total inflated
    size must stay under :data:`MAX_READ_BYTES`, and each ``.npy`` header must describe
    no more data than its member holds.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not a zip / ``.npz``, a member that is not an ``.npy`` array, a
            decompression bomb or a header claiming more data than stored.
    """
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    if not path.is_file():
        raise FileFormatError(path, f"not a file (expected a {what})")
    out: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            total = sum(i.file_size for i in infos)
            if total > MAX_READ_BYTES:
                raise FileFormatError(path, f"inflates to {total} bytes, over the {MAX_READ_BYTES}-byte limit "
                                            "(set TORCH_NVDLA_MAX_READ_BYTES to raise it)")
            for info in infos:
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with z.open(info) as f:
                    try:
                        version = np.lib.format.read_magic(f)
                        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                        if read_header is None:
                            raise ValueError(f"unsupported .npy version {version}")
                        shape, fortran, dtype = read_header(f)
                    except ValueError as e:
                        raise FileFormatError(path, f"member {info.filename!r} is not an .npy array ({e})") from None
                    if dtype.hasobject:
                        raise FileFormatError(path, f"array {name!r} holds Python objects (not loaded)")
                    count = 1
                    for d in shape:
                        count *= d
                    if count * dtype.itemsize > info.file_size:
                        raise FileFormatError(path, f"array {name!r}: its header claims shape {shape} of {dtype}, "
                                                    f"more than the {info.file_size} bytes stored")
                    data = f.read(count * dtype.itemsize)
                    if len(data) != count * dtype.itemsize:
                        raise FileFormatError(path, f"array {name!r} is truncated")
                    arr = np.frombuffer(data, dtype=dtype).copy()
                    out[name] = arr.reshape(shape, order="F" if fortran else "C")
    except zipfile.BadZipFile as e:
        raise FileFormatError(path, f"not a readable {what} (a zip archive): {e}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise FileFormatError(path, f"not a readable {what}: {e}") from None
    return out
