"""Bar-level REMI+ tokens of a note table (SPEC §2), and the decoder back to MIDI.

One bar (4/4, 48 grid positions) is::

    Bar_0 Position_0 Tempo_<t>
    Position_<p> Instrument_<name> Pitch_<n>|Pitch_Drum_<n> Velocity_<v> Duration_<d>   (per note)
    <eob>

Notes are sorted by (onset, drums before pitched instruments, program, pitch); exact ties
keep the reference's order: by raw onset tick, then by the reader's instrument number and
closing order (:mod:`musicbert.tokenizer.midi`), which is the order in which the reference's stable
sorts leave them. A note belongs to the bar of its
snapped onset. The song's bars run from the bar of its first note to the bar of its last
note (empty bars at the start and end are dropped; ``bar_index`` counts from the first).
A bar whose tokens before ``<eob>`` exceed 511 is cut to 511 (the last note may be cut
part-way) and ``<eob>`` appended: 512 at most. Bars with fewer than 30 tokens (five notes
or fewer) are not kept. ``Tempo_<t>`` is the bin of the first tempo change inside the bar,
else of the tempo in force at the bar's start.

Token building is vectorised: one ``lexsort`` of the notes, a ``[n_notes, 5]`` token
matrix, and index arithmetic that copies each kept bar's slice into the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import miditoolkit
import numpy as np

from musicbert.tokenizer.errors import MidiRejected
from musicbert.tokenizer.midi import Limits, NoteTable, nearest_bin
from musicbert.vocab import (
    DRUM_PROGRAM,
    DURATION_BINS,
    MAX_BAR_TOKENS,
    POSITIONS_PER_BAR,
    POSITIONS_PER_BEAT,
    TEMPO_BINS,
    VELOCITY_BINS,
    VOCAB,
)

MIN_BAR_TOKENS = 30
HEADER = 3  # Bar_0 Position_0 Tempo_t
NOTE_TOKENS = 5
DEFAULT_TEMPO = 120.0


@dataclass
class RemiSong:
    """A song's kept bars as tokens, and the sorted notes that labels are computed from."""

    tokens: np.ndarray  # uint16, kept bars concatenated
    offsets: np.ndarray  # int64, n_kept + 1
    kept: np.ndarray  # int64, song bar index of each kept bar
    n_bars: int  # bars in the song (first note bar .. last note bar)
    first_bar: int  # absolute bar (from tick 0) of song bar 0
    tempo_bin: np.ndarray  # int64 [n_bars], Tempo_ index of every song bar
    # sorted notes (token order), per-note song bar and bins
    order: np.ndarray
    note_bar: np.ndarray
    velocity_bin: np.ndarray
    duration_bin: np.ndarray


def bar_tempo_bins(table: NoteTable, first_bar: int, n_bars: int) -> np.ndarray:
    """Tempo bin of each song bar: first tempo change inside the bar, else the tempo in force."""
    ev_bar = table.tempo_pos // POSITIONS_PER_BAR - first_bar
    bars = np.arange(n_bars)
    i = np.searchsorted(ev_bar, bars, side="left")
    inside = (i < len(ev_bar)) & (ev_bar[np.minimum(i, len(ev_bar) - 1)] == bars)
    j = np.where(inside, i, i - 1)
    bpm = np.where(j >= 0, table.tempo_bpm[np.maximum(j, 0)], DEFAULT_TEMPO)
    return nearest_bin(bpm, TEMPO_BINS)


def encode_notes(table: NoteTable, limits: Limits = Limits(), min_bar_tokens: int = MIN_BAR_TOKENS,
                 max_bar_tokens: int = MAX_BAR_TOKENS) -> RemiSong:
    """Tokens of the song's kept bars; raises ``no_notes``, ``too_long`` or ``too_few_bars``."""
    if len(table) == 0:
        raise MidiRejected("no_notes", "no notes")
    drum = table.program == DRUM_PROGRAM
    vel_bin = nearest_bin(table.velocity, VELOCITY_BINS)
    dur_bin = nearest_bin(table.duration, DURATION_BINS)
    order = np.lexsort((table.instrument, table.start_tick, table.pitch, table.program, ~drum, table.onset))
    onset = table.onset[order]
    abs_bar = onset // POSITIONS_PER_BAR
    first_bar = int(abs_bar[0])
    note_bar = abs_bar - first_bar
    n_bars = int(note_bar[-1]) + 1
    if n_bars > limits.max_bars:
        raise MidiRejected("too_long", f"song spans {n_bars} bars, limit {limits.max_bars}")

    # token matrix of the sorted notes
    program, pitch, drum_s = table.program[order], table.pitch[order], drum[order]
    mat = np.empty((len(order), NOTE_TOKENS), dtype=np.int64)
    mat[:, 0] = VOCAB.position_range[0] + onset % POSITIONS_PER_BAR
    mat[:, 1] = VOCAB.instrument_range[0] + program
    mat[:, 2] = np.where(drum_s, VOCAB.drum_pitch_range[0], VOCAB.pitch_range[0]) + pitch
    mat[:, 3] = VOCAB.velocity_range[0] + vel_bin[order]
    mat[:, 4] = VOCAB.duration_range[0] + dur_bin[order]
    flat = mat.astype(np.uint16).reshape(-1)

    counts = np.bincount(note_bar, minlength=n_bars)
    first_note = np.concatenate([[0], np.cumsum(counts)[:-1]])
    body = np.minimum(HEADER + NOTE_TOKENS * counts, max_bar_tokens - 1)
    length = body + 1
    kept = np.flatnonzero(length >= min_bar_tokens)
    if len(kept) == 0:
        raise MidiRejected(
            "too_few_bars",
            f"{len(order)} notes in {n_bars} bars, none with {min_bar_tokens} tokens or more "
            f"(busiest bar has {int(counts.max())} notes)",
        )
    tempo_bin = bar_tempo_bins(table, first_bar, n_bars)

    tokens, offsets = _kept_bar_tokens(flat, body[kept], first_note[kept], tempo_bin[kept])
    return RemiSong(
        tokens=tokens,
        offsets=offsets,
        kept=kept,
        n_bars=n_bars,
        first_bar=first_bar,
        tempo_bin=tempo_bin,
        order=order,
        note_bar=note_bar,
        velocity_bin=vel_bin[order],
        duration_bin=dur_bin[order],
    )


def _kept_bar_tokens(
    note_tokens: np.ndarray, body: np.ndarray, first_note: np.ndarray, tempo_bin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, offsets)`` of the kept bars: ``Bar_0 Position_0 Tempo_t``, the bar's first
    ``body - HEADER`` note tokens (from ``note_tokens``, the flat 5-token rows of the sorted
    notes, starting at note ``first_note``), ``<eob>``."""
    offsets = np.concatenate([[0], np.cumsum(body + 1)]).astype(np.int64)
    tokens = np.empty(int(offsets[-1]), dtype=np.uint16)
    starts = offsets[:-1]
    tokens[starts] = VOCAB.bar_id
    tokens[starts + 1] = VOCAB.position_range[0]
    tokens[starts + 2] = VOCAB.tempo_range[0] + tempo_bin
    tokens[offsets[1:] - 1] = VOCAB.eob_id
    n_note_tok = body - HEADER
    total = int(n_note_tok.sum())
    seg_start = np.concatenate([[0], np.cumsum(n_note_tok)[:-1]])
    within = np.arange(total) - np.repeat(seg_start, n_note_tok)
    src = np.repeat(NOTE_TOKENS * first_note, n_note_tok) + within
    dst = np.repeat(starts + HEADER, n_note_tok) + within
    tokens[dst] = note_tokens[src]
    return tokens, offsets


# ---------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class DecodedNote:
    bar: int  # bar number in the output (from 0)
    position: int  # 0..47
    program: int  # 0..127, DRUM_PROGRAM for drums
    pitch: int
    velocity_bin: int
    duration_bin: int


def parse_bar_tokens(tokens, bar: int = 0) -> tuple[int | None, list[DecodedNote]]:
    """Tempo bin and notes of one bar's tokens.

    Tolerant of imperfect sequences (e.g. a model's output or a truncated bar): a note is
    emitted at each ``Duration_`` token that completes Position, Instrument, Pitch and
    Velocity; anything else is ignored. Pitched and drum pitches follow their own kind.
    """
    pos0, pos1 = VOCAB.position_range
    ins0, ins1 = VOCAB.instrument_range
    pit0, pit1 = VOCAB.pitch_range
    drm0, drm1 = VOCAB.drum_pitch_range
    vel0, vel1 = VOCAB.velocity_range
    dur0, dur1 = VOCAB.duration_range
    tem0, tem1 = VOCAB.tempo_range
    tempo = None
    pos = prog = pitch = vel = None
    drum_pitch = False
    notes: list[DecodedNote] = []
    for t in (int(x) for x in tokens):
        if pos0 <= t < pos1:
            pos, prog, pitch, vel = t - pos0, None, None, None
        elif tem0 <= t < tem1:
            if tempo is None:
                tempo = t - tem0
        elif ins0 <= t < ins1:
            prog, pitch, vel = t - ins0, None, None
        elif pit0 <= t < pit1:
            pitch, drum_pitch, vel = t - pit0, False, None
        elif drm0 <= t < drm1:
            pitch, drum_pitch, vel = t - drm0, True, None
        elif vel0 <= t < vel1:
            vel = t - vel0
        elif dur0 <= t < dur1:
            if None not in (pos, prog, pitch, vel) and drum_pitch == (prog == DRUM_PROGRAM):
                notes.append(DecodedNote(bar, pos, prog, pitch, vel, t - dur0))
            prog = pitch = vel = None
    return tempo, notes


def decode_bars(bars, bar_index=None, ticks_per_beat: int = 480) -> miditoolkit.MidiFile:
    """A 4/4 MIDI file from bars of tokens (each an array of ids, e.g. ``Song.bar(b)``).

    Bar ``k`` is placed at bar ``bar_index[k]`` (default: one after the other). Durations
    are decoded from the duration bins' VALUES in grid steps (the reference used the bin
    index, a defect), velocities from the velocity bins' values, tempo from the tempo bin
    (a tempo change at the start of every bar that has a ``Tempo_`` token).

    Notes of one instrument that would overlap on the same pitch go to separate tracks
    of the same program, so that reading the file back pairs note-ons and note-offs
    exactly and encoding the result gives the same tokens again.
    """
    if ticks_per_beat % POSITIONS_PER_BEAT:
        raise ValueError(f"ticks_per_beat must be a multiple of {POSITIONS_PER_BEAT}, got {ticks_per_beat}")
    step = ticks_per_beat // POSITIONS_PER_BEAT
    bar_ticks = POSITIONS_PER_BAR * step
    midi = miditoolkit.MidiFile(ticks_per_beat=ticks_per_beat)
    midi.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
    tempo_changes = []
    notes: list[DecodedNote] = []
    for k, bar in enumerate(bars):
        where = int(bar_index[k]) if bar_index is not None else k
        tempo, bar_notes = parse_bar_tokens(bar, where)
        if tempo is not None:
            tempo_changes.append(miditoolkit.TempoChange(float(TEMPO_BINS[tempo]), where * bar_ticks))
        notes.extend(bar_notes)
    midi.tempo_changes = tempo_changes or [miditoolkit.TempoChange(DEFAULT_TEMPO, 0)]

    # voices: per program, the first track whose last note on this pitch has ended
    tracks: dict[int, list[tuple[miditoolkit.Instrument, dict[int, int]]]] = {}
    for n in sorted(notes, key=lambda n: (n.bar, n.position, n.program, n.pitch)):
        start = (n.bar * POSITIONS_PER_BAR + n.position) * step
        end = start + int(DURATION_BINS[n.duration_bin]) * step
        voices = tracks.setdefault(n.program, [])
        for inst, busy in voices:
            if busy.get(n.pitch, -1) <= start:
                break
        else:
            drum = n.program == DRUM_PROGRAM
            name = "Drums" if drum else VOCAB.token(VOCAB.instrument_range[0] + n.program)[len("Instrument_"):]
            inst = miditoolkit.Instrument(program=0 if drum else n.program, is_drum=drum, name=name)
            busy = {}
            voices.append((inst, busy))
        inst.notes.append(miditoolkit.Note(int(VELOCITY_BINS[n.velocity_bin]), n.pitch, start, end))
        busy[n.pitch] = end
    midi.instruments = [inst for prog in sorted(tracks) for inst, _ in tracks[prog]]
    midi.max_tick = max((n.end for i in midi.instruments for n in i.notes), default=0)
    return midi


def decode_song(song, ticks_per_beat: int = 480) -> miditoolkit.MidiFile:
    """:func:`decode_bars` of a :class:`musicbert.shards.Song`, bars at their ``bar_index``."""
    return decode_bars([song.bar(b) for b in range(song.n_bars)], song.bar_index, ticks_per_beat)
