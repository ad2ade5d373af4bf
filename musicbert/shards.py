"""The shard format: one WebDataset sample per song, and the manifest beside the shards.

This module is the contract between the preprocessor (writer) and everything that reads
shards (training pipeline, evaluation). Bump :data:`FORMAT_VERSION` on any change.

Sample members (key = song id, 16 hex digits of a hash of the song's path; the label
members are those of :data:`musicbert.label_schema.BAR_LABELS`):

============== ======== ================ ==============================================
member         dtype    shape            meaning
============== ======== ================ ==============================================
tokens.npy     uint16   (T,)             the song's kept bars, concatenated vocabulary ids
offsets.npy    int64    (n_bars + 1,)    bar b is ``tokens[offsets[b]:offsets[b + 1]]``
bar_index.npy  int32    (n_bars,)        index of each kept bar among the song's bars
instruments.npy uint8   (n_bars, 129)    multi-hot programs playing (drums = 128)
chords.npy     uint8    (n_bars, 84)     multi-hot chords starting in the bar (root*7+quality)
groove.npy     uint8    (n_bars, 48)     multi-hot onset positions used in the bar
tempo.npy      uint8    (n_bars,)        tempo bin index (0..31) of the bar
velocity.npy   float32  (n_bars,)        mean raw MIDI velocity of the bar's notes
duration.npy   float32  (n_bars,)        mean duration-bin index of the bar's notes
song.json      -        -                ``{"id", "path", "n_bars", "first_bar"}``
============== ======== ================ ==============================================

``first_bar`` is the bar of the MIDI file, counted in 4/4 bars from tick 0, that
``bar_index`` 0 stands for (the bar of the song's first note): bar ``bar_index[b] +
first_bar`` of the file is kept bar ``b``. It maps annotations made on the score to kept
bars (:mod:`musicbert.custom_labels`). The preprocessor (format 2) always writes it; a song
without it (e.g. synthetic test shards) has ``Song.first_bar = None`` and takes only song-level
annotations.

Nothing is pickled: arrays are decoded with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicbert.label_schema import BAR_INDEX, BAR_LABELS, BarLabels
from musicbert.vocab import VOCAB

FORMAT_NAME = "musicbert-shards"
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"

# member -> (dtype, trailing shape after n_bars); tokens and offsets are checked apart.
_LABELS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {f.name: (f.dtype, f.tail) for f in (BAR_INDEX, *BAR_LABELS)}


class ShardFormatError(ValueError):
    """A sample or manifest does not follow this format; the message names what and where."""


@dataclass
class Song(BarLabels):
    """One song's kept bars with their per-bar labels (the label fields of :class:`BarLabels`;
    see the module docstring). Build it with keywords."""

    id: str
    path: str
    tokens: np.ndarray
    offsets: np.ndarray
    bar_index: np.ndarray
    first_bar: int | None = None  # file bar (from tick 0) of bar_index 0; None when song.json lacks it

    @property
    def n_bars(self) -> int:
        return len(self.offsets) - 1

    def bar(self, b: int) -> np.ndarray:
        return self.tokens[self.offsets[b] : self.offsets[b + 1]]

    def validate(self) -> None:
        """Raise :class:`ShardFormatError` naming the song and member that is wrong."""
        where = f"song {self.id} ({self.path})"
        if self.tokens.dtype != np.uint16 or self.tokens.ndim != 1:
            raise ShardFormatError(f"{where}: tokens must be 1-D uint16, got {self.tokens.dtype} {self.tokens.shape}")
        if self.tokens.size and int(self.tokens.max()) >= len(VOCAB):
            raise ShardFormatError(f"{where}: token id {int(self.tokens.max())} outside the vocabulary")
        o = self.offsets
        if o.dtype != np.int64 or o.ndim != 1 or len(o) < 2 or o[0] != 0 or o[-1] != len(self.tokens) or np.any(np.diff(o) <= 0):
            raise ShardFormatError(f"{where}: offsets must be increasing int64 from 0 to len(tokens)")
        for name, (dtype, tail) in _LABELS.items():
            arr = getattr(self, name)
            if arr.dtype != dtype or arr.shape != (self.n_bars, *tail):
                raise ShardFormatError(
                    f"{where}: {name} must be {dtype} of shape {(self.n_bars, *tail)}, got {arr.dtype} {arr.shape}"
                )

    def to_sample(self) -> dict[str, bytes | str]:
        """The WebDataset sample (``__key__`` plus encoded members) for a tar writer."""
        self.validate()
        sample: dict[str, bytes | str] = {"__key__": self.id}
        for name in ("tokens", "offsets", *_LABELS):
            buf = io.BytesIO()
            np.save(buf, getattr(self, name), allow_pickle=False)
            sample[f"{name}.npy"] = buf.getvalue()
        meta = {"id": self.id, "path": self.path, "n_bars": self.n_bars}
        if self.first_bar is not None:
            meta["first_bar"] = int(self.first_bar)
        sample["song.json"] = json.dumps(meta).encode()
        return sample

    @classmethod
    def from_sample(cls, sample: dict, source: str = "?") -> "Song":
        """Decode a raw WebDataset sample (member name -> bytes); ``source`` names the shard in errors."""
        key = sample.get("__key__", "?")

        def array(name: str) -> np.ndarray:
            member = f"{name}.npy"
            if member not in sample:
                raise ShardFormatError(f"{source}: sample {key} has no member {member}")
            try:
                return np.load(io.BytesIO(sample[member]), allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is a format error
                raise ShardFormatError(f"{source}: sample {key} member {member} is not a valid .npy: {exc}") from exc

        try:
            meta = json.loads(sample["song.json"])
        except (KeyError, ValueError) as exc:
            raise ShardFormatError(f"{source}: sample {key} has no valid song.json: {exc}") from exc
        song = cls(
            id=str(meta.get("id", key)),
            path=str(meta.get("path", "")),
            tokens=array("tokens"),
            offsets=array("offsets"),
            **{name: array(name) for name in _LABELS},
            first_bar=None if meta.get("first_bar") is None else int(meta["first_bar"]),
        )
        song.validate()
        return song


@dataclass(frozen=True)
class SplitInfo:
    songs: int
    bars: int
    tokens: int
    shards: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: what a preprocessor run wrote and with which options."""

    root: Path
    splits: dict[str, SplitInfo]
    vocab_size: int
    vocab_sha256: str
    options: dict

    def shard_paths(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ShardFormatError(f"{self.root / MANIFEST}: no split {split!r}; it has {sorted(self.splits)}")
        return [str(self.root / name) for name in self.splits[split].shards]

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "vocab_sha256": self.vocab_sha256,
            "splits": {
                name: {"songs": s.songs, "bars": s.bars, "tokens": s.tokens, "shards": list(s.shards)}
                for name, s in self.splits.items()
            },
            "options": self.options,
        }


def read_manifest(root: str | Path) -> Manifest:
    """Read and check ``ROOT/manifest.json``; refuse other formats, versions or vocabularies."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ShardFormatError(f"{path}: not found; is {root} a folder written by `python -m preprocess`?")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ShardFormatError(f"{path}: not valid JSON: {exc}") from exc
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}, "
            f"this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}; preprocess the corpus again"
        )
    if data.get("vocab_sha256") != VOCAB.sha256:
        raise ShardFormatError(f"{path}: written with another vocabulary (hash differs); preprocess the corpus again")
    try:
        splits = {
            name: SplitInfo(int(s["songs"]), int(s["bars"]), int(s["tokens"]), tuple(s["shards"]))
            for name, s in data["splits"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardFormatError(f"{path}: malformed 'splits': {exc}") from exc
    return Manifest(root, splits, int(data["vocab_size"]), data["vocab_sha256"], dict(data.get("options", {})))
