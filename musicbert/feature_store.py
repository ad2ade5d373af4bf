"""Bar features on disk, read back one layer (and any subset of its bars) at a time.

Evaluation needs the features of every chosen layer for every sampled bar, but fits its
probes one layer at a time. On the Lakh MIDI Dataset at BERT-base size that is
12 layers x 550k bars x 768 dims x 4 bytes = 20 GB per repeat: too much for RAM, and
never needed in RAM at once. :class:`FeatureStore` keeps them in a temporary file of
``float32 [layers, rows, dim]`` written batch by batch in whatever order the batches come
(inference packs bars by length), and gives back the rows of any bars of one layer in the
order asked for.

The file is read and written with plain file I/O, not a memory map: pages of a mapped file
that the process touches count in its resident memory, pages in the kernel's cache do not.

:class:`FeatureRows` is what the probes read features through: ``take(mask)`` returns a
fresh float array of the chosen rows, which the probe may scale in place. :class:`ArrayRows`
serves features already in memory; :meth:`FeatureStore.layer` serves stored ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

READ_CHUNK_BYTES = 16 << 20  # rows read from the file per call when gathering


class FeatureRows(Protocol):
    """One layer's features for a list of bars; ``take`` copies rows out (all when ``mask`` is None)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def take(self, mask: np.ndarray | None = None) -> np.ndarray: ...


class ArrayRows:
    """:class:`FeatureRows` over a 2-D array in memory (its dtype is kept)."""

    def __init__(self, x: np.ndarray) -> None:
        if x.ndim != 2:
            raise ValueError(f"features must be 2-D [bars, dim], got shape {x.shape}")
        self.x = x

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape

    def take(self, mask: np.ndarray | None = None) -> np.ndarray:
        return self.x.copy() if mask is None else self.x[mask]


class SubsetRows:
    """:class:`FeatureRows` over some rows (``index``) of another :class:`FeatureRows`."""

    def __init__(self, rows: FeatureRows, index: np.ndarray) -> None:
        self.rows, self.index = rows, np.asarray(index, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.index), self.rows.shape[1]

    def take(self, mask: np.ndarray | None = None) -> np.ndarray:
        return self.rows.take(self.index if mask is None else self.index[mask])


def as_rows(x: np.ndarray | FeatureRows) -> FeatureRows:
    """Arrays (and array-likes) are wrapped as float32 :class:`ArrayRows`; :class:`FeatureRows` pass through."""
    if isinstance(x, np.ndarray) or not hasattr(x, "take"):
        return ArrayRows(np.asarray(x, dtype=np.float32))
    return x


class FeatureStore:
    """``float32 [n_layers, n_bars, dim]`` in a temporary file under ``folder`` (the system's
    temporary folder when None), deleted on :meth:`close` or at the end of a ``with`` block.
    On Linux the file never has a name (``tempfile.TemporaryFile``): the system frees its
    space when the process ends, however it ends, so a killed evaluation leaves nothing.

    :meth:`write` stores the features of some bars (any bars, any order, each once);
    :meth:`read` / :meth:`layer` give them back by bar number.
    """

    def __init__(self, n_layers: int, n_bars: int, dim: int, folder: str | Path | None = None) -> None:
        self.n_layers, self.n_bars, self.dim = n_layers, n_bars, dim
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(prefix="features-", suffix=".f32", dir=folder)
        self._row_of_bar = np.full(n_bars, -1, dtype=np.int64)
        self._written = 0
        self._row_bytes = dim * 4

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _offset(self, layer: int, row: int) -> int:
        return (layer * self.n_bars + row) * self._row_bytes

    def write(self, bars: np.ndarray | list[int], features: np.ndarray) -> None:
        """Store ``features[l, i]`` (``float32 [n_layers, len(bars), dim]``) as bar ``bars[i]``'s layer ``l``."""
        bars = np.asarray(bars, dtype=np.int64)
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape != (self.n_layers, len(bars), self.dim):
            raise ValueError(f"features of shape {features.shape}, expected {(self.n_layers, len(bars), self.dim)}")
        if len(bars) == 0:
            return
        if (self._row_of_bar[bars] >= 0).any() or len(np.unique(bars)) != len(bars):
            raise ValueError("a bar's features were written twice")
        start = self._written
        for layer in range(self.n_layers):
            self._file.seek(self._offset(layer, start))
            self._file.write(features[layer].data)
        self._row_of_bar[bars] = np.arange(start, start + len(bars))
        self._written += len(bars)

    def read(self, layer: int, bars: np.ndarray) -> np.ndarray:
        """Fresh ``float32 [len(bars), dim]``: layer ``layer`` (0-based index) of the given bars, in that order.

        Reads the file in chunks of :data:`READ_CHUNK_BYTES`, so the only large array is the result.
        """
        rows = self._row_of_bar[np.asarray(bars, dtype=np.int64)]
        if (rows < 0).any():
            raise ValueError("features of a bar that was never written were asked for")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        chunk_rows = max(1, READ_CHUNK_BYTES // self._row_bytes)
        buffer = np.empty((chunk_rows, self.dim), dtype=np.float32)
        i = 0
        while i < len(sorted_rows):
            first = int(sorted_rows[i])
            n = min(chunk_rows, self._written - first)
            self._file.seek(self._offset(layer, first))
            got = self._file.readinto(buffer[:n].data)
            if got != n * self._row_bytes:
                raise OSError(f"feature file {self._file.name}: short read ({got} of {n * self._row_bytes} bytes)")
            end = int(np.searchsorted(sorted_rows, first + n, side="left"))
            out[order[i:end]] = buffer[sorted_rows[i:end] - first]
            i = end
        return out

    def layer(self, layer: int, bars: np.ndarray) -> "StoredRows":
        """:class:`FeatureRows` of layer ``layer`` (0-based index) for the given bars."""
        return StoredRows(self, layer, np.asarray(bars, dtype=np.int64))


class StoredRows:
    """:class:`FeatureRows` read from a :class:`FeatureStore` on every ``take``."""

    def __init__(self, store: FeatureStore, layer: int, bars: np.ndarray) -> None:
        self.store, self.layer_index, self.bars = store, layer, bars

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.bars), self.store.dim

    def take(self, mask: np.ndarray | None = None) -> np.ndarray:
        return self.store.read(self.layer_index, self.bars if mask is None else self.bars[mask])
