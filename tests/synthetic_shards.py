"""Small synthetic shard folders for data-pipeline tests (real ones come from the preprocessor).

Songs have bars of plausible bar-level REMI+ shape (``Bar_0 Position_0 Tempo_t``, then
``Position Instrument Pitch Velocity Duration`` per note, ``<eob>``) and zero labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from musicbert.label_schema import N_INSTRUMENTS
from musicbert.shards import Manifest, Song, SplitInfo
from musicbert.tokenizer.chords import N_CHORDS
from musicbert.vocab import VOCAB


def make_bar(rng: np.random.Generator, n_notes: int) -> np.ndarray:
    p0, _ = VOCAB.position_range
    i0, _ = VOCAB.instrument_range
    k0, _ = VOCAB.pitch_range
    v0, _ = VOCAB.velocity_range
    d0, _ = VOCAB.duration_range
    t0, _ = VOCAB.tempo_range
    notes = np.stack(
        [
            p0 + np.sort(rng.integers(0, 48, n_notes)),
            i0 + rng.integers(0, 129, n_notes),
            k0 + rng.integers(20, 108, n_notes),
            v0 + rng.integers(0, 32, n_notes),
            d0 + rng.integers(0, 58, n_notes),
        ],
        axis=1,
    ).reshape(-1)
    head = [VOCAB.bar_id, p0, t0 + int(rng.integers(0, 32))]
    return np.concatenate([head, notes, [VOCAB.eob_id]]).astype(np.uint16)


def make_song(rng: np.random.Generator, song_id: str, n_bars: int) -> Song:
    bars = [make_bar(rng, int(min(101, 6 + rng.geometric(1 / 20)))) for _ in range(n_bars)]
    lengths = np.array([len(b) for b in bars], dtype=np.int64)
    z = lambda *shape, dtype=np.uint8: np.zeros((n_bars, *shape), dtype=dtype)
    return Song(
        id=song_id,
        path=f"synthetic/{song_id}.mid",
        tokens=np.concatenate(bars),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        bar_index=np.arange(n_bars, dtype=np.int32),
        instruments=z(N_INSTRUMENTS),
        chords=z(N_CHORDS),
        groove=z(48),
        tempo=z(),
        velocity=z(dtype=np.float32),
        duration=z(dtype=np.float32),
    )


def make_shards(root: Path, splits: dict[str, list[int]], seed: int = 0, bars: tuple[int, int] = (1, 40)) -> Path:
    """Write ``root/<split>-NNNNNN.tar`` and ``manifest.json``; ``splits[name]`` = songs per shard."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos = {}
    counter = 0
    for split, per_shard in splits.items():
        names, n_songs, n_bars, n_tokens = [], 0, 0, 0
        for s, count in enumerate(per_shard):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as sink:
                for _ in range(count):
                    counter += 1
                    song = make_song(rng, f"{counter:016x}", int(rng.integers(bars[0], bars[1] + 1)))
                    sink.write(song.to_sample())
                    n_songs, n_bars, n_tokens = n_songs + 1, n_bars + song.n_bars, n_tokens + len(song.tokens)
            names.append(name)
        infos[split] = SplitInfo(n_songs, n_bars, n_tokens, tuple(names))
    return _write_manifest(root, infos)


def write_song_shards(root: Path, splits: dict[str, list[Song]]) -> Path:
    """Write given songs (e.g. from ``musicbert.tokenizer.encode.song_from_midifile``): one shard per split, and the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    infos = {}
    for split, songs in splits.items():
        name = f"{split}-000000.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for song in songs:
                sink.write(song.to_sample())
        infos[split] = SplitInfo(len(songs), sum(s.n_bars for s in songs), sum(len(s.tokens) for s in songs), (name,))
    return _write_manifest(root, infos)


def _write_manifest(root: Path, infos: dict[str, SplitInfo]) -> Path:
    manifest = Manifest(root, infos, len(VOCAB), VOCAB.sha256, {"synthetic": True})
    (root / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=1))
    return root


def all_bars(root: Path, split: str) -> list[tuple[int, ...]]:
    """Every bar of a split as a tuple of ids (for multiset comparisons)."""
    from musicbert.data import read_songs
    from musicbert.shards import read_manifest

    out = []
    for url in read_manifest(root).shard_paths(split):
        for song in read_songs(url):
            out += [tuple(int(t) for t in song.bar(b)) for b in range(song.n_bars)]
    return out
