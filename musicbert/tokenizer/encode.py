"""One MIDI file -> one :class:`musicbert.shards.Song` (tokens of the kept bars + labels).

:func:`song_from_midi` is what every preprocessing worker runs on a file. It raises
:class:`musicbert.tokenizer.errors.MidiRejected` (with a reason) for every file it does not use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from musicbert.shards import Song
from musicbert.tokenizer.errors import MidiRejected
from musicbert.tokenizer.labels import bar_labels
from musicbert.tokenizer.midi import Limits, ParsedMidi, check_4_4, note_table, read_midi
from musicbert.tokenizer.remi import encode_notes


def song_id(rel_path: str) -> str:
    """16 hex digits of the SHA-256 of the song's path relative to the corpus root (POSIX form)."""
    return hashlib.sha256(rel_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def song_from_midifile(midi: ParsedMidi, rel_path: str, limits: Limits = Limits(),
                       chords: bool = True) -> Song:
    """Encode an already read file (``musicbert.tokenizer.midi.parse_midi_bytes`` of bytes built in memory, in tests)."""
    if midi.n_notes == 0:
        raise MidiRejected("no_notes", f"no notes ({midi.unclosed} note-ons never closed)")
    check_4_4(midi)
    table = note_table(midi, limits)
    remi = encode_notes(table, limits)
    labels = bar_labels(table, remi, chords=chords)
    song = Song(
        id=song_id(rel_path),
        path=rel_path,
        tokens=remi.tokens,
        offsets=remi.offsets,
        bar_index=remi.kept.astype(np.int32),
        **labels.label_arrays(),
        first_bar=remi.first_bar,
    )
    song.validate()
    return song


def song_from_midi(path: str | Path, rel_path: str | None = None, limits: Limits = Limits(),
                   chords: bool = True) -> Song:
    """Read, check, quantise, tokenise and label one file; ``rel_path`` names it (default: ``path``)."""
    rel = rel_path if rel_path is not None else Path(path).as_posix()
    return song_from_midifile(read_midi(path, limits), rel, limits, chords=chords)


__all__ = ["MidiRejected", "Limits", "song_from_midi", "song_from_midifile", "song_id"]
