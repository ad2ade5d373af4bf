"""Results that finish in any order, handed on in index order in bounded memory.

A worker pool that keeps every worker busy finishes tasks in any order; the shard writer
needs them in file order (that is what makes the output the same for any number of
workers). :class:`InOrder` sits between the two: a result whose index is within
``in_memory`` of the next one to hand on is kept in memory, and one further ahead (the
pool ran on past a slow file) is written to a file of its own in a private temporary
folder and read back when its turn comes. So memory holds at most ``in_memory`` results
however long a slow file holds up the order, and the disk holds only what is waiting.

What a spill file holds is up to the :class:`Codec` that ``InOrder`` is given (the pool's
is :mod:`preprocess.spill`: an explicit format that reading back cannot turn into running
code -- no pickles). Every value put is encoded, also one kept in memory, so a value the
codec cannot store fails at once, not only on the run where timing first makes it spill.
The files live in a folder only this object uses (``tempfile.mkdtemp``: mode 0700) and are
deleted as they are read and at :meth:`InOrder.close`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol


class Codec(Protocol):
    """How :class:`InOrder` turns a value into a spill file's content and back."""

    def encode(self, value: Any) -> list[bytes]:
        """The file's content, as chunks; ``TypeError`` for a value it cannot store."""

    def decode(self, data: bytes) -> Any:
        """The value back from the file's content; ``ValueError`` if ``data`` is not what ``encode`` wrote."""


class InOrder:
    """Put ``(index, value)`` for indices 0, 1, 2, ... in any order; :meth:`ready` yields them in order."""

    def __init__(self, in_memory: int, codec: Codec, spill_dir: str | Path | None = None) -> None:
        if in_memory < 1:
            raise ValueError(f"in_memory must be >= 1, got {in_memory}")
        self.in_memory = in_memory
        self.codec = codec
        self.spill_dir = spill_dir  # where the private spill folder goes (None: the system's temporary folder)
        self.next = 0  # the index ready() hands on next
        self.spilled = 0  # results that went through a file, in all
        self._held: dict[int, Any] = {}
        self._on_disk: set[int] = set()
        self._folder: Path | None = None

    def __len__(self) -> int:
        """Results waiting (in memory or on disk)."""
        return len(self._held) + len(self._on_disk)

    @property
    def held(self) -> int:
        """Results waiting in memory (never more than ``in_memory``)."""
        return len(self._held)

    def put(self, index: int, value: Any) -> None:
        if index < self.next or index in self._held or index in self._on_disk:
            raise ValueError(f"result {index} was already put")
        chunks = self.codec.encode(value)  # also for a value kept in memory: see the module docstring
        if index < self.next + self.in_memory:
            self._held[index] = value
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix=".spill-", dir=self.spill_dir))
        path = self._path(index)
        with open(path, "wb") as fh:
            fh.writelines(chunks)
        self._on_disk.add(index)
        self.spilled += 1

    def ready(self) -> Iterator[tuple[int, Any]]:
        """Pop ``(index, value)`` from ``next`` on while the next result is there."""
        while True:
            index = self.next
            if index in self._held:
                value = self._held.pop(index)
            elif index in self._on_disk:
                path = self._path(index)
                data = path.read_bytes()
                path.unlink()
                try:
                    value = self.codec.decode(data)
                except ValueError as exc:
                    raise ValueError(f"spill file {path} of result {index} is unreadable: {exc}") from exc
                self._on_disk.discard(index)
            else:
                return
            self.next += 1
            yield index, value

    def close(self) -> None:
        """Delete the spill folder (and whatever is still waiting in it)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._held.clear()
        self._on_disk.clear()

    def __enter__(self) -> "InOrder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _path(self, index: int) -> Path:
        assert self._folder is not None
        return self._folder / f"{index}.spill"


__all__ = ["Codec", "InOrder"]
