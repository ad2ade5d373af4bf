"""The 560-token vocabulary of bar-level REMI+: the only place token strings and ids meet.

Order (ids are positions in this list, fixed by the format):
``<pad> <unk> <eob> <mask>``, ``Bar_0``, ``Tempo_0..31``, the 128 General MIDI
instrument names then ``Instrument_Drum``, ``Pitch_0..127``, ``Pitch_Drum_0..127``,
``Position_0..47``, ``Duration_0..57``, ``Velocity_0..31``.

The numeric bins that the ``Tempo_``, ``Velocity_`` and ``Duration_`` indices stand for
live here too, so that encoding and decoding read one table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

POSITIONS_PER_BEAT = 12
BEATS_PER_BAR = 4
POSITIONS_PER_BAR = POSITIONS_PER_BEAT * BEATS_PER_BAR  # 48
MAX_BAR_TOKENS = 512
DRUM_PROGRAM = 128  # the instrument index used for drum tracks in labels

#: Tempo (BPM) of each ``Tempo_i`` token: 32 integers from 30 to 210 (truncated, as the format defines).
TEMPO_BINS = np.linspace(30, 210, 32).astype(np.int64)
#: MIDI velocity of each ``Velocity_i`` token: 32 integers from 1 to 127 (truncated).
VELOCITY_BINS = np.linspace(1, 127, 32).astype(np.int64)
#: Duration in grid steps of each ``Duration_i`` token. 21 appears twice, so index 16
#: is never produced by nearest-first-on-ties binning; it is kept for id compatibility.
DURATION_BINS = np.array(
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 17, 18, 21, 21, 24, 30, 36, 42, 48, 60, 72,
     84, 96, 108, 120, 132, 144, 156, 168, 180, 192, 216, 240, 264, 288, 312, 336, 360, 384,
     408, 432, 456, 480, 504, 528, 552, 576, 600, 624, 648, 672, 696, 720, 744, 768],
    dtype=np.int64,
)

#: General MIDI program names, program 0..127, spelt as the reference (pretty_midi) spells them.
GM_PROGRAM_NAMES: tuple[str, ...] = (
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",
    "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavinet",
    "Celesta", "Glockenspiel", "Music Box", "Vibraphone",
    "Marimba", "Xylophone", "Tubular Bells", "Dulcimer",
    "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ",
    "Reed Organ", "Accordion", "Harmonica", "Tango Accordion",
    "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)", "Electric Guitar (jazz)",
    "Electric Guitar (clean)", "Electric Guitar (muted)", "Overdriven Guitar",
    "Distortion Guitar", "Guitar Harmonics",
    "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)", "Fretless Bass",
    "Slap Bass 1", "Slap Bass 2", "Synth Bass 1", "Synth Bass 2",
    "Violin", "Viola", "Cello", "Contrabass",
    "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani",
    "String Ensemble 1", "String Ensemble 2", "Synth Strings 1", "Synth Strings 2",
    "Choir Aahs", "Voice Oohs", "Synth Choir", "Orchestra Hit",
    "Trumpet", "Trombone", "Tuba", "Muted Trumpet",
    "French Horn", "Brass Section", "Synth Brass 1", "Synth Brass 2",
    "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax",
    "Oboe", "English Horn", "Bassoon", "Clarinet",
    "Piccolo", "Flute", "Recorder", "Pan Flute",
    "Blown bottle", "Shakuhachi", "Whistle", "Ocarina",
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 chiff",
    "Lead 5 (charang)", "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)",
    "Pad 1 (new age)", "Pad 2 (warm)", "Pad 3 (polysynth)", "Pad 4 (choir)",
    "Pad 5 (bowed)", "Pad 6 (metallic)", "Pad 7 (halo)", "Pad 8 (sweep)",
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)",
    "FX 5 (brightness)", "FX 6 (goblins)", "FX 7 (echoes)", "FX 8 (sci-fi)",
    "Sitar", "Banjo", "Shamisen", "Koto",
    "Kalimba", "Bagpipe", "Fiddle", "Shanai",
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock",
    "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet",
    "Telephone Ring", "Helicopter", "Applause", "Gunshot",
)
assert len(GM_PROGRAM_NAMES) == 128

PAD, UNK, EOB, MASK = "<pad>", "<unk>", "<eob>", "<mask>"
BAR = "Bar_0"


def _token_list() -> list[str]:
    tokens = [PAD, UNK, EOB, MASK, BAR]
    tokens += [f"Tempo_{i}" for i in range(len(TEMPO_BINS))]
    tokens += [f"Instrument_{name}" for name in GM_PROGRAM_NAMES] + ["Instrument_Drum"]
    tokens += [f"Pitch_{i}" for i in range(128)]
    tokens += [f"Pitch_Drum_{i}" for i in range(128)]
    tokens += [f"Position_{i}" for i in range(POSITIONS_PER_BAR)]
    tokens += [f"Duration_{i}" for i in range(len(DURATION_BINS))]
    tokens += [f"Velocity_{i}" for i in range(len(VELOCITY_BINS))]
    return tokens


@dataclass(frozen=True)
class Vocab:
    """Token <-> id mapping with the id ranges of each token kind.

    Ranges are half-open ``(first, last + 1)`` so that ``first + index`` is the id of,
    say, ``Pitch_<index>``. Use the module-level :data:`VOCAB` rather than building one.
    """

    tokens: tuple[str, ...] = field(default_factory=lambda: tuple(_token_list()))

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def id(self, token: str) -> int:
        """Id of ``token``; raises ``KeyError`` naming the token if it is unknown."""
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(f"unknown token {token!r}") from None

    def token(self, token_id: int) -> str:
        return self.tokens[token_id]

    def encode(self, tokens: list[str]) -> np.ndarray:
        return np.array([self.id(t) for t in tokens], dtype=np.uint16)

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    def _range(self, prefix: str) -> tuple[int, int]:
        ids = [i for i, t in enumerate(self.tokens) if t.startswith(prefix)]
        return ids[0], ids[-1] + 1

    # Special ids.
    @property
    def pad_id(self) -> int:
        return self.id(PAD)

    @property
    def unk_id(self) -> int:
        return self.id(UNK)

    @property
    def eob_id(self) -> int:
        return self.id(EOB)

    @property
    def mask_id(self) -> int:
        return self.id(MASK)

    @property
    def bar_id(self) -> int:
        return self.id(BAR)

    # Kind ranges, half-open.
    @cached_property
    def tempo_range(self) -> tuple[int, int]:
        return self._range("Tempo_")

    @cached_property
    def instrument_range(self) -> tuple[int, int]:
        """Programs 0..127 then drums (index 128)."""
        return self._range("Instrument_")

    @cached_property
    def pitch_range(self) -> tuple[int, int]:
        first = self.id("Pitch_0")
        return first, first + 128

    @cached_property
    def drum_pitch_range(self) -> tuple[int, int]:
        return self._range("Pitch_Drum_")

    @cached_property
    def position_range(self) -> tuple[int, int]:
        return self._range("Position_")

    @cached_property
    def duration_range(self) -> tuple[int, int]:
        return self._range("Duration_")

    @cached_property
    def velocity_range(self) -> tuple[int, int]:
        return self._range("Velocity_")

    @cached_property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that are not musical events: ``<pad> <unk> <eob> <mask>``."""
        return tuple(self.id(t) for t in (PAD, UNK, EOB, MASK))

    @cached_property
    def sha256(self) -> str:
        """Hash of the token list; shards and checkpoints record it to refuse a mismatch."""
        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()


VOCAB = Vocab()
assert len(VOCAB) == 560
