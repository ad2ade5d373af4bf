"""Which bars the probes see: :func:`sample_split` draws bars with their labels from a split.

``per_song`` bars are drawn without replacement from each song of a split (all of them when
the song has fewer): 5 per train-split song to fit the probes, 10 per test-split song to
score them. Each repeat draws afresh; the draw for a song depends only on
``(seed, repeat, song id)``, so it does not change when other songs are added or removed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from musicbert.shard_reader import read_songs
from musicbert.label_schema import BAR_INDEX, BAR_LABELS, LABEL_NAMES, BarLabels
from musicbert.probes.metrics import ProbeError
from musicbert.shards import Song, read_manifest

TRAIN_BARS_PER_SONG = 5
TEST_BARS_PER_SONG = 10


@dataclass
class BarSample(BarLabels):
    """Bars drawn from one split, with their labels (the label fields of :class:`BarLabels`;
    row ``i`` of every array is bar ``i``). Build it with keywords."""

    bars: list[np.ndarray]  # token ids of each bar
    song: np.ndarray  # int64 [n]: index into song_ids of the bar's song
    song_ids: list[str]
    bar_index: np.ndarray  # int32 [n]: index of the bar among its song's bars

    def __len__(self) -> int:
        return len(self.bars)

    @property
    def n_songs(self) -> int:
        return len(np.unique(self.song)) if len(self.song) else 0

    @classmethod
    def empty(cls) -> "BarSample":
        return cls(bars=[], song=np.zeros(0, np.int64), song_ids=[], bar_index=BAR_INDEX.zeros(),
                   **{f.name: f.zeros() for f in BAR_LABELS})


class _SampleBuilder:
    def __init__(self) -> None:
        self.bars: list[np.ndarray] = []
        self.song: list[int] = []
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in (BAR_INDEX.name, *LABEL_NAMES)}

    def add(self, song: Song, song_no: int, chosen: np.ndarray) -> None:
        for b in chosen:
            self.bars.append(song.bar(int(b)).copy())  # a copy: a view would keep the song's whole token array alive
        self.song.extend([song_no] * len(chosen))
        for k, rows in self.rows.items():
            rows.append(getattr(song, k)[chosen])

    def build(self, song_ids: list[str]) -> BarSample:
        if not self.bars:
            out = BarSample.empty()
            out.song_ids = song_ids
            return out
        cat = {k: np.concatenate(v) for k, v in self.rows.items()}
        return BarSample(bars=self.bars, song=np.asarray(self.song, np.int64), song_ids=song_ids, **cat)


def _song_key(song_id: str) -> int:
    return zlib.crc32(song_id.encode())


def iter_split_songs(shards_dir: str | Path, split: str, max_songs: int | None = None) -> Iterable[Song]:
    """Songs of a split in manifest order (the first ``max_songs`` of them)."""
    manifest = read_manifest(shards_dir)
    n = 0
    for url in manifest.shard_paths(split):
        for song in read_songs(url):
            if max_songs is not None and n >= max_songs:
                return
            n += 1
            yield song


def sample_split(
    shards_dir: str | Path,
    split: str,
    per_song: int,
    repeats: int = 1,
    max_songs: int | None = None,
    max_bars: int | None = None,
    seed: int = 0,
    first_repeat: int = 0,
    progress: bool = False,
    desc: str = "sampling",
) -> list[BarSample]:
    """One :class:`BarSample` for each of the repeats ``first_repeat .. first_repeat + repeats - 1``,
    reading the split once (see the module docstring). Bars are copied out of their songs."""
    if per_song < 1 or repeats < 1 or first_repeat < 0:
        raise ProbeError(f"per_song ({per_song}) and repeats ({repeats}) must be >= 1, first_repeat ({first_repeat}) >= 0")
    builders = [_SampleBuilder() for _ in range(repeats)]
    song_ids: list[str] = []
    songs = iter_split_songs(shards_dir, split, max_songs)
    if progress:
        total = read_manifest(shards_dir).splits.get(split)
        total = total.songs if total else None
        songs = stage_progress(songs, desc, "song", None if total is None else min(total, max_songs or total))
    for song in songs:
        if song.n_bars == 0:
            continue
        song_no = len(song_ids)
        song_ids.append(song.id)
        for r, builder in enumerate(builders, start=first_repeat):
            rng = np.random.default_rng([seed, r, _song_key(song.id)])
            k = min(per_song, song.n_bars)
            chosen = np.sort(rng.choice(song.n_bars, size=k, replace=False))
            if max_bars is not None:
                chosen = chosen[: max(0, max_bars - len(builder.bars))]
            builder.add(song, song_no, chosen)
        if max_bars is not None and all(len(b.bars) >= max_bars for b in builders):
            break
    return [b.build(list(song_ids)) for b in builders]


def stage_progress(items: Iterable, desc: str, unit: str, total: int | None) -> Iterable:
    """``items`` behind a tqdm progress bar on stderr (stage name, rate and ETA)."""
    return tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True)

