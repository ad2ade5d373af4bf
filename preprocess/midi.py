"""Reading a MIDI file into a compact NumPy note table on the 12-per-quarter grid.

Steps (SPEC §1-2), in this order:

1. :func:`read_midi` - checks that cost nothing (empty, too large, no ``MThd``), then
   miditoolkit (mido underneath) with ``clip=True``: a data byte above 127, a common
   corruption in scraped MIDI, is clipped to 127 instead of losing the whole file.
   ``RIFF``/``RMID`` wrappers are unwrapped. Any parser exception -> ``unreadable``.
2. :func:`check_4_4` - every time-signature event must be 4/4; a file with none is
   4/4 (the MIDI standard's default; the reference rejected such files).
3. :func:`note_table` - per note, from every instrument (drums = miditoolkit's
   ``is_drum``, i.e. channel 10, program 128 in this table):

   * sustain pedal: the spans where CC 64 is ``>= 64`` (down) end at the next value
     ``< 64`` (up). A note whose end falls strictly inside a span is extended to the
     span's end (that is the pedal span overlapping the note's release). A pedal never
     released ends at the instrument's last note end. Applied on the raw ticks, before
     quantising, so it compares the real note-off with the real pedal-up;
   * onset snapped DOWN to the grid: ``onset = floor(start * 12 / tpb)``; the end moves
     by the same shift, so the duration is kept; duration in grid steps =
     ``round((end - start) * 12 / tpb)`` (half up), all in exact integer arithmetic
     (ticks per beat need not be a multiple of 12);
   * tempo map: miditoolkit's tempo changes, sorted by tick, as grid positions and BPM.

Everything after the parse is vectorised: a few NumPy operations per instrument.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import miditoolkit
import numpy as np

from musicbert.vocab import DRUM_PROGRAM, POSITIONS_PER_BEAT
from preprocess.errors import MidiRejected

PEDAL_CC = 64
PEDAL_DOWN = 64  # CC 64 value >= this is "down"


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one pathological file from taking unbounded memory or time."""

    max_file_bytes: int = 16 * 1024 * 1024  # the largest LMD-full file is about 3 MiB
    max_notes: int = 500_000  # LMD-full: the largest files have about 150k notes
    max_bars: int = 10_000  # song span from its first to its last note bar (~5.5 h at 120 BPM): too_long


@dataclass
class NoteTable:
    """All notes of a song, one entry per note (any order), plus the tempo map.

    Times are grid positions: 12 per quarter note, 48 per 4/4 bar, from the file's tick 0.
    """

    onset: np.ndarray  # int64, snapped down
    duration: np.ndarray  # int64, grid steps (rounded, after pedal), >= 0
    pitch: np.ndarray  # int64, 0..127
    velocity: np.ndarray  # int64, 1..127
    program: np.ndarray  # int64, 0..127, DRUM_PROGRAM (128) for drums
    tempo_pos: np.ndarray  # int64, grid positions of tempo changes, sorted
    tempo_bpm: np.ndarray  # float64
    ticks_per_beat: int

    def __len__(self) -> int:
        return len(self.onset)

    @property
    def is_drum(self) -> np.ndarray:
        return self.program == DRUM_PROGRAM


def read_midi(path: str | Path, limits: Limits = Limits()) -> miditoolkit.MidiFile:
    """Parse ``path`` with miditoolkit; raise :class:`MidiRejected` with a reason if it cannot be used."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise MidiRejected("unreadable", f"cannot stat file: {exc}") from None
    if size == 0:
        raise MidiRejected("empty_file", "file has 0 bytes")
    if size > limits.max_file_bytes:
        raise MidiRejected("too_large", f"file has {size} bytes, limit {limits.max_file_bytes}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MidiRejected("unreadable", f"cannot read file: {exc}") from None
    return parse_midi_bytes(data)


def parse_midi_bytes(data: bytes) -> miditoolkit.MidiFile:
    """Parse a MIDI file's bytes (see :func:`read_midi`)."""
    if data[:4] != b"MThd":
        start = data.find(b"MThd", 0, 4096) if data[:4] == b"RIFF" else -1
        if start < 0:
            raise MidiRejected("not_midi", f"no MThd header (file starts with {data[:8]!r})")
        data = data[start:]
    try:
        midi = miditoolkit.MidiFile(file=io.BytesIO(data), clip=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - mido raises OSError, EOFError, ValueError, KeyError...
        detail = str(exc) or ("the file ends early (truncated?)" if isinstance(exc, EOFError) else repr(exc))
        raise MidiRejected("unreadable", f"{type(exc).__name__}: {detail}") from None
    tpb = midi.ticks_per_beat
    if not 0 < tpb < 0x8000:
        raise MidiRejected("bad_timing", f"ticks per beat {tpb} (0 or SMPTE division) has no beat grid")
    return midi


def check_4_4(midi: miditoolkit.MidiFile) -> None:
    """Raise ``not_4_4`` unless every time-signature event is 4/4 (none at all counts as 4/4)."""
    sigs = [(ts.numerator, ts.denominator) for ts in midi.time_signature_changes]
    other = sorted({s for s in sigs if s != (4, 4)})
    if other:
        names = ", ".join(f"{n}/{d}" for n, d in other)
        raise MidiRejected("not_4_4", f"time signatures other than 4/4: {names} ({len(sigs)} time-signature events)")


def pedal_spans(times: np.ndarray, values: np.ndarray, last_end: int) -> tuple[np.ndarray, np.ndarray]:
    """``(down, up)`` tick arrays of the sustain-pedal spans from CC 64 events (any order)."""
    order = np.argsort(times, kind="stable")
    t = times[order]
    down = values[order] >= PEDAL_DOWN
    prev = np.concatenate([[False], down[:-1]])
    on = t[down & ~prev]
    off = t[~down & prev]
    if len(off) < len(on):  # still down at the end of the track
        off = np.append(off, max(int(last_end), int(on[-1])))
    keep = off > on
    return on[keep], off[keep]


def apply_pedal(end: np.ndarray, on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Extend every note end that falls strictly inside a pedal span ``(on, off)`` to ``off``."""
    if len(on) == 0:
        return end
    k = np.searchsorted(on, end, side="left") - 1  # last span that starts before the note ends
    kc = np.maximum(k, 0)
    inside = (k >= 0) & (end < off[kc])
    return np.where(inside, off[kc], end)


_NOTE_FIELDS = attrgetter("start", "end", "pitch", "velocity")
_CC_FIELDS = attrgetter("number", "time", "value")


def note_table(midi: miditoolkit.MidiFile, limits: Limits = Limits()) -> NoteTable:
    """The quantised, pedal-extended notes and the tempo map of a parsed file."""
    tpb = int(midi.ticks_per_beat)
    n_total = sum(len(inst.notes) for inst in midi.instruments)
    if n_total == 0:
        raise MidiRejected("no_notes", f"no notes in {len(midi.instruments)} instruments")
    if n_total > limits.max_notes:
        raise MidiRejected("too_large", f"{n_total} notes, limit {limits.max_notes}")

    parts, programs = [], []
    for inst in midi.instruments:
        if not inst.notes:
            continue
        arr = np.array(list(map(_NOTE_FIELDS, inst.notes)), dtype=np.int64)
        if inst.control_changes:
            cc = np.array(list(map(_CC_FIELDS, inst.control_changes)), dtype=np.int64)
            cc = cc[cc[:, 0] == PEDAL_CC]
            if len(cc):
                on, off = pedal_spans(cc[:, 1], cc[:, 2], arr[:, 1].max())
                arr[:, 1] = apply_pedal(arr[:, 1], on, off)
        parts.append(arr)
        programs.append(np.full(len(arr), DRUM_PROGRAM if inst.is_drum else int(inst.program), dtype=np.int64))
    notes = np.concatenate(parts)
    start, end = notes[:, 0], notes[:, 1]
    g = POSITIONS_PER_BEAT
    onset = (start * g) // tpb
    duration = np.maximum((end - start) * 2 * g + tpb, 0) // (2 * tpb)

    tempos = sorted(((int(t.time), float(t.tempo)) for t in midi.tempo_changes), key=lambda x: x[0])
    if not tempos:
        tempos = [(0, 120.0)]
    tempo_ticks = np.array([t for t, _ in tempos], dtype=np.int64)
    tempo_bpm = np.array([b for _, b in tempos], dtype=np.float64)
    return NoteTable(
        onset=onset,
        duration=duration,
        pitch=notes[:, 2],
        velocity=notes[:, 3],
        program=np.concatenate(programs),
        tempo_pos=(tempo_ticks * g) // tpb,
        tempo_bpm=tempo_bpm,
        ticks_per_beat=tpb,
    )


def nearest_bin(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Index of the nearest bin value (bins non-decreasing); ties and repeated values go to the first.

    Linear memory (a ``searchsorted``), unlike an ``argmin`` over a values x bins matrix.
    """
    values = np.asarray(values, dtype=np.float64)
    hi = np.clip(np.searchsorted(bins, values, side="left"), 1, len(bins) - 1)
    lo = hi - 1
    pick = np.where(values - bins[lo] <= bins[hi] - values, lo, hi)
    return np.searchsorted(bins, bins[pick], side="left")  # first index holding that value
