"""Per-bar labels of the kept bars (SPEC §3), computed from the bar's notes (all of them,
also those past a 512-token cut).

============ ============================================================ =============
label        definition                                                   shape, dtype
============ ============================================================ =============
instruments  programs playing in the bar (drums = 128), multi-hot         [K, 129] u8
chords       chords whose segment starts in the bar (:mod:`.chords`)       [K, 84] u8
groove       onset positions used in the bar (0..47), multi-hot          [K, 48] u8
tempo        the bar's ``Tempo_`` bin index (0..31)                        [K] u8
velocity     mean raw MIDI velocity of the bar's notes                     [K] f32
duration     mean ``Duration_`` bin index of the bar's notes               [K] f32
============ ============================================================ =============

(names, dtypes and widths as :data:`musicbert.label_schema.BAR_LABELS` declares them)

Chords are recognised on the whole song (beats of 12 grid steps from the song's first
bar), from the quantised, pedal-extended non-drum notes, then read off per kept bar.
"""

from __future__ import annotations

import numpy as np

from musicbert.label_schema import N_INSTRUMENTS, BarLabels
from musicbert.tokenizer.chords import N_CHORDS, song_chord_labels
from musicbert.tokenizer.midi import NoteTable
from musicbert.tokenizer.remi import RemiSong
from musicbert.vocab import BEATS_PER_BAR, POSITIONS_PER_BAR, POSITIONS_PER_BEAT


def bar_labels(table: NoteTable, remi: RemiSong, chords: bool = True) -> BarLabels:
    """Labels of ``remi``'s kept bars (``chords=False`` leaves the chord labels zero)."""
    K = len(remi.kept)
    row = np.full(remi.n_bars, -1, dtype=np.int64)
    row[remi.kept] = np.arange(K)
    r = row[remi.note_bar]
    m = r >= 0
    rk = r[m]
    order = remi.order[m]
    program = table.program[order]
    position = table.onset[order] % POSITIONS_PER_BAR

    instruments = np.zeros((K, N_INSTRUMENTS), dtype=np.uint8)
    instruments[rk, program] = 1
    groove = np.zeros((K, POSITIONS_PER_BAR), dtype=np.uint8)
    groove[rk, position] = 1
    count = np.bincount(rk, minlength=K).astype(np.float64)
    velocity = np.bincount(rk, weights=table.velocity[order], minlength=K) / count
    duration = np.bincount(rk, weights=remi.duration_bin[m], minlength=K) / count

    if chords:
        start = table.onset - remi.first_bar * POSITIONS_PER_BAR
        chord_all = song_chord_labels(
            start, start + table.duration, table.pitch, table.velocity, table.is_drum,
            POSITIONS_PER_BEAT, remi.n_bars, BEATS_PER_BAR,
        )
        chord = np.ascontiguousarray(chord_all[remi.kept], dtype=np.uint8)
    else:
        chord = np.zeros((K, N_CHORDS), dtype=np.uint8)
    return BarLabels(
        instruments=instruments,
        chords=chord,
        groove=groove,
        tempo=remi.tempo_bin[remi.kept].astype(np.uint8),
        velocity=velocity.astype(np.float32),
        duration=duration.astype(np.float32),
    )
