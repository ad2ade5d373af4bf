"""POP909 (``NNN.mid`` with ``NNN_chord_midi.txt``) -> chords per bar as a label CSV.

::

    python -m preprocess.annotations.pop909 DATA_DIR --out pop909_chords.csv [--midi-out DIR]

How annotation times map to bars: ``*_chord_midi.txt`` gives each chord's start and end in
seconds of the MIDI file's own timeline (``N`` = no chord). Seconds become ticks through the
file's tempo map (miditoolkit's tick -> time table, inverted), and a tick lies in bar
``tick // (4 * ticks_per_beat)``: the 4/4 bars from tick 0 that the preprocessor and
``--labels`` count. A bar is labelled with every chord that sounds in it for at least one
beat (:data:`MIN_OVERLAP_BEATS`), so a bar with a chord change has two labels (a multi-label
probe). ``*_beat_midi.txt`` is not needed for this: its annotated downbeats often do not fall
on these bar lines (a pickup, or a file whose grid is offset from the music's beats), and the
model reads bars from tick 0 whatever the music's metre; the chords sounding in each of those
bars are what a probe of those bars can find.

Both layouts are read: the development copy's flat folder (``001.mid``, ``001_chord_midi.txt``)
and the dataset's own (``001/001.mid``, ``001/chord_midi.txt``). Paths are written relative to
DATA_DIR.

``--midi-out DIR``: most POP909 files declare a 1/4 or 2/4 time signature (an export artefact;
the songs are in 4/4 bars of 4 beats), which the preprocessor rejects as ``not_4_4``. This
writes a copy of every song with its time signatures replaced by one 4/4 at tick 0 (notes,
ticks and tempo unchanged), at the same relative path, for ``python -m preprocess --src DIR``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import miditoolkit
import numpy as np

from preprocess.annotations.chordnames import ChordNameError, harte_label
from preprocess.annotations.labelcsv import AnnotationError, LabelRow, convert, converter_parser

MIN_OVERLAP_BEATS = 1.0  # a chord labels a bar it sounds in for at least this many beats
BEATS_PER_BAR = 4


def find_songs(data_dir: Path) -> list[tuple[Path, Path]]:
    """``(midi, chord file)`` pairs, in either layout, sorted by MIDI path."""
    pairs = []
    for chords in sorted(data_dir.rglob("*chord_midi.txt")):
        stem = chords.name[: -len("chord_midi.txt")].rstrip("_")
        midi = chords.parent / f"{stem or chords.parent.name}.mid"
        if midi.is_file():
            pairs.append((midi, chords))
    return pairs


def read_chords(path: Path) -> list[tuple[float, float, str]]:
    """``(start s, end s, symbol)`` per line of a ``*_chord_midi.txt``."""
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            start, end, symbol = float(parts[0]), float(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise AnnotationError(f"{path} line {line_no}: expected 'start end chord', got {line!r}") from None
        out.append((start, end, symbol))
    return out


def seconds_to_ticks(midi: miditoolkit.MidiFile, seconds: np.ndarray) -> np.ndarray:
    """The tick at each time (seconds) under the file's tempo map (beyond its end: extrapolated)."""
    tick_time = midi.get_tick_to_time_mapping()
    ticks = np.searchsorted(tick_time, seconds, side="left").astype(np.int64)
    beyond = seconds > tick_time[-1]
    if beyond.any():  # past the last event: continue at the last tempo
        last_tempo = midi.tempo_changes[-1].tempo if midi.tempo_changes else 120.0
        ticks[beyond] = len(tick_time) - 1 + np.round(
            (seconds[beyond] - tick_time[-1]) * last_tempo / 60 * midi.ticks_per_beat).astype(np.int64)
    return ticks


def bar_chords(midi: miditoolkit.MidiFile, chords: list[tuple[float, float, str]], where: Path) -> Iterator[tuple[int, str]]:
    """``(bar, label)`` of every chord in every bar it sounds in for MIN_OVERLAP_BEATS or more."""
    if not chords:
        return
    tpb = midi.ticks_per_beat
    bar_ticks = BEATS_PER_BAR * tpb
    times = np.asarray([(s, e) for s, e, _ in chords], dtype=np.float64)
    ticks = seconds_to_ticks(midi, times.reshape(-1)).reshape(-1, 2)
    for (start, end), (_, _, symbol) in zip(ticks, chords):
        try:
            label = harte_label(symbol)
        except ChordNameError as exc:
            raise AnnotationError(f"{where}: chord {symbol!r}: {exc}") from None
        if label is None:
            continue
        for bar in range(int(start) // bar_ticks, max(int(start), int(end) - 1) // bar_ticks + 1):
            overlap = min(int(end), (bar + 1) * bar_ticks) - max(int(start), bar * bar_ticks)
            if overlap >= MIN_OVERLAP_BEATS * tpb:
                yield bar, label


def pop909_rows(data_dir: str | Path, midi_out: str | Path | None = None) -> Iterator[LabelRow]:
    data_dir = Path(data_dir)
    songs = find_songs(data_dir)
    if not songs:
        raise AnnotationError(f"{data_dir}: no POP909 songs (NNN.mid with NNN_chord_midi.txt, or NNN/chord_midi.txt)")
    for midi_path, chord_path in songs:
        rel = midi_path.relative_to(data_dir).as_posix()
        try:  # miditoolkit: its tick -> time table, and the object the 4/4 copy is written from
            midi = miditoolkit.MidiFile(str(midi_path))
        except Exception as exc:  # noqa: BLE001 - mido and miditoolkit raise many types on bad files
            raise AnnotationError(f"{midi_path}: cannot read it: {type(exc).__name__}: {exc}") from None
        seen = set()
        for bar, label in bar_chords(midi, read_chords(chord_path), chord_path):
            if (bar, label) not in seen:
                seen.add((bar, label))
                yield LabelRow(rel, bar, label)
        if midi_out is not None:
            write_4_4_copy(midi, Path(midi_out) / rel)


def write_4_4_copy(midi: miditoolkit.MidiFile, out: Path) -> None:
    """``midi`` with its time signatures replaced by one 4/4 at tick 0, written atomically to ``out``."""
    midi.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    midi.dump(str(tmp))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = converter_parser("python -m preprocess.annotations.pop909", "POP909 chord annotations -> chords per bar for --labels")
    p.add_argument("--midi-out", help="also write 4/4 copies of the MIDI files here (for python -m preprocess)")
    args = p.parse_args(argv)
    return convert(pop909_rows(args.data_dir, args.midi_out), args.out)


if __name__ == "__main__":
    sys.exit(main())
