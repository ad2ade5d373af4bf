"""Reading notes as the reference does (pretty_midi's rule), on MIDI files written event by event.

Each file is built with mido from absolute-tick events in exactly the order given, so that
re-strikes, velocity-0 note-ons, same-tick pairs and event order are under the test's control.
Ticks per beat 480: 40 ticks per grid step.
"""

from __future__ import annotations

import io

import mido
import numpy as np

from musicbert.tokenizer.encode import song_from_midifile
from musicbert.tokenizer.midi import ParsedMidi, nearest_bin, note_table, parse_midi_bytes
from musicbert.vocab import TEMPO_BINS, VELOCITY_BINS, VOCAB

TPB = 480
STEP = 40


def on(tick, pitch, velocity=100, channel=0):
    return tick, mido.Message("note_on", note=pitch, velocity=velocity, channel=channel)


def off(tick, pitch, channel=0):
    return tick, mido.Message("note_off", note=pitch, velocity=0, channel=channel)


def program(tick, prog, channel=0):
    return tick, mido.Message("program_change", program=prog, channel=channel)


def tempo(tick, bpm):
    return tick, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))


def read(*tracks) -> ParsedMidi:
    """A type-1 file of ``tracks`` (lists of (absolute tick, message), kept in the order given)."""
    mid = mido.MidiFile(type=1, ticks_per_beat=TPB)
    for events in tracks:
        track = mido.MidiTrack()
        now = 0
        for tick, msg in events:
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    buf = io.BytesIO()
    mid.save(file=buf)
    return parse_midi_bytes(buf.getvalue())


def notes(midi: ParsedMidi) -> list[tuple[int, int, int, int]]:
    """(start, end, pitch, velocity) in the reader's order (closing order)."""
    return list(zip(midi.start.tolist(), midi.end.tolist(), midi.pitch.tolist(), midi.velocity.tolist()))


def test_a_note_off_closes_every_open_note_of_its_pitch():
    # struck at 0 and again at 480 before any note-off: both end at the first note-off
    midi = read([on(0, 60, 90), on(480, 60, 80), off(960, 60), off(1440, 60)])  # the 2nd note-off closes nothing
    assert notes(midi) == [(0, 960, 60, 90), (480, 960, 60, 80)]
    assert midi.unclosed == 0


def test_one_missing_note_off_does_not_shift_later_notes():
    # a first-in-first-out pairing would end note 1 at 960 and every later note one note-off late
    events = [on(0, 60), on(480, 60), off(960, 60)] + [e for k in range(2, 5) for e in (on(k * 480, 60), off(k * 480 + 240, 60))]
    midi = read(events)
    assert notes(midi)[2:] == [(k * 480, k * 480 + 240, 60, 100) for k in range(2, 5)]


def test_velocity_zero_note_on_is_a_note_off_and_channels_are_apart():
    midi = read([on(0, 60), on(0, 60, channel=1), on(240, 60, velocity=0), off(480, 60, channel=1)])
    assert notes(midi) == [(0, 240, 60, 100), (0, 480, 60, 100)]


def test_same_tick_pairs():
    # alone: a note-on and its note-off on one tick is a zero-length note, dropped
    assert notes(read([on(100, 60), off(100, 60), on(200, 61), off(300, 61)])) == [(200, 300, 61, 100)]
    # re-struck on the tick where the previous note ends, written "on" before "off": the old note
    # ends there, the new one stays open until its own note-off
    midi = read([on(0, 60), on(480, 60, 70), off(480, 60), off(960, 60)])
    assert notes(midi) == [(0, 480, 60, 100), (480, 960, 60, 70)]


def test_note_ons_never_closed_are_dropped_and_counted():
    midi = read([on(0, 60), on(0, 64), off(480, 64), on(960, 67)])
    assert notes(midi) == [(0, 480, 64, 100)]
    assert midi.unclosed == 2


def test_program_at_the_note_off_drums_on_channel_10_and_instrument_numbers():
    midi = read(
        [program(0, 33), on(0, 40), program(100, 5), off(480, 40), on(480, 41), off(960, 41)],
        [on(0, 36, channel=9), off(40, 36, channel=9), on(0 + 960, 50), off(1000, 50)],
    )
    assert midi.program.tolist() == [5, 5, 128, 0]
    assert midi.instrument.tolist() == [0, 0, 1, 2]  # (program, channel, track) in order of first closed note


def test_durations_round_halves_to_even():
    # 20, 60, 100, 140 ticks = 0.5, 1.5, 2.5, 3.5 steps -> 0, 2, 2, 4; 59 ticks -> 1
    events = []
    for k, length in enumerate((20, 60, 100, 140, 59)):
        events += [on(k * 480, 60 + k), off(k * 480 + length, 60 + k)]
    assert note_table(read(events)).duration.tolist() == [0, 2, 2, 4, 1]


def test_exact_ties_keep_the_reference_order():
    """Same step, instrument and pitch: raw onset tick first, then the reader's instrument
    number (tracks are read in order), then closing order, as the reference's stable sorts leave them."""
    filler = [e for i in range(6) for e in (on((40 + i) * STEP, 70 + i), off((41 + i) * STEP, 70 + i))]
    track0 = [on(10, 60, 50), off(480, 60), on(960, 62, 20), on(960, 64, 30), on(960, 64, 110), off(1000, 62), off(1000, 64)]
    track1 = [on(5, 60, 90), off(300, 60), on(960, 62, 120), off(990, 62)]
    song = song_from_midifile(read(track0 + filler, track1), "t.mid")
    velocities = [t for t in VOCAB.decode(song.bar(0)) if t.startswith("Velocity_")][:6]
    expected = nearest_bin(np.array([90, 50, 20, 120, 30, 110]), VELOCITY_BINS)
    assert velocities == [f"Velocity_{v}" for v in expected]
    assert len(set(expected.tolist())) == 6


def test_tempo_map_from_every_track_last_at_tick_0_repeats_ignored():
    filler = [e for b in range(3) for i in range(6) for e in (on(b * 1920 + i * STEP, 60 + i), off(b * 1920 + (i + 1) * STEP, 60 + i))]
    midi = read(
        [tempo(0, 100), tempo(0, 90), tempo(1920, 90), tempo(1920 + 480, 150)],  # 90 at bar 1 repeats the tempo in force
        sorted(filler + [tempo(2 * 1920 + 40, 60)], key=lambda e: e[0]),  # a tempo change in another track counts
    )
    song = song_from_midifile(midi, "t.mid")
    bpm = [90.0, 150.0, 60.0]
    assert song.tempo.tolist() == nearest_bin(np.array(bpm), TEMPO_BINS).tolist()


def test_exact_tempo_tie_goes_to_the_lower_bin():
    lo, hi = TEMPO_BINS[3], TEMPO_BINS[4]  # 47 and 52: 49.5 is an exact tie
    assert nearest_bin(np.array([(lo + hi) / 2, (lo + hi) / 2 + 1e-9]), TEMPO_BINS).tolist() == [3, 4]
