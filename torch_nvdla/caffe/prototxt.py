"""Caffe prototxt files: a protobuf text-format parser and writer, and a Caffe-level view.

Design notes and the facts behind them: ``docs/caffe.md``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    NamedTuple,
    Union,
)

import numpy as np

from ..errors import FileFormatError
from ..utils.io import atomic_write_text, read_bytes

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike

__all__ = [
    "COMPILER_LAYER_TYPES",
    "CaffeLayer",
    "CaffeNet",
    "EnumValue",
    "Field",
    "Message",
    "PARAM_FIELD_BY_TYPE",
    "StructureProblem",
    "V1_LAYER_TYPES",
    "format_prototxt",
    "is_test_phase",
    "parse_prototxt",
    "parse_text_message",
    "structure_problems",
    "write_prototxt",
]

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnumValue(str):
    """An enum identifier such as ``MAX``, ``SUM`` or ``TEST``, written without quotes.

    A ``str`` subclass, so ``EnumValue("MAX") == "MAX"``; :class:`Message` equality
    and the writers still tell it apart from a quoted string.

    Raises:
        ValueError: ``name`` is not an identifier (letters, digits, ``_``).
    """

    __slots__ = ()

    def __new__(cls, name: str) -> "EnumValue":
        if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
            raise ValueError(f"not a valid enum identifier: {name!r}")
        return super().__new__(cls, name)

    def __repr__(self) -> str:
        return f"EnumValue({str(self)!r})"


Scalar = Union[bool, int, float, str]
Value = Union[Scalar, "Message"]


class Field(NamedTuple):
    """One entry of a :class:`Message`: field name, value, and 1-based source line.

    ``line`` is ``None`` for entries built in code or read from a binary file.
    """

    name: str
    value: Value
    line: int | None


def _short_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``value``, as a float.

    Caffe's float fields are float32; ``0.001`` read back from a binary file is
    ``0.0010000000474974513`` in double, which this turns back into ``0.001``.
    """
    return float(str(np.float32(value)))


def _coerce(value: Any, name: str) -> Value:
    """Normalise a value added to a message (numpy scalars, dicts) or raise TypeError."""
    if isinstance(value, Message):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):  # includes EnumValue
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, np.floating) and value.dtype.itemsize == 4:
        return _short_float32(float(value))
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return Message(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TypeError(f"field {name!r}: bytes value is not valid UTF-8") from None
    if isinstance(value, (list, tuple)):
        raise TypeError(f"field {name!r}: add repeated values one by one (Message.extend)")
    raise TypeError(f"field {name!r}: unsupported value type {type(value).__name__}")


def _canonical(value: Value) -> Any:
    """A comparison key: enum identifiers differ from quoted strings, NaN equals NaN."""
    if isinstance(value, EnumValue):
        return ("enum", str(value))
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return value


class Message:
    """A protobuf message as an ordered list of ``(name, value, line)`` fields.

    Repeated fields are simply several entries with the same name. Build one from
    keyword arguments, a mapping, or an iterable of ``(name, value)`` pairs; in the
    last two a list value becomes a repeated field and a mapping a nested message::

        Message(num_output=20, kernel_size=5)
        Message({"shape": {"dim": [1, 3, 224, 224]}})
        Message([("param", {"lr_mult": 1}), ("param", {"lr_mult": 2})])

    Equality ignores line numbers and the relative order of *different* fields
    (protobuf semantics); the order of values within one repeated field counts.

    Attributes:
        line: 1-based line of the field that opened this message in a text file,
            else ``None``.
    """

    __slots__ = ("_fields", "line")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        items: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        /,
        **fields: Any,
    ) -> None:
        self._fields: list[Field] = []
        self.line: int | None = None
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for name, value in pairs:
                self._add_any(name, value)
        for name, value in fields.items():
            self._add_any(name, value)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "Message":
        """Same as ``Message(mapping)``: lists become repeated fields, dicts messages."""
        return cls(mapping)

    def _add_any(self, name: str, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            self.extend(name, value)
        else:
            self.add(name, value)

    # -- building -------------------------------------------------------------------

    def add(self, name: str, value: Any, line: int | None = None) -> "Message":
        """Append one field; returns ``self`` so calls chain.

        Raises:
            TypeError: ``value`` is not a bool, number, str, mapping or Message.
            ValueError: ``name`` is not an identifier.
        """
        if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
            raise ValueError(f"not a valid field name: {name!r}")
        self._fields.append(Field(name, _coerce(value, name), line))
        return self

    def extend(self, name: str, values: Iterable[Any], line: int | None = None) -> "Message":
        """Append one field per value (a repeated field); returns ``self``."""
        for value in values:
            self.add(name, value, line)
        return self

    def set(self, name: str, value: Any) -> "Message":
        """Replace every ``name`` entry by ``value`` (a list sets a repeated field).

        The new entries take the place of the first old one, or go at the end.
        """
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        new = [Field(name, _coerce(v, name), None) for v in values]
        out: list[Field] = []
        placed = False
        for f in self._fields:
            if f.name != name:
                out.append(f)
            elif not placed:
                out.extend(new)
                placed = True
        if not placed:
            out.extend(new)
        self._fields = out
        return self

    def remove(self, name: str) -> int:
        """Delete every ``name`` entry; returns how many were removed."""
        kept = [f for f in self._fields if f.name != name]
        removed = len(self._fields) - len(kept)
        self._fields = kept
        return removed

    # -- reading --------------------------------------------------------------------

    def get(self, name: str, default: Any = None) -> Any:
        """The value of field ``name`` (the last one if repeated), else ``default``."""
        for f in reversed(self._fields):
            if f.name == name:
                return f.value
        return default

    def get_all(self, name: str) -> list[Value]:
        """Every value of field ``name`` in order (empty list when absent)."""
        return [f.value for f in self._fields if f.name == name]

    def get_message(self, name: str) -> "Message":
        """The sub-message ``name``, or a new empty message when absent.

        Raises:
            TypeError: the field holds a scalar.
        """
        value = self.get(name)
        if value is None:
            return Message()
        if not isinstance(value, Message):
            raise TypeError(f"field {name!r} is a {type(value).__name__}, not a message")
        return value

    def line_of(self, name: str) -> int | None:
        """The source line of the first ``name`` entry (``None`` if absent or unknown)."""
        for f in self._fields:
            if f.name == name:
                return f.line
        return None

    def names(self) -> list[str]:
        """Field names in order of first appearance, each once."""
        return list(dict.fromkeys(f.name for f in self._fields))

    @property
    def fields(self) -> tuple[Field, ...]:
        """All entries in order."""
        return tuple(self._fields)

    def __iter__(self) -> Iterator[Field]:
        return iter(tuple(self._fields))

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in self._fields)

    def _grouped(self) -> dict[str, list[Any]]:
        groups: dict[str, list[Any]] = {}
        for f in self._fields:
            groups.setdefault(f.name, []).append(_canonical(f.value))
        return groups

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._grouped() == other._grouped()

    def copy(self) -> "Message":
        """A deep copy (nested messages are copied, lines kept)."""
        out = Message()
        out.line = self.line
        out._fields = [
            Field(f.name, f.value.copy() if isinstance(f.value, Message) else f.value, f.line)
            for f in self._fields
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain dict: a field seen once maps to its value, a repeated one to a list."""
        out: dict[str, Any] = {}
        for name in self.names():
            values = [v.to_dict() if isinstance(v, Message) else v for v in self.get_all(name)]
            out[name] = values[0] if len(values) == 1 else values
        return out

    def to_text(self, indent: int = 0) -> str:
        """The message in protobuf text format (see :func:`format_prototxt`)."""
        lines: list[str] = []
        _format_fields(self, indent, lines)
        return "".join(line + "\n" for line in lines)

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={f.value!r}" for f in self._fields)
        return f"Message({inner})"


# ---------------------------------------------------------------------------------
# writer


def _quote(text: str) -> str:
    """A double-quoted protobuf string literal; non-ASCII bytes become octal escapes."""
    out = ['"']
    for byte in text.encode("utf-8"):
        if byte == 0x22:
            out.append('\\"')
        elif byte == 0x5C:
            out.append("\\\\")
        elif byte == 0x0A:
            out.append("\\n")
        elif byte == 0x0D:
            out.append("\\r")
        elif byte == 0x09:
            out.append("\\t")
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append("\\%03o" % byte)
    out.append('"')
    return "".join(out)


def _format_scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, EnumValue):
        return str(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    raise TypeError(f"cannot write a {type(value).__name__} in a prototxt")


def _format_fields(msg: Message, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for f in msg._fields:
        value = f.value
        if isinstance(value, Message):
            inner = value._fields
            if not inner:
                lines.append(f"{pad}{f.name} {{}}")
                continue
            if len({g.name for g in inner}) == 1 and not any(
                isinstance(g.value, Message) for g in inner
            ):
                # a short list such as ``shape { dim: 1 dim: 3 dim: 224 dim: 224 }``
                body = " ".join(f"{g.name}: {_format_scalar(g.value)}" for g in inner)
                one_line = f"{pad}{f.name} {{ {body} }}"
                if len(one_line) <= 100:
                    lines.append(one_line)
                    continue
            lines.append(f"{pad}{f.name} {{")
            _format_fields(value, indent + 1, lines)
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{f.name}: {_format_scalar(value)}")


def format_prototxt(obj: "CaffeNet | CaffeLayer | Message") -> str:
    """Protobuf text for a net, a layer (as a ``layer { }`` block) or a message.

    Strings are quoted and escaped, :class:`EnumValue` identifiers and ``bool``
    values are written bare, floats with ``repr`` (exact round trip). The text
    parses back with :func:`parse_prototxt` / :func:`parse_text_message` to an
    equal object.
    """
    if isinstance(obj, CaffeNet):
        return obj.to_text()
    if isinstance(obj, CaffeLayer):
        return Message([("layer", obj.to_message())]).to_text()
    if isinstance(obj, Message):
        return obj.to_text()
    raise TypeError(f"cannot format a {type(obj).__name__} as a prototxt")


def write_prototxt(path: str | os.PathLike, obj: "CaffeNet | Message") -> Path:
    """Write :func:`format_prototxt` of ``obj`` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, format_prototxt(obj))


# ---------------------------------------------------------------------------------
# tokenizer

_TOKEN_RE = re.compile(
    r"""
      (?P<space>[ \t\r\f\v]+)
    | (?P<newline>\n)
    | (?P<comment>\#[^\n]*)
    | (?P<number>-?(?:0[xX][0-9A-Fa-f]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fF]?))
    | (?P<ident>-?[A-Za-z_][A-Za-z0-9_]*)
    | (?P<quote>["'])
    | (?P<punct>[{}\[\]<>:,;])
    """,
    re.VERBOSE,
)
_AFTER_NUMBER_RE = re.compile(r"[A-Za-z0-9_.]")
_SIMPLE_ESCAPES = {
    "a": b"\a", "b": b"\b", "f": b"\f", "n": b"\n", "r": b"\r", "t": b"\t", "v": b"\v",
    "\\": b"\\", "'": b"'", '"': b'"', "?": b"?",
}  # fmt: skip
_OCTAL_RE = re.compile(r"[0-7]{1,3}")
_HEX_RE = re.compile(r"[0-9A-Fa-f]{1,2}")
_FLOAT_WORDS = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}
_BOOL_WORDS = {"true": True, "True": True, "false": False, "False": False}


class _Tok(NamedTuple):
    kind: str  # "ident", "number", "string", "eof" or the punctuation character
    value: Any
    line: int


def _describe(tok: _Tok) -> str:
    if tok.kind == "eof":
        return "end of file"
    if tok.kind == "string":
        text = tok.value if len(tok.value) <= 30 else tok.value[:27] + "..."
        return f"string {_quote(text)}"
    if tok.kind == "number":
        return f"number {tok.value!r}"
    return f"'{tok.value}'"


def _parse_number(text: str, path: str, line: int) -> int | float:
    negative = text.startswith("-")
    body = text[1:] if negative else text
    try:
        if body[:2] in ("0x", "0X"):
            value: int | float = int(body, 16)
        elif body.isdigit():
            value = int(body, 8) if len(body) > 1 and body[0] == "0" else int(body)
        else:
            value = float(body.rstrip("fF"))
    except ValueError:
        raise FileFormatError(path, f"invalid number {text!r}", line) from None
    return -value if negative else value


def _scan_string(text: str, pos: int, line: int, path: str) -> tuple[str, int]:
    """Read the quoted string starting at ``text[pos]``; returns (value, end position)."""
    quote = text[pos]
    i = pos + 1
    n = len(text)
    out = bytearray()
    while True:
        if i >= n or text[i] == "\n":
            raise FileFormatError(path, f"unterminated string (missing closing {quote})", line)
        c = text[i]
        if c == quote:
            i += 1
            break
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        if i + 1 >= n or text[i + 1] == "\n":
            raise FileFormatError(path, f"unterminated string (missing closing {quote})", line)
        e = text[i + 1]
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e]
            i += 2
        elif e in "01234567":
            digits = _OCTAL_RE.match(text, i + 1).group()  # type: ignore[union-attr]
            code = int(digits, 8)
            if code > 0xFF:
                raise FileFormatError(path, f"octal escape '\\{digits}' is out of range", line)
            out.append(code)
            i += 1 + len(digits)
        elif e in "xX":
            m = _HEX_RE.match(text, i + 2)
            if m is None:
                raise FileFormatError(path, "'\\x' escape without hex digits", line)
            out.append(int(m.group(), 16))
            i = m.end()
        elif e in "uU":
            width = 4 if e == "u" else 8
            digits = text[i + 2 : i + 2 + width]
            if len(digits) != width or not all(ch in "0123456789abcdefABCDEF" for ch in digits):
                raise FileFormatError(path, f"'\\{e}' escape needs {width} hex digits", line)
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise FileFormatError(path, f"'\\{e}{digits}' is not a valid code point", line)
            out += chr(code).encode("utf-8")
            i += 2 + width
        else:
            raise FileFormatError(path, f"invalid escape '\\{e}' in string", line)
    try:
        return out.decode("utf-8"), i
    except UnicodeDecodeError:
        raise FileFormatError(path, "string escapes do not form valid UTF-8", line) from None


def _tokenize(text: str, path: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos, line, n = 0, 1, len(text)
    match = _TOKEN_RE.match
    while pos < n:
        m = match(text, pos)
        if m is None:
            raise FileFormatError(path, f"unexpected character {text[pos]!r}", line)
        kind = m.lastgroup
        if kind == "newline":
            line += 1
        elif kind == "number":
            if m.end() < n and _AFTER_NUMBER_RE.match(text, m.end()):
                end = m.end()
                while end < n and _AFTER_NUMBER_RE.match(text, end):
                    end += 1
                raise FileFormatError(path, f"invalid number {text[pos:end]!r}", line)
            tokens.append(_Tok("number", _parse_number(m.group(), path, line), line))
        elif kind == "ident":
            tokens.append(_Tok("ident", m.group(), line))
        elif kind == "quote":
            value, end = _scan_string(text, pos, line, path)
            tokens.append(_Tok("string", value, line))
            pos = end
            continue
        elif kind == "punct":
            tokens.append(_Tok(m.group(), m.group(), line))
        pos = m.end()
    tokens.append(_Tok("eof", None, line))
    return tokens


# ---------------------------------------------------------------------------------
# parser


def _decode_text(data: bytes, path: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FileFormatError(
            path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be decoded)", line
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_scalar(tokens: list[_Tok], i: int, name: str, line: int, path: str) -> tuple[Scalar, int]:
    """Parse the value of field ``name`` starting at ``tokens[i]``; returns (value, next i)."""
    tok = tokens[i]
    if tok.kind == "string":
        parts = [tok.value]
        i += 1
        while tokens[i].kind == "string":  # "a" "b" concatenates, as in C
            parts.append(tokens[i].value)
            i += 1
        return "".join(parts), i
    if tok.kind == "number":
        return tok.value, i + 1
    if tok.kind == "ident":
        word = tok.value
        if tokens[i + 1].kind in (":", "{", "<"):
            # ``num_output:`` followed by the next field's name: the value is missing
            raise FileFormatError(path, f"missing value for field '{name}'", line)
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word], i + 1
        negative = word.startswith("-")
        special = _FLOAT_WORDS.get(word.lstrip("-").lower())
        if special is not None:
            return (-special if negative else special), i + 1
        if negative:
            raise FileFormatError(path, f"invalid value {word!r} for field '{name}'", tok.line)
        return EnumValue(word), i + 1
    raise FileFormatError(path, f"missing value for field '{name}' (got {_describe(tok)})", line)


def _skip_separator(tokens: list[_Tok], i: int) -> int:
    return i + 1 if tokens[i].kind in (",", ";") else i


def _parse_tokens(tokens: list[_Tok], path: str) -> Message:
    root = Message()
    root.line = 1
    # open blocks: (parent message, field name, line, closing token)
    stack: list[tuple[Message, str, int, str]] = []
    current = root
    i = 0
    while True:
        tok = tokens[i]
        i += 1
        if tok.kind == "eof":
            if stack:
                _, name, line, closer = stack[-1]
                raise FileFormatError(
                    path,
                    f"unbalanced braces: '{name}' block opened at line {line} is never closed "
                    f"(end of file reached, expected '{closer}')",
                    line,
                )
            return root
        if tok.kind in ("}", ">"):
            if not stack:
                raise FileFormatError(path, f"unexpected '{tok.kind}' (no block is open)", tok.line)
            parent, name, line, closer = stack.pop()
            if tok.kind != closer:
                raise FileFormatError(
                    path,
                    f"unexpected '{tok.kind}': block '{name}' opened at line {line} "
                    f"must close with '{closer}'",
                    tok.line,
                )
            current = parent
            i = _skip_separator(tokens, i)
            continue
        if tok.kind == "[":
            raise FileFormatError(
                path, "extension and Any fields ('[...]') are not supported", tok.line
            )
        if tok.kind != "ident" or tok.value.startswith("-"):
            raise FileFormatError(path, f"expected a field name, got {_describe(tok)}", tok.line)
        name, line = tok.value, tok.line
        nxt = tokens[i]
        i += 1
        colon = nxt.kind == ":"
        if colon:
            nxt = tokens[i]
            i += 1
        if nxt.kind in ("{", "<"):
            child = Message()
            child.line = line
            current.add(name, child, line)
            stack.append((current, name, line, "}" if nxt.kind == "{" else ">"))
            current = child
            continue
        if not colon:
            raise FileFormatError(
                path, f"expected ':' or '{{' after field name '{name}', got {_describe(nxt)}", line
            )
        if nxt.kind == "[":  # ``dim: [1, 3, 224, 224]``
            if tokens[i].kind == "]":
                i += 1
            else:
                while True:
                    if tokens[i].kind in ("{", "<"):
                        raise FileFormatError(
                            path, f"lists of messages ('{name}: [{{...}}]') are not supported", line
                        )
                    value, i = _read_scalar(tokens, i, name, line, path)
                    current.add(name, value, line)
                    if tokens[i].kind == ",":
                        i += 1
                    elif tokens[i].kind == "]":
                        i += 1
                        break
                    else:
                        raise FileFormatError(
                            path,
                            f"expected ',' or ']' in the list of '{name}', got {_describe(tokens[i])}",
                            tokens[i].line,
                        )
        else:
            value, i = _read_scalar(tokens, i - 1, name, line, path)
            current.add(name, value, line)
        i = _skip_separator(tokens, i)


def parse_text_message(text: str | bytes, path: str | os.PathLike = "<text>") -> Message:
    """Parse protobuf text format (schema-free) into a :class:`Message`.

    Args:
        text: the text, or its UTF-8 bytes.
        path: the name used in error messages.

    Raises:
        FileFormatError: a syntax error (unterminated string, unexpected ``}``, a
            field without value, an unclosed block, bytes that are not UTF-8, ...),
            naming ``path`` and the line.
    """
    path = str(path)
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = _decode_text(bytes(text), path)
    elif text.startswith("\ufeff"):
        text = text[1:]
    return _parse_tokens(_tokenize(text, path), path)


def _load_source(source: str | bytes | os.PathLike) -> tuple[str | bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<text>"
    if isinstance(source, os.PathLike):
        return read_bytes(source, "prototxt"), str(source)
    if isinstance(source, str):
        if "\n" in source or "{" in source:
            return source, "<text>"
        return read_bytes(source, "prototxt"), source
    raise TypeError(f"expected a path or prototxt text, got {type(source).__name__}")


# ---------------------------------------------------------------------------------
# Caffe view

#: Legacy ``V1LayerParameter.LayerType`` enum: identifier -> (number, new-style type).
V1_LAYER_TYPES: dict[str, tuple[int, str]] = {
    "NONE": (0, ""),
    "ABSVAL": (35, "AbsVal"),
    "ACCURACY": (1, "Accuracy"),
    "ARGMAX": (30, "ArgMax"),
    "BNLL": (2, "BNLL"),
    "CONCAT": (3, "Concat"),
    "CONTRASTIVE_LOSS": (37, "ContrastiveLoss"),
    "CONVOLUTION": (4, "Convolution"),
    "DATA": (5, "Data"),
    "DECONVOLUTION": (39, "Deconvolution"),
    "DROPOUT": (6, "Dropout"),
    "DUMMY_DATA": (32, "DummyData"),
    "EUCLIDEAN_LOSS": (7, "EuclideanLoss"),
    "ELTWISE": (25, "Eltwise"),
    "EXP": (38, "Exp"),
    "FLATTEN": (8, "Flatten"),
    "HDF5_DATA": (9, "HDF5Data"),
    "HDF5_OUTPUT": (10, "HDF5Output"),
    "HINGE_LOSS": (28, "HingeLoss"),
    "IM2COL": (11, "Im2col"),
    "IMAGE_DATA": (12, "ImageData"),
    "INFOGAIN_LOSS": (13, "InfogainLoss"),
    "INNER_PRODUCT": (14, "InnerProduct"),
    "LRN": (15, "LRN"),
    "MEMORY_DATA": (29, "MemoryData"),
    "MULTINOMIAL_LOGISTIC_LOSS": (16, "MultinomialLogisticLoss"),
    "MVN": (34, "MVN"),
    "POOLING": (17, "Pooling"),
    "POWER": (26, "Power"),
    "RELU": (18, "ReLU"),
    "SIGMOID": (19, "Sigmoid"),
    "SIGMOID_CROSS_ENTROPY_LOSS": (27, "SigmoidCrossEntropyLoss"),
    "SILENCE": (36, "Silence"),
    "SOFTMAX": (20, "Softmax"),
    "SOFTMAX_LOSS": (21, "SoftmaxWithLoss"),
    "SPLIT": (22, "Split"),
    "SLICE": (33, "Slice"),
    "TANH": (23, "TanH"),
    "WINDOW_DATA": (24, "WindowData"),
    "THRESHOLD": (31, "Threshold"),
}
_V1_TYPE_BY_NUMBER = {number: new for number, new in V1_LAYER_TYPES.values()}

#: The ``*_param`` sub-message that configures each layer type.
PARAM_FIELD_BY_TYPE: dict[str, str] = {
    "Accuracy": "accuracy_param",
    "ArgMax": "argmax_param",
    "BatchNorm": "batch_norm_param",
    "Bias": "bias_param",
    "Clip": "clip_param",
    "Concat": "concat_param",
    "Convolution": "convolution_param",
    "Crop": "crop_param",
    "Data": "data_param",
    "Deconvolution": "convolution_param",
    "Dropout": "dropout_param",
    "ELU": "elu_param",
    "Eltwise": "eltwise_param",
    "Embed": "embed_param",
    "Exp": "exp_param",
    "Flatten": "flatten_param",
    "InnerProduct": "inner_product_param",
    "Input": "input_param",
    "LRN": "lrn_param",
    "Log": "log_param",
    "MVN": "mvn_param",
    "PReLU": "prelu_param",
    "Pooling": "pooling_param",
    "Power": "power_param",
    "Reduction": "reduction_param",
    "ReLU": "relu_param",
    "Reshape": "reshape_param",
    "Scale": "scale_param",
    "Sigmoid": "sigmoid_param",
    "Slice": "slice_param",
    "Softmax": "softmax_param",
    "SoftmaxWithLoss": "softmax_param",
    "Swish": "swish_param",
    "TanH": "tanh_param",
    "Threshold": "threshold_param",
    "Tile": "tile_param",
}

_LAYER_CORE_FIELDS = ("name", "type", "bottom", "top", "blobs")


def _is_message_field(name: str) -> bool:
    """Whether a LayerParameter field holds a sub-message (``*_param``, ``param``, rules)."""
    return name.endswith("_param") or name in ("param", "include", "exclude")


_V1_PARAM_SPEC_FIELDS = ("param", "blob_share_mode", "blobs_lr", "weight_decay")



def _layer_type(msg: Message, legacy: bool, label: str, path: str) -> str:
    """A layer's type string (a V1 enum type upgraded to its new-style name)."""
    raw_type = msg.get("type", "")
    where = msg.line_of("type") or msg.line
    if legacy:
        if isinstance(raw_type, EnumValue) and str(raw_type) in V1_LAYER_TYPES:
            return V1_LAYER_TYPES[str(raw_type)][1]
        if isinstance(raw_type, int) and not isinstance(raw_type, bool) and raw_type in _V1_TYPE_BY_NUMBER:
            return _V1_TYPE_BY_NUMBER[raw_type]
        raise FileFormatError(path, f"{label}: unknown legacy layer type {raw_type!r}", where)
    if not isinstance(raw_type, str) or isinstance(raw_type, EnumValue):
        raise FileFormatError(
            path, f"{label}: type must be a quoted string (legacy V1 enum types belong in 'layers')", where
        )
    return raw_type


def _string_list(msg: Message, key: str, label: str, path: str) -> list[str]:
    """Every ``key`` value of a layer, each a quoted string."""
    values = msg.get_all(key)
    for value in values:
        if not isinstance(value, str) or isinstance(value, EnumValue):
            raise FileFormatError(path, f"{label}: every '{key}' must be a quoted string", msg.line_of(key) or msg.line)
    return values


def _layer_params(msg: Message, legacy: bool, label: str, path: str) -> tuple[Message, dict[str, list]]:
    """A layer's fields other than name / type / bottom / top, and (V1) its per-blob specs."""
    params = Message()
    params.line = msg.line
    v1_specs: dict[str, list] = {}
    for f in msg._fields:
        if f.name in ("name", "type", "bottom", "top"):
            continue
        if f.name == "blobs":
            raise FileFormatError(path, f"{label}: 'blobs' are not supported in a prototxt", f.line)
        if legacy and f.name in _V1_PARAM_SPEC_FIELDS:
            v1_specs.setdefault(f.name, []).append(f.value)
            continue
        if _is_message_field(f.name) and not isinstance(f.value, Message):
            raise FileFormatError(path, f"{label}: '{f.name}' must be a block {{ ... }}, got {f.value!r}", f.line)
        if legacy and f.name == "layer":
            raise FileFormatError(
                path, f"{label}: V0 layer definitions are not supported (upgrade the net with Caffe first)", f.line
            )
        params._fields.append(f)
    return params, v1_specs


def _upgraded_param_specs(v1_specs: dict[str, list]) -> list:
    """V1 ``blobs_lr`` / ``weight_decay`` / ``param`` / ``blob_share_mode`` as ``param`` specs
    (Caffe's own upgrade)."""
    specs = []
    for k in range(max(len(v) for v in v1_specs.values())):
        spec = Message()
        for old, new in (("param", "name"), ("blob_share_mode", "share_mode"), ("blobs_lr", "lr_mult"),
                         ("weight_decay", "decay_mult")):
            values = v1_specs.get(old, [])
            if k < len(values):
                spec.add(new, values[k])
        specs.append(Field("param", spec, None))
    return specs


class CaffeLayer:
    """One Caffe layer: name, type, bottom/top blob names, parameters and weights.

    Args:
        name: the layer name.
        type: the new-style type string (``"Convolution"``, ``"ReLU"``, ...).
        bottoms: input blob names.
        tops: output blob names (in-place layers repeat a bottom).
        params: every other ``LayerParameter`` field (``convolution_param``,
            ``param``, ``include``, ``phase``, ...) as a :class:`Message` or a
            mapping accepted by ``Message(...)``.
        blobs: the learned blobs (weights, bias, BN statistics) as arrays; they
            are stored as float32. Empty for a layer read from a prototxt.
        line: the 1-based line of the ``layer`` field in a prototxt, else ``None``.
    """

    __slots__ = ("name", "type", "bottoms", "tops", "params", "blobs", "line")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        name: str,
        type: str,
        bottoms: Iterable[str] = (),
        tops: Iterable[str] = (),
        params: Message | Mapping[str, Any] | None = None,
        blobs: Iterable["ArrayLike"] = (),
        line: int | None = None,
    ) -> None:
        for label, value in (("bottoms", bottoms), ("tops", tops)):
            if isinstance(value, str):
                raise TypeError(f"layer {name!r}: {label} must be a list of names, not a str")
        self.name: str = name
        self.type: str = type
        self.bottoms: list[str] = list(bottoms)
        self.tops: list[str] = list(tops)
        if params is None:
            params = Message()
        elif not isinstance(params, Message):
            params = Message(params)
        for core in _LAYER_CORE_FIELDS:
            if core in params:
                raise ValueError(f"layer {name!r}: '{core}' belongs in the layer, not in params")
        self.params: Message = params
        self.blobs: list[np.ndarray] = [np.asarray(b, dtype=np.float32) for b in blobs]
        self.line: int | None = line

    @property
    def type_params(self) -> Message:
        """The ``*_param`` message for this layer's type (empty when absent or unknown)."""
        field = PARAM_FIELD_BY_TYPE.get(self.type)
        return self.params.get_message(field) if field else Message()

    def to_message(self) -> Message:
        """The ``LayerParameter`` as a message (name, type, bottoms, tops, params; no blobs)."""
        msg = Message()
        msg.line = self.line
        msg.add("name", self.name).add("type", self.type)
        msg.extend("bottom", self.bottoms).extend("top", self.tops)
        msg._fields.extend(self.params._fields)
        return msg

    @classmethod
    def from_message(
        cls,
        msg: Message,
        *,
        legacy: bool = False,
        path: str = "<text>",
        blobs: Iterable["ArrayLike"] = (),
    ) -> "CaffeLayer":
        """Build a layer from a ``LayerParameter`` (or, with ``legacy``, a V1) message.

        A V1 layer's enum type becomes the new-style string and its ``blobs_lr`` /
        ``weight_decay`` / ``param`` / ``blob_share_mode`` become ``param`` specs,
        as Caffe's own upgrade does.

        Raises:
            FileFormatError: a missing or mistyped name/type/bottom/top, or an
                unknown V1 type.
        """
        where = "layers" if legacy else "layer"
        name = msg.get("name", "")
        if not isinstance(name, str) or isinstance(name, EnumValue):
            raise FileFormatError(
                path, f"{where} name must be a quoted string", msg.line_of("name") or msg.line
            )
        label = f"{where} {name!r}" if name else f"unnamed {where}"
        type_ = _layer_type(msg, legacy, label, path)
        lists = {key: _string_list(msg, key, label, path) for key in ("bottom", "top")}
        params, v1_specs = _layer_params(msg, legacy, label, path)
        if v1_specs:
            params._fields[0:0] = _upgraded_param_specs(v1_specs)
        return cls(name, type_, lists["bottom"], lists["top"], params, blobs, msg.line)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CaffeLayer):
            return NotImplemented
        return (
            self.name == other.name
            and self.type == other.type
            and self.bottoms == other.bottoms
            and self.tops == other.tops
            and self.params == other.params
            and len(self.blobs) == len(other.blobs)
            and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.blobs, other.blobs)
            )
        )

    def __repr__(self) -> str:
        shapes = [tuple(b.shape) for b in self.blobs]
        return (
            f"CaffeLayer(name={self.name!r}, type={self.type!r}, bottoms={self.bottoms!r}, "
            f"tops={self.tops!r}, params={self.params!r}, blobs={shapes!r})"
        )


def _shape_of(msg: Any, path: str, what: str, line: int | None) -> tuple[int, ...]:
    if not isinstance(msg, Message):
        raise FileFormatError(path, f"{what} must be a message with 'dim' fields", line)
    dims = msg.get_all("dim")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise FileFormatError(
                path, f"{what}: every dim must be an integer, got {d!r}", msg.line or line
            )
    return tuple(int(d) for d in dims)


class CaffeNet:
    """A Caffe network definition: name, declared inputs and layers in file order.

    Args:
        name: the net name.
        layers: the layers (legacy ``layers`` entries already upgraded).
        inputs: inputs declared the legacy way (``input:`` + ``input_shape``),
            name -> shape. Inputs made by ``Input`` layers are layers instead;
            :attr:`inputs` reports both.
        header: other ``NetParameter`` fields (``force_backward``, ``state``, ...),
            written back unchanged.
        source: where the net was read from, for messages.
    """

    def __init__(
        self,
        name: str = "",
        layers: Iterable[CaffeLayer] = (),
        inputs: Mapping[str, Iterable[int]] | None = None,
        *,
        header: Message | Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> None:
        self.name: str = name
        self.layers: list[CaffeLayer] = list(layers)
        self.declared_inputs: dict[str, tuple[int, ...]] = {
            k: tuple(int(d) for d in v) for k, v in (inputs or {}).items()
        }
        if header is None:
            header = Message()
        elif not isinstance(header, Message):
            header = Message(header)
        self.header: Message = header
        self.source: str | None = source

    @property
    def inputs(self) -> dict[str, tuple[int, ...]]:
        """Every network input, name -> shape: legacy declarations, then ``Input`` layer tops.

        An ``Input`` layer with one shape gives it to all its tops (Caffe's rule);
        an input whose shape is not given maps to ``()``.
        """
        out = dict(self.declared_inputs)
        for layer in self.layers:
            if layer.type != "Input":
                continue
            shapes = [
                _shape_of(
                    s, self.source or "<net>", f"layer {layer.name!r} input_param.shape", layer.line
                )
                for s in layer.type_params.get_all("shape")
            ]
            if len(shapes) not in (0, 1, len(layer.tops)):
                raise FileFormatError(
                    self.source or "<net>",
                    f"Input layer {layer.name!r} has {len(layer.tops)} tops but {len(shapes)} shapes",
                    layer.line,
                )
            for k, top in enumerate(layer.tops):
                if len(shapes) == len(layer.tops):
                    out[top] = shapes[k]
                elif len(shapes) == 1:
                    out[top] = shapes[0]
                else:
                    out[top] = ()
        return out

    def layer(self, name: str) -> CaffeLayer:
        """The layer called ``name``.

        Raises:
            KeyError: no such layer (the message lists the names).
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(
            f"no layer named {name!r} (layers: {', '.join(l.name for l in self.layers)})"
        )

    def blobs_in_order(self) -> list[str]:
        """Every blob name once, in first-appearance order: inputs, then each layer's
        bottoms (external ones) and tops."""
        seen: dict[str, None] = dict.fromkeys(self.declared_inputs)
        for layer in self.layers:
            for blob in (*layer.bottoms, *layer.tops):
                seen.setdefault(blob, None)
        return list(seen)

    @classmethod
    def from_message(cls, msg: Message, source: str = "<text>") -> "CaffeNet":
        """Build the Caffe view of a parsed ``NetParameter`` message.

        Raises:
            FileFormatError: mixed ``layer``/``layers``, bad layer fields, or legacy
                input declarations whose shapes do not match the inputs.
        """
        new = [f for f in msg._fields if f.name == "layer"]
        old = [f for f in msg._fields if f.name == "layers"]
        if new and old:
            raise FileFormatError(
                source,
                "the net mixes new-style 'layer' and legacy 'layers' definitions",
                old[0].line,
            )
        layers = []
        for f in new or old:
            if not isinstance(f.value, Message):
                raise FileFormatError(source, f"'{f.name}' must be a block {{ ... }}", f.line)
            layers.append(CaffeLayer.from_message(f.value, legacy=bool(old), path=source))
        header = Message()
        header.line = msg.line
        header._fields = [f for f in msg._fields if f.name not in ("layer", "layers")]
        return cls._from_header(header, layers, source)

    @classmethod
    def _from_header(cls, header: Message, layers: list[CaffeLayer], source: str) -> "CaffeNet":
        """Split ``name`` and the legacy input fields off ``header`` and build the net."""
        name = header.get("name", "")
        if not isinstance(name, str) or isinstance(name, EnumValue):
            raise FileFormatError(
                source, "net name must be a quoted string", header.line_of("name")
            )
        names = header.get_all("input")
        for n in names:
            if not isinstance(n, str) or isinstance(n, EnumValue):
                raise FileFormatError(
                    source, "every 'input' must be a quoted string", header.line_of("input")
                )
        shapes_msgs = header.get_all("input_shape")
        dims = header.get_all("input_dim")
        inputs: dict[str, tuple[int, ...]] = {}
        if shapes_msgs:
            if len(shapes_msgs) != len(names):
                raise FileFormatError(
                    source,
                    f"{len(names)} 'input' names but {len(shapes_msgs)} 'input_shape' entries",
                    header.line_of("input_shape"),
                )
            for n, s in zip(names, shapes_msgs):
                inputs[n] = _shape_of(
                    s, source, f"input_shape of {n!r}", header.line_of("input_shape")
                )
        elif dims:
            if len(dims) != 4 * len(names) or any(
                isinstance(d, bool) or not isinstance(d, int) for d in dims
            ):
                raise FileFormatError(
                    source,
                    f"'input_dim' needs 4 integers per input ({len(names)} inputs, {len(dims)} values)",
                    header.line_of("input_dim"),
                )
            for k, n in enumerate(names):
                inputs[n] = tuple(int(d) for d in dims[4 * k : 4 * k + 4])
        else:
            inputs = {n: () for n in names}
        rest = Message()
        rest._fields = [
            f for f in header._fields if f.name not in ("name", "input", "input_shape", "input_dim")
        ]
        net = cls(name, layers, inputs, header=rest, source=source)
        net.inputs  # noqa: B018 - validates the Input layers' shapes now, with file and line
        return net

    def to_message(self) -> Message:
        """The whole ``NetParameter`` as a message (new-style ``layer`` entries)."""
        msg = Message()
        msg.add("name", self.name)
        msg._fields.extend(self.header._fields)
        for input_name, shape in self.declared_inputs.items():
            msg.add("input", input_name)
        for input_name, shape in self.declared_inputs.items():
            msg.add("input_shape", Message().extend("dim", shape))
        for layer in self.layers:
            msg.add("layer", layer.to_message())
        return msg

    def to_text(self) -> str:
        """Deploy prototxt text; :func:`parse_prototxt` reads it back to an equal net."""
        msg = self.to_message()
        lines: list[str] = []
        _format_fields(msg, 0, lines)
        return "".join(line + "\n" for line in lines)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CaffeNet):
            return NotImplemented
        return (
            self.name == other.name
            and self.declared_inputs == other.declared_inputs
            and self.header == other.header
            and self.layers == other.layers
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, inputs={self.inputs!r}, "
            f"layers=[{', '.join(repr(l.name) for l in self.layers)}])"
        )


def parse_prototxt(source: str | bytes | os.PathLike) -> CaffeNet:
    """Read a Caffe prototxt into a :class:`CaffeNet`.

    Args:
        source: a path (``os.PathLike``, or a ``str`` without newline or ``{``),
            or the prototxt text itself (``bytes``, or a ``str`` containing a
            newline or ``{``).

    Raises:
        FileFormatError: syntax errors and malformed layers, naming file and line.
        FileNotFoundError: the path does not exist.
    """
    data, path = _load_source(source)
    return CaffeNet.from_message(parse_text_message(data, path), source=path)


#: Layer types the NVDLA compiler's Caffe parser accepts (CaffeParser.cpp's parse table plus
#: the Dropout / Input / Flatten layers it handles itself).
COMPILER_LAYER_TYPES = frozenset({
    "BatchNorm", "Concat", "Convolution", "Deconvolution", "Dropout", "Eltwise", "Flatten", "InnerProduct",
    "Input", "LRN", "Pooling", "Power", "ReLU", "Scale", "Sigmoid", "Softmax", "SoftmaxWithLoss", "TanH",
})


class StructureProblem(NamedTuple):
    """One structural problem of a net: the layer (``""`` for the net), its line, what,
    and the layer's type."""

    layer: str
    line: int | None
    problem: str
    type: str = ""


def is_test_phase(layer: CaffeLayer) -> bool:
    """A layer whose own ``phase`` field is ``TEST``: the NVDLA compiler's parser skips it."""
    return str(layer.params.get("phase", "")) in ("TEST", "1")


def structure_problems(net: CaffeNet, known_types: Iterable[str] | None = None, *,
                       include: Callable[[CaffeLayer], bool] | None = None) -> list[StructureProblem]:
    """What makes a net unusable before any layer is built, in file order.

    No layers; a layer without a name or type, or with a name used before; a bottom blob
    that no earlier layer (or declared input) produces, which includes a layer reading
    its own top before anything wrote it; a type outside ``known_types`` (when given).
    Only layers ``include`` accepts are checked (default: those without ``phase: TEST``,
    as the compiler does).
    """
    problems: list[StructureProblem] = []
    include = include or (lambda layer: not is_test_phase(layer))
    layers = [layer for layer in net.layers if include(layer)]
    if not layers:
        problems.append(StructureProblem("", None, "the net has no layers"))
    known = None if known_types is None else frozenset(known_types)
    blobs = set(net.declared_inputs)
    names: dict[str, int | None] = {}
    for k, layer in enumerate(layers):
        label = layer.name or f"#{k}"
        if not layer.name:
            problems.append(StructureProblem(label, layer.line, "the layer has no name", layer.type))
        elif layer.name in names:
            where = f" (line {names[layer.name]})" if names[layer.name] else ""
            problems.append(StructureProblem(label, layer.line, f"layer name used twice{where}", layer.type))
        else:
            names[layer.name] = layer.line
        if not layer.type:
            problems.append(StructureProblem(label, layer.line, "the layer has no type"))
        elif known is not None and layer.type not in known:
            problems.append(StructureProblem(label, layer.line, f"layer type {layer.type!r} is not supported "
                                                                 f"(supported: {', '.join(sorted(known))})", layer.type))
        for b in layer.bottoms:
            if b not in blobs:
                what = "its own top, which nothing wrote before" if b in layer.tops else "not produced by any earlier layer"
                problems.append(StructureProblem(label, layer.line, f"bottom blob {b!r} is {what}", layer.type))
        blobs.update(layer.tops)
    return problems
