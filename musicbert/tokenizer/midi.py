"""Reading a MIDI file into a compact NumPy note table on the 12-per-quarter grid.

Steps (SPEC §1-2), in this order:

1. :func:`read_midi` - checks that cost nothing (empty, too large, no ``MThd``), then mido
   with ``clip=True``: a data byte above 127, a common corruption in scraped MIDI, is
   clipped to 127 instead of losing the whole file. ``RIFF``/``RMID`` wrappers are
   unwrapped. Any parser exception -> ``unreadable``. :func:`read_events` then reads the
   notes, sustain pedal, tempo and time signatures of every track into a :class:`ParsedMidi`.
2. :func:`check_4_4` - every time-signature event (of any track) must be 4/4; a file with
   none is 4/4 (the MIDI standard's default; the reference rejected such files).
3. :func:`note_table` - pedal, quantisation and the tempo map, vectorised.

How notes are read (the reference's reading, pretty_midi's, SPEC §2). Per track, the open
notes are kept per (channel, pitch):

* a note-on with velocity > 0 opens a note;
* a note-off, or a note-on with velocity 0, closes *every* open note of that channel and
  pitch that began on an earlier tick, all ending at the note-off's tick. A pitch struck
  again before its note-off therefore gives two notes that end together (the first-in,
  first-out pairing of miditoolkit instead shifts every later pairing after one missing
  note-off, so notes hang on and the unpaired ones vanish);
* a note that began on the note-off's own tick stays open when earlier notes were closed
  (the usual "off, then on again" at one tick, written in the other order); when it was
  the only one open, it is a zero-length note and is dropped. So notes that start and end
  on the same tick never reach the tokens, as in the reference;
* a note-off with nothing open is ignored; a note-on never closed (a truncated file, or
  notes ended only by "all notes off") is dropped, as in the reference: its length is
  unknown. :attr:`ParsedMidi.unclosed` counts them;
* a note's instrument is the channel's program at its note-off (program changes act per
  track and channel, programs start at 0); channel 10 is drums (program 128 here). Notes
  are numbered per (program, channel, track) "instrument" in the order in which each
  instrument closes its first note, and kept in closing order; the token order breaks
  exact ties with these, as the reference does (:func:`musicbert.tokenizer.remi.encode_notes`).

Sustain pedal (CC 64, per track and channel): down at a value ``>= 64`` while up, up at a
value ``< 64`` while down; a pedal never released is ignored (reference). A note's end
becomes the end of the last pedal span that overlaps it (span start <= note end, span end
> note start), if that is later. Applied on raw ticks, before quantising.

Quantisation: ``onset = floor(start * 12 / tpb)`` (exact integers); the end moves with the
onset, so the duration in grid steps is ``round((end - start) / tpb * 12)`` in float64 with
halves to even, bit for bit the reference's Python ``round``.

Tempo map: ``set_tempo`` events of every track (the reference reads the first track only,
a defect), in tick order; the last event at tick 0 sets the initial tempo (120 BPM if none)
and later events that repeat the tempo in force are ignored, as in the reference.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np

from musicbert.tokenizer.errors import MidiRejected
from musicbert.vocab import DRUM_PROGRAM, POSITIONS_PER_BEAT

PEDAL_CC = 64
PEDAL_DOWN = 64  # CC 64 value >= this is "down"
DRUM_CHANNEL = 9  # channel 10 counted from 1
DEFAULT_BPM = 120.0


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one pathological file from taking unbounded memory or time."""

    max_file_bytes: int = 16 * 1024 * 1024  # the largest LMD-full file is about 3 MiB
    max_notes: int = 500_000  # LMD-full: the largest files have about 150k notes
    max_bars: int = 10_000  # song span from its first to its last note bar (~5.5 h at 120 BPM): too_long


@dataclass
class ParsedMidi:
    """What the preprocessor uses of a MIDI file, read as the module docstring says.

    Notes are in closing order (the order the reader completed them); ticks are absolute.
    """

    ticks_per_beat: int
    start: np.ndarray  # int64 ticks
    end: np.ndarray  # int64 ticks, > start
    pitch: np.ndarray  # int64
    velocity: np.ndarray  # int64, 1..127
    program: np.ndarray  # int64, 0..127, DRUM_PROGRAM for drums
    instrument: np.ndarray  # int64, (program, channel, track) numbered in order of first closed note
    pedal_group: np.ndarray  # int64, track * 16 + channel
    pedals: dict[int, tuple[np.ndarray, np.ndarray]]  # pedal_group -> CC 64 (ticks, values) in file order
    tempos: list[tuple[int, float, int]]  # (tick, BPM, track) of every set_tempo event, every track, file order
    time_signatures: list[tuple[int, int, int]]  # (numerator, denominator, tick)
    unclosed: int = 0  # note-ons never closed (dropped)

    @property
    def n_notes(self) -> int:
        return len(self.start)


@dataclass
class NoteTable:
    """All notes of a song, one entry per note (closing order), plus the tempo map.

    Times are grid positions: 12 per quarter note, 48 per 4/4 bar, from the file's tick 0.
    """

    onset: np.ndarray  # int64, snapped down
    duration: np.ndarray  # int64, grid steps (rounded, after pedal), >= 0
    pitch: np.ndarray  # int64, 0..127
    velocity: np.ndarray  # int64, 1..127
    program: np.ndarray  # int64, 0..127, DRUM_PROGRAM (128) for drums
    start_tick: np.ndarray  # int64, raw onset in ticks (ties in token order)
    instrument: np.ndarray  # int64, reader's instrument number (ties in token order)
    tempo_pos: np.ndarray  # int64, grid positions of tempo changes, sorted
    tempo_bpm: np.ndarray  # float64
    ticks_per_beat: int

    def __len__(self) -> int:
        return len(self.onset)

    @property
    def is_drum(self) -> np.ndarray:
        return self.program == DRUM_PROGRAM


def read_midi(path: str | Path, limits: Limits = Limits()) -> ParsedMidi:
    """Read ``path``; raise :class:`MidiRejected` with a reason if it cannot be used."""
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


def parse_midi_bytes(data: bytes) -> ParsedMidi:
    """Read a MIDI file's bytes (see :func:`read_midi`)."""
    if data[:4] != b"MThd":
        start = data.find(b"MThd", 0, 4096) if data[:4] == b"RIFF" else -1
        if start < 0:
            raise MidiRejected("not_midi", f"no MThd header (file starts with {data[:8]!r})")
        data = data[start:]
    try:
        midi = mido.MidiFile(file=io.BytesIO(data), clip=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - mido raises OSError, EOFError, ValueError, KeyError...
        detail = str(exc) or ("the file ends early (truncated?)" if isinstance(exc, EOFError) else repr(exc))
        raise MidiRejected("unreadable", f"{type(exc).__name__}: {detail}") from None
    tpb = midi.ticks_per_beat
    if not 0 < tpb < 0x8000:
        raise MidiRejected("bad_timing", f"ticks per beat {tpb} (0 or SMPTE division) has no beat grid")
    return read_events(midi)


def read_events(midi: mido.MidiFile) -> ParsedMidi:
    """Notes (the reference's pairing, module docstring), pedal, tempo and time signatures of every track."""
    # Over 60 lines on purpose: one pass over every message, the hottest loop of preprocessing,
    # with the note pairing rule in one place; helpers per event kind would cost a call per message.
    start, end, pitch, velocity, program, instrument, group = ([] for _ in range(7))
    instruments: dict[tuple[int, int, int], int] = {}
    pedals: dict[int, list[tuple[int, int]]] = defaultdict(list)
    tempos, signatures = [], []
    unclosed = 0
    for track_index, track in enumerate(midi.tracks):
        tick = 0
        programs = [0] * 16
        open_notes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for msg in track:
            tick += msg.time
            kind = msg.type
            if kind == "note_on" and msg.velocity > 0:
                open_notes.setdefault((msg.channel, msg.note), []).append((tick, msg.velocity))
            elif kind == "note_off" or kind == "note_on":
                key = (msg.channel, msg.note)
                pending = open_notes.pop(key, None)
                if pending is None:
                    continue  # nothing open: ignored
                closing = [n for n in pending if n[0] != tick]
                if not closing:
                    continue  # only a note begun on this tick: zero length, dropped
                if len(closing) < len(pending):
                    open_notes[key] = [n for n in pending if n[0] == tick]
                channel = msg.channel
                prog = DRUM_PROGRAM if channel == DRUM_CHANNEL else programs[channel]
                inst = instruments.setdefault((programs[channel], channel, track_index), len(instruments))
                for note_start, note_velocity in closing:
                    start.append(note_start)
                    end.append(tick)
                    pitch.append(msg.note)
                    velocity.append(note_velocity)
                    program.append(prog)
                    instrument.append(inst)
                    group.append(track_index * 16 + channel)
            elif kind == "program_change":
                programs[msg.channel] = msg.program
            elif kind == "control_change":
                if msg.control == PEDAL_CC:
                    pedals[track_index * 16 + msg.channel].append((tick, msg.value))
            elif kind == "set_tempo":
                tempos.append((tick, 6e7 / msg.tempo, track_index))
            elif kind == "time_signature":
                signatures.append((msg.numerator, msg.denominator, tick))
        unclosed += sum(map(len, open_notes.values()))

    def ints(values: list) -> np.ndarray:
        return np.array(values, dtype=np.int64)

    return ParsedMidi(
        ticks_per_beat=int(midi.ticks_per_beat),
        start=ints(start),
        end=ints(end),
        pitch=ints(pitch),
        velocity=ints(velocity),
        program=ints(program),
        instrument=ints(instrument),
        pedal_group=ints(group),
        pedals={g: (ints([t for t, _ in ev]), ints([v for _, v in ev])) for g, ev in pedals.items()},
        tempos=tempos,
        time_signatures=signatures,
        unclosed=unclosed,
    )


def check_4_4(midi: ParsedMidi) -> None:
    """Raise ``not_4_4`` unless every time-signature event is 4/4 (none at all counts as 4/4)."""
    sigs = [(n, d) for n, d, _ in midi.time_signatures]
    other = sorted({s for s in sigs if s != (4, 4)})
    if other:
        names = ", ".join(f"{n}/{d}" for n, d in other)
        raise MidiRejected("not_4_4", f"time signatures other than 4/4: {names} ({len(sigs)} time-signature events)")


def pedal_spans(times: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(down, up)`` ticks of the completed sustain-pedal spans of CC 64 events in file order."""
    down = values >= PEDAL_DOWN
    prev = np.concatenate([[False], down[:-1]])
    on = times[down & ~prev]
    off = times[~down & prev]
    return on[: len(off)], off  # a pedal still down at the end is ignored


def apply_pedal(start: np.ndarray, end: np.ndarray, on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Note ends extended to the end of the last pedal span that overlaps the note, if later."""
    if len(on) == 0:
        return end
    k = np.searchsorted(on, end, side="right") - 1  # last span that starts at or before the note's end
    kc = np.maximum(k, 0)
    overlaps = (k >= 0) & (off[kc] > start)
    return np.where(overlaps, np.maximum(end, off[kc]), end)


def tempo_map(tempos: list[tuple[int, float, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(ticks, BPM)`` of the tempo changes (module docstring: tick 0's last event, repeats ignored)."""
    ticks, bpms = [0], [DEFAULT_BPM]
    for tick, bpm, _ in sorted(tempos, key=lambda e: e[0]):
        if tick == 0:
            bpms[0] = bpm
        elif bpm != bpms[-1]:
            ticks.append(tick)
            bpms.append(bpm)
    return np.array(ticks, dtype=np.int64), np.array(bpms, dtype=np.float64)


def note_table(midi: ParsedMidi, limits: Limits = Limits()) -> NoteTable:
    """The quantised, pedal-extended notes and the tempo map of a parsed file."""
    tpb = midi.ticks_per_beat
    if midi.n_notes == 0:
        raise MidiRejected("no_notes", f"no notes ({midi.unclosed} note-ons never closed)")
    if midi.n_notes > limits.max_notes:
        raise MidiRejected("too_large", f"{midi.n_notes} notes, limit {limits.max_notes}")
    start, end = midi.start, midi.end.copy()
    for group, (times, values) in midi.pedals.items():
        on, off = pedal_spans(times, values)
        if len(on):
            mine = midi.pedal_group == group
            end[mine] = apply_pedal(start[mine], end[mine], on, off)
    g = POSITIONS_PER_BEAT
    tempo_ticks, tempo_bpm = tempo_map(midi.tempos)
    return NoteTable(
        onset=(start * g) // tpb,
        duration=np.rint((end - start) / tpb * g).astype(np.int64),
        pitch=midi.pitch,
        velocity=midi.velocity,
        program=midi.program,
        start_tick=start,
        instrument=midi.instrument,
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
