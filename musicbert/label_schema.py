"""The per-bar labels, declared once: name, dtype and width of each (SPEC §3).

The shard format (:mod:`musicbert.shards`: one ``<name>.npy`` member per label), the
labeller (:class:`musicbert.tokenizer.labels.BarLabels`) and the probes' samples
(:class:`musicbert.probes.BarSample`) read their labels' shapes and types from
:data:`BAR_LABELS`; their fields carry the same names in the same order (a test checks it).
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

#: Where a kept bar stands among its song's bars; stored and sampled beside the labels.
BAR_INDEX = LabelField("bar_index", np.dtype(np.int32), None, "index of each kept bar among the song's bars")
