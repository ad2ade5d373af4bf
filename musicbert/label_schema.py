"""The per-bar labels, declared once: name, dtype and width of each (SPEC §3).

:data:`BAR_LABELS` gives each label's shape and type; :class:`BarLabels` holds one array per
label. The labeller (:mod:`musicbert.tokenizer.labels`) returns a :class:`BarLabels`, and
the shard format's :class:`~musicbert.shards.Song` (one ``<name>.npy`` member per label)
and the probes' :class:`~musicbert.probes.BarSample` are :class:`BarLabels` with more
fields, so the label fields are written once, here (a test checks them against the table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from musicbert.tokenizer.chords import N_CHORDS
from musicbert.vocab import DRUM_PROGRAM, POSITIONS_PER_BAR

N_INSTRUMENTS = DRUM_PROGRAM + 1  # the 128 General MIDI programs, then drums


@dataclass(frozen=True)
class LabelField:
    """One per-bar array: ``dtype [n_bars]``, or ``dtype [n_bars, width]`` for a multi-hot label."""

    name: str
    dtype: np.dtype
    width: int | None  # None: one value per bar
    meaning: str

    @property
    def tail(self) -> tuple[int, ...]:
        """The array's shape after ``n_bars``."""
        return () if self.width is None else (self.width,)

    def zeros(self, n_bars: int = 0) -> np.ndarray:
        return np.zeros((n_bars, *self.tail), dtype=self.dtype)


_U8, _F32 = np.dtype(np.uint8), np.dtype(np.float32)

BAR_LABELS: tuple[LabelField, ...] = (
    LabelField("instruments", _U8, N_INSTRUMENTS, "multi-hot programs playing (drums = 128)"),
    LabelField("chords", _U8, N_CHORDS, "multi-hot chords starting in the bar (root*7+quality)"),
    LabelField("groove", _U8, POSITIONS_PER_BAR, "multi-hot onset positions used in the bar"),
    LabelField("tempo", _U8, None, "tempo bin index (0..31) of the bar"),
    LabelField("velocity", _F32, None, "mean raw MIDI velocity of the bar's notes"),
    LabelField("duration", _F32, None, "mean duration-bin index of the bar's notes"),
)
LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in BAR_LABELS)


@dataclass
class BarLabels:
    """One array per label of :data:`BAR_LABELS`, row ``i`` for bar ``i``."""

    instruments: np.ndarray
    chords: np.ndarray
    groove: np.ndarray
    tempo: np.ndarray
    velocity: np.ndarray
    duration: np.ndarray

    def label_arrays(self) -> dict[str, np.ndarray]:
        """``{label name: array}`` in the schema's order (the arrays themselves, not copies)."""
        return {name: getattr(self, name) for name in LABEL_NAMES}


#: Where a kept bar stands among its song's bars; stored and sampled beside the labels.
BAR_INDEX = LabelField("bar_index", np.dtype(np.int32), None, "index of each kept bar among the song's bars")
