"""Reading WebDataset shards for the data pipeline: songs, and a shard's bars in a shuffled order.

Never raises for bad data: a shard that cannot be opened or read, and samples that do not
decode, are skipped with a :class:`DataWarning` naming them (songs read before a read error
are kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from musicbert.shards import Song


class DataWarning(UserWarning):
    """A shard or sample was skipped, or the data cannot be split as asked."""


def read_songs(url: str) -> Iterator[Song]:
    """Songs of one shard (local path or any URL WebDataset's ``gopen`` accepts), in file order.

    Never raises for bad data: a shard that cannot be opened or read, and samples that do
    not decode, are skipped with a :class:`DataWarning` naming them.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any failure to open means: skip this shard
        warnings.warn(f"skipping shard {url}: cannot open it: {exc}", DataWarning, stacklevel=2)
        return
    n = 0
    try:
        with stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                try:
                    song = Song.from_sample(sample, source=url)
                except Exception as exc:  # noqa: BLE001 - ShardFormatError or worse: skip the sample
                    warnings.warn(f"skipping sample {sample.get('__key__')} of shard {url}: {exc}", DataWarning, stacklevel=2)
                    continue
                n += 1
                yield song
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt tar
        warnings.warn(f"skipping the rest of shard {url} after {n} songs: cannot read it: {exc}", DataWarning, stacklevel=2)


@dataclass
class SongBars:
    """What the pipeline keeps of a song: tokens and bar offsets."""

    id: str
    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def n_bars(self) -> int:
        return len(self.offsets) - 1

    def bar(self, b: int) -> np.ndarray:
        return self.tokens[self.offsets[b] : self.offsets[b + 1]]


class ShuffledShard:
    """A shard's songs in memory, with its bars in a shuffled order."""

    def __init__(self, url: str, order_rng: np.random.Generator | None):
        self.url = url
        self.songs = [SongBars(s.id, s.tokens, s.offsets) for s in read_songs(url)]
        counts = np.array([s.n_bars for s in self.songs], dtype=np.int64)
        self.song_of = np.repeat(np.arange(len(self.songs)), counts)
        self.bar_of = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        if order_rng is not None and len(self.song_of):
            perm = order_rng.permutation(len(self.song_of))
            self.song_of, self.bar_of = self.song_of[perm], self.bar_of[perm]

    @property
    def n_bars(self) -> int:
        return len(self.song_of)

    def at(self, pos: int) -> tuple[SongBars, int]:
        return self.songs[self.song_of[pos]], int(self.bar_of[pos])
