"""The spill file format: exact round trip of the pool's results, clear errors, no pickle."""

from __future__ import annotations

import enum
import math
import re

import numpy as np
import pytest

from preprocess import spill
from preprocess.reorder import InOrder

SAMPLE = {"__key__": "0123456789abcdef", "tokens.npy": bytes(range(256)) * 4096, "song.json": b'{"id": "x"}', "empty.npy": b""}

VALUES = [
    ("ok", (SAMPLE, 12, 3456, 789)),  # what encode_file returns, as the pool hands it on
    ("rejected", "timeout", "took longer than the 120 s limit; worker killed"),
    ("rejected", "error", "ZeroDivisionError: ä \u266b \U0001f3b5 \ud800 at x.py:3"),  # unicode, a lone surrogate
    {},
    (),
    [],
    ((1, (2, (3, ()))), [(), [()]], {"t": (None,)}),  # nested tuples and lists stay what they were
    {"tuple": [1], "dict": {}, "bytes": [0, 1]},  # keys that look like the format's tags
    [0, -1, 2**100, -(2**70), 1.5, -0.0, 1e308, math.inf, True, False, None, "", b""],
]


def round_trip(value):
    return spill.decode(b"".join(spill.encode(value)))


def exact(a, b) -> bool:
    """Equal and of the same types all the way down (``==`` says ``1 == 1.0 == True`` and ``(1,) != [1]`` only sometimes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(exact, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(exact(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_round_trip_is_exact(value):
    assert exact(round_trip(value), value)


def test_nan_comes_back_nan():
    assert math.isnan(round_trip([math.nan])[0])


def test_bytes_leaves_are_written_as_they_are():
    chunks = spill.encode(("ok", (SAMPLE, 1, 2, 3)))
    assert chunks[0] == spill.MAGIC
    assert chunks[3] is SAMPLE["tokens.npy"]  # not copied, not through JSON
    assert sum(map(len, chunks)) < len(SAMPLE["tokens.npy"]) + 1000


class Colour(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("value", "type_name", "where"),
    [
        (("ok", ({"__key__": "k"}, np.int64(3), 1, 1)), "numpy.int64", "value[1][1]"),
        (("ok", ({"tokens.npy": np.zeros(3)}, 1, 1, 1)), "numpy.ndarray", "value[1][0]['tokens.npy']"),
        ([np.float64(1.0)], "numpy.float64", "value[0]"),  # a float subclass would come back a float
        ({"a": [Colour.RED]}, r"[\w.]*Colour", "value['a'][0]"),
        ({"a": {1, 2}}, "set", "value['a']"),
        ([bytearray(b"x")], "bytearray", "value[0]"),
    ],
)
def test_unsupported_type_is_a_type_error_naming_type_and_place(value, type_name, where):
    with pytest.raises(TypeError, match=rf"cannot store a {type_name} \(at {re.escape(where)}\)"):
        spill.encode(value)


def test_non_str_dict_key_is_a_type_error():
    with pytest.raises(TypeError, match=r"dict key 1 of type int at value\[0\]"):
        spill.encode([{1: "a"}])


def rewrite_header(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with ``old`` replaced by ``new`` in its header (and the header's length fixed)."""
    n = int.from_bytes(data[8:16], "little")
    header = data[16 : 16 + n].replace(old, new, 1)
    assert header != data[16 : 16 + n]
    return data[:8] + len(header).to_bytes(8, "little") + header + data[16 + n :]


def test_truncated_or_corrupt_data_is_a_value_error():
    data = b"".join(spill.encode(("ok", (SAMPLE, 1, 2, 3))))
    for cut in (0, 5, 16, 40, len(data) - 1):
        with pytest.raises(ValueError, match="truncated|not a spill file"):
            spill.decode(data[:cut])
    with pytest.raises(ValueError, match="overlong"):
        spill.decode(data + b"x")
    with pytest.raises(ValueError, match="not a spill file"):
        spill.decode(b"\x80\x05" + data)  # e.g. a pickle
    with pytest.raises(ValueError, match="past the"):
        spill.decode(rewrite_header(data, b'"bytes": [0, ', b'"bytes": [99, '))
    with pytest.raises(ValueError, match="unknown node"):
        spill.decode(rewrite_header(data, b'{"tuple": ', b'{"tupel": '))
    with pytest.raises(ValueError, match="corrupt header"):
        spill.decode(rewrite_header(data, b'"size": ', b'"length": '))
    with pytest.raises(ValueError):
        spill.decode(data[:16] + b"!" + data[17:])  # the header is not JSON any more


def test_in_order_with_one_in_memory_spills_the_rest_and_deletes_its_folder(tmp_path):
    values = {i: ("ok", ({"__key__": f"{i:016x}", "tokens.npy": bytes([i]) * i}, i, i, i)) for i in range(30)}
    got = []
    with InOrder(in_memory=1, codec=spill, spill_dir=tmp_path) as ordered:
        for index in reversed(range(30)):  # every one but 0 arrives ahead of its turn
            ordered.put(index, values[index])
            got += list(ordered.ready())
        assert ordered.spilled == 29
    assert [i for i, _ in got] == list(range(30))
    assert all(exact(value, values[i]) for i, value in got)
    assert list(tmp_path.iterdir()) == []


def test_in_order_refuses_an_unsupported_value_at_put_even_if_kept_in_memory(tmp_path):
    with InOrder(in_memory=4, codec=spill, spill_dir=tmp_path) as ordered:
        with pytest.raises(TypeError, match=r"numpy.int64 \(at value\[1\]\[1\]\)"):
            ordered.put(0, ("ok", ({}, np.int64(1))))  # index 0: would be held, never spilled
        assert len(ordered) == 0


def test_in_order_names_a_truncated_spill_file(tmp_path):
    with InOrder(in_memory=1, codec=spill, spill_dir=tmp_path) as ordered:
        ordered.put(1, ("ok", SAMPLE))
        (path,) = tmp_path.glob(".spill-*/1.spill")
        path.write_bytes(path.read_bytes()[:1000])
        ordered.put(0, ("ok", {}))
        with pytest.raises(ValueError, match=rf"spill file {path} of result 1 is unreadable: truncated"):
            list(ordered.ready())
    assert list(tmp_path.iterdir()) == []
