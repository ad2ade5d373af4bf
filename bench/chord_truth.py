"""The chord recogniser against human chord annotations: POP909's ``*_chord_midi.txt``.

Usage: ``python bench/chord_truth.py [--data DIR]`` (default ``../shared/data/labelled_pop909_dev_001-150``).

A check that the recogniser (``musicbert/tokenizer/chords.py``) is not tuned to the generated MMA songs
that ``bench/fidelity.py`` measures it on. Every ``NNN.mid`` beside its ``NNN_chord_midi.txt``
(chord spans in seconds) and ``NNN_beat_midi.txt`` (beat times; third column 1 on downbeats)
is read with this project's reader (the time-signature check is skipped: most POP909 files
declare 1/4), its quantised notes go through :func:`musicbert.tokenizer.chords.recognise_chords`, and
the chords are compared where the annotation names one of the 84 chords (``N``, ``sus2``,
``maj6``... and inversions' basses are left out or ignored). It prints:

* beat accuracy: the share of quarter-note beats whose recognised chord is the annotated chord
  at the beat's centre;
* bar recall: the share of annotated bars (downbeat to downbeat) whose chord at the downbeat
  is among the chords that start in the bar (a segment starts in the bar whose span holds its
  start time, to an eighth note), and the same on the bars where that chord differs from the
  previous bar's.

The last line is machine-readable: ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from musicbert.tokenizer.chords import (  # noqa: E402
    PITCH_CLASS_OF_NAME,
    ChordSegment,
    beat_chroma,
    chord_index,
    recognise_chords,
)
from musicbert.tokenizer.midi import ParsedMidi, note_table, read_midi, tempo_map  # noqa: E402
from musicbert.vocab import POSITIONS_PER_BEAT  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "labelled_pop909_dev_001-150"
_QUALITIES = {"maj": "maj", "min": "min", "dim": "dim", "aug": "aug", "7": "dom7", "maj7": "maj7", "min7": "min7"}


def annotated_chord(label: str) -> int | None:
    """``Eb:maj7/5`` -> chord index (the bass is ignored); None for ``N`` or a quality outside the 84."""
    if label == "N":
        return None
    root, _, quality = label.partition(":")
    quality = quality.split("/")[0]
    if root not in PITCH_CLASS_OF_NAME or quality not in _QUALITIES:
        return None
    return chord_index(PITCH_CLASS_OF_NAME[root], _QUALITIES[quality])


@dataclass
class Counts:
    beats: int = 0
    beats_right: int = 0
    bars: int = 0
    bars_found: int = 0
    change_bars: int = 0
    change_bars_found: int = 0


def seconds_of_beats(midi: ParsedMidi, beats: np.ndarray) -> np.ndarray:
    """Times in seconds of (fractional) quarter-note beats, from the file's tempo map."""
    ticks, bpm = tempo_map(midi.tempos)
    tpb = midi.ticks_per_beat
    at = np.concatenate([[0.0], np.cumsum(np.diff(ticks) / tpb * 60.0 / bpm[:-1])])
    t = np.asarray(beats, dtype=np.float64) * tpb
    i = np.searchsorted(ticks, t, side="right") - 1
    return at[i] + (t - ticks[i]) / tpb * 60.0 / bpm[i]


def song_segments(path: Path) -> tuple[ParsedMidi, int, list[ChordSegment]]:
    """The parsed file, its number of beats and its recognised chords."""
    midi = read_midi(path)
    table = note_table(midi)
    chroma = beat_chroma(table.onset, table.onset + table.duration, table.pitch, table.velocity,
                         POSITIONS_PER_BEAT, is_drum=table.is_drum)
    return midi, len(chroma.chroma), recognise_chords(chroma)


def measure_song(mid: Path, counts: Counts) -> None:
    """Add one song's beats and bars to ``counts``."""
    stem = mid.with_suffix("")
    spans = [line.split("\t") for line in Path(f"{stem}_chord_midi.txt").read_text().splitlines() if line.strip()]
    starts = np.array([float(a) for a, _, _ in spans])
    ends = np.array([float(b) for _, b, _ in spans])
    chords = [annotated_chord(c.strip()) for _, _, c in spans]

    def truth_at(t: float) -> int | None:
        i = int(np.searchsorted(starts, t, side="right")) - 1
        return chords[i] if 0 <= i and t < ends[i] else None

    midi, n_beats, segments = song_segments(mid)
    recognised = np.full(n_beats, -1)
    for seg in segments:
        recognised[seg.start_beat : seg.end_beat] = seg.index
    for b, t in enumerate(seconds_of_beats(midi, np.arange(n_beats) + 0.5)):
        want = truth_at(t)
        if want is not None:
            counts.beats += 1
            counts.beats_right += recognised[b] == want

    beats = np.loadtxt(f"{stem}_beat_midi.txt", ndmin=2)
    downbeats = beats[beats[:, 2] == 1, 0]
    first_beat = np.array([seg.start_beat for seg in segments])
    start = seconds_of_beats(midi, first_beat)
    eighth = seconds_of_beats(midi, first_beat + 0.5) - start
    # the bar whose span holds the segment's start, to an eighth note (MIDI beats and annotated beats differ a little)
    seg_bar = np.searchsorted(downbeats, start + eighth, side="right") - 1
    previous = None
    for k, t in enumerate(downbeats):
        want = truth_at(t + 1e-3)
        if want is not None:
            found = any(seg.index == want for seg, bar in zip(segments, seg_bar) if bar == k)
            counts.bars += 1
            counts.bars_found += found
            if want != previous:
                counts.change_bars += 1
                counts.change_bars_found += found
        previous = want


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="POP909 folder (default %(default)s)")
    args = ap.parse_args()
    files = sorted(p for p in args.data.glob("*.mid") if Path(f"{p.with_suffix('')}_chord_midi.txt").is_file())
    if not files:
        print(f"error: no NNN.mid with NNN_chord_midi.txt in {args.data}", file=sys.stderr)
        return 2
    counts = Counts()
    for mid in files:
        measure_song(mid, counts)
    c = counts
    print(f"songs: {len(files)}")
    print(f"beat accuracy: {c.beats_right}/{c.beats} ({c.beats_right / c.beats:.2%})")
    print(f"bar recall: {c.bars_found}/{c.bars} ({c.bars_found / c.bars:.2%}); on bars where the chord changes: "
          f"{c.change_bars_found}/{c.change_bars} ({c.change_bars_found / c.change_bars:.2%})")
    print(f"RESULT songs={len(files)} beat_accuracy={c.beats_right / c.beats:.4f} bar_recall={c.bars_found / c.bars:.4f} "
          f"change_bar_recall={c.change_bars_found / c.change_bars:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
