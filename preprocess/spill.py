"""The spill file format: the pool's results as bytes, without pickle.

:class:`~preprocess.reorder.InOrder` parks results that finish ahead of their turn in files
and reads them back later. What goes through it is the pool's result tuples:
``("ok", payload)`` with ``payload`` what the task returns (for the corpus run
``(sample, n_bars, n_tokens, n_notes)``: a WebDataset sample of ``str`` -> ``bytes``/``str``
and three ints), or ``("rejected", reason, message)``. This codec stores exactly that kind
of value -- tuples, lists, dicts with ``str`` keys; ``str``, ``int``, ``float``, ``bool``,
``None`` and ``bytes`` leaves -- and nothing else, so reading a file back can never run
code (the project loads no pickles on its data path).

A file is::

    MAGIC (8 bytes) | header length (8 bytes, little-endian) | header (JSON) | data

The header is ``{"size": len(data), "value": tree}``, where ``tree`` is the value in JSON
with every container and ``bytes`` leaf tagged so that the round trip is exact (a tuple
comes back a tuple, ``bytes`` come back ``bytes``): a list is a JSON array,
``{"tuple": [...]}`` a tuple, ``{"dict": {...}}`` a dict and ``{"bytes": [offset, length]}``
a ``bytes`` leaf, whose content lies at ``data[offset:offset + length]``. ``str``, ``int``,
``float`` (``inf`` and ``nan`` too: Python's ``json`` writes and reads them as
``Infinity``/``NaN``), ``bool`` and ``None`` are themselves. The large leaves (the ``.npy`` members)
thus go to the file as they are, never through JSON.

Types are checked exactly (``type(x) is int``, not ``isinstance``): a subclass such as
``numpy.float64`` or an ``IntEnum`` would come back as its base type, which is not an exact
round trip, so it is refused like any other type.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"MBSPILL1"
_LENGTH = struct.Struct("<Q")
_SCALARS = (str, int, float, bool, type(None))


def encode(value: Any) -> list[bytes]:
    """The file's content as chunks to write one after the other (``bytes`` leaves are not copied).

    Raises ``TypeError`` naming the type and where it is in ``value`` (e.g.
    ``value[1][0]['tokens.npy']``) for anything the format cannot store.
    """
    blobs: list[bytes] = []
    size = 0

    def tree(x: Any, where: str) -> Any:
        nonlocal size
        kind = type(x)
        if kind in _SCALARS:
            return x
        if kind is bytes:
            offset = size
            blobs.append(x)
            size += len(x)
            return {"bytes": [offset, len(x)]}
        if kind is list:
            return [tree(item, f"{where}[{i}]") for i, item in enumerate(x)]
        if kind is tuple:
            return {"tuple": [tree(item, f"{where}[{i}]") for i, item in enumerate(x)]}
        if kind is dict:
            for key in x:
                if type(key) is not str:
                    raise TypeError(f"spill codec: dict key {key!r} of type {_name(type(key))} at {where}; keys must be str")
            return {"dict": {key: tree(item, f"{where}[{key!r}]") for key, item in x.items()}}
        raise TypeError(
            f"spill codec cannot store a {_name(kind)} (at {where}); it stores tuple, list, dict with str keys, "
            "str, int, float, bool, None and bytes"
        )

    encoded = tree(value, "value")  # before ``size`` is read: it counts the bytes leaves
    header = json.dumps({"size": size, "value": encoded}).encode("ascii")
    return [MAGIC, _LENGTH.pack(len(header)), header, *blobs]


def decode(data: bytes) -> Any:
    """The value that :func:`encode` stored in ``data``; ``ValueError`` saying what is wrong if it is not such a file."""
    fixed = len(MAGIC) + _LENGTH.size
    if len(data) < fixed or not data.startswith(MAGIC):
        raise ValueError(f"not a spill file (no {MAGIC!r} header) or truncated: {len(data)} bytes")
    (header_length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if fixed + header_length > len(data):
        raise ValueError(f"truncated: the header needs {header_length} bytes, {len(data) - fixed} present")
    header = json.loads(data[fixed : fixed + header_length])  # ValueError (JSONDecodeError, UnicodeDecodeError) if corrupt
    if type(header) is not dict or set(header) != {"size", "value"} or type(header["size"]) is not int:
        raise ValueError("corrupt header: expected {'size': int, 'value': ...}")
    blob = memoryview(data)[fixed + header_length :]
    if len(blob) != header["size"]:
        raise ValueError(f"truncated or overlong: {len(blob)} data bytes, the header says {header['size']}")

    def value(x: Any) -> Any:
        if type(x) in _SCALARS:
            return x
        if type(x) is list:
            return [value(item) for item in x]
        if type(x) is dict and len(x) == 1:
            ((tag, content),) = x.items()
            if tag == "tuple" and type(content) is list:
                return tuple(value(item) for item in content)
            if tag == "dict" and type(content) is dict:
                return {key: value(item) for key, item in content.items()}
            if tag == "bytes" and type(content) is list and len(content) == 2 and all(type(n) is int and n >= 0 for n in content):
                offset, length = content
                if offset + length > len(blob):
                    raise ValueError(f"corrupt header: bytes at {offset}+{length} lie past the {len(blob)} data bytes")
                return bytes(blob[offset : offset + length])
        raise ValueError(f"corrupt header: unknown node {str(x)[:80]}")

    return value(header["value"])


def _name(kind: type) -> str:
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


__all__ = ["MAGIC", "decode", "encode"]
