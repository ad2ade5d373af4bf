"""Converters of annotated datasets to label CSVs (preprocess.annotations), on tiny synthetic
inputs and, where ../shared is present, on the development copies of the real datasets."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import miditoolkit
import numpy as np
import pytest

from musicbert.custom_labels import LabelSpec, PathIndex, match_labels, read_label_file, read_song_entries
from musicbert.tokenizer.chords import chord_name
from musicbert.tokenizer.encode import song_from_midi
from preprocess.annotations import gmd, mma, pop909
from preprocess.annotations.chordnames import ChordNameError, harte_label, leadsheet_label
from preprocess.annotations.labelcsv import AnnotationError
from synthetic_shards import write_song_shards


def read_rows(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as fh:
        return [(r["path"], r["bar"], r["label"]) for r in csv.DictReader(fh)]


def test_chord_spellings():
    assert harte_label("Db:min7/b3") == "C#:min7"
    assert harte_label("B:maj") == "B:maj" and harte_label("A:sus4(b7)") == "A:sus4(b7)" and harte_label("E:7") == "E:dom7"
    assert harte_label("N") is None and harte_label("C") == "C:maj"
    assert leadsheet_label("Dbm") == "C#:min" and leadsheet_label("Bb7") == "A#:dom7" and leadsheet_label("Ebmaj7") == "D#:maj7"
    assert leadsheet_label("G") == "G:maj" and leadsheet_label("Cm7b5/Gb") == "C:m7b5" and leadsheet_label("F#m7") == "F#:min7"
    with pytest.raises(ChordNameError):
        leadsheet_label("H7")


def test_mma_chords_per_bar_and_style_per_song(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "file,style_file,groove,time_sig,tempo_bpm,key,progression,chords,n_bars\n"
        "a.mid,rock,RockPlus,4/4,120,C,x,C|Am|F|G7,4\n"
        "b.mid,waltz,Waltz,3/4,90,Eb,x,Eb|Bbmaj7,2\n"
    )
    assert mma.main([str(tmp_path), "--out", str(tmp_path / "c.csv")]) == 0
    assert read_rows(tmp_path / "c.csv") == [("a.mid", "0", "C:maj"), ("a.mid", "1", "A:min"), ("a.mid", "2", "F:maj"),
                                             ("a.mid", "3", "G:dom7"), ("b.mid", "0", "D#:maj"), ("b.mid", "1", "A#:maj7")]
    assert mma.main([str(tmp_path), "--out", str(tmp_path / "s.csv"), "--what", "style"]) == 0
    assert read_rows(tmp_path / "s.csv") == [("a.mid", "", "rock"), ("b.mid", "", "waltz")]
    (tmp_path / "labels.csv").write_text("file,chords\na.mid,C|Xm\n")
    with pytest.raises(AnnotationError, match=r"labels.csv line 2: bar 1"):
        list(mma.mma_rows(tmp_path))


def test_gmd_style_per_file_in_either_layout(tmp_path):
    (tmp_path / "d1" / "s1").mkdir(parents=True)
    (tmp_path / "d1" / "s1" / "1_funk_80_beat_4-4.mid").write_bytes(b"")
    (tmp_path / "d1__s1__2_jazz-swing_100_beat_4-4.mid").write_bytes(b"")
    (tmp_path / "info.csv").write_text(
        "drummer,style,bpm,midi_filename,file\n"
        "d1,funk,80,d1/s1/1_funk_80_beat_4-4.mid,\n"
        "d1,jazz/swing,100,d1/s1/2_jazz-swing_100_beat_4-4.mid,d1__s1__2_jazz-swing_100_beat_4-4.mid\n"
    )
    assert gmd.main([str(tmp_path), "--out", str(tmp_path / "g.csv")]) == 0
    assert read_rows(tmp_path / "g.csv") == [("d1/s1/1_funk_80_beat_4-4.mid", "", "funk"),
                                             ("d1__s1__2_jazz-swing_100_beat_4-4.mid", "", "jazz")]
    assert [r.label for r in gmd.gmd_rows(tmp_path, "bpm")] == ["80", "100"]
    assert [r.label for r in gmd.gmd_rows(tmp_path, full_style=True)] == ["funk", "jazz/swing"]
    assert gmd.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.csv")]) == 2


def pop_midi(path: Path) -> None:
    """120 BPM for 2 bars (4 s), then 60 BPM: bar 2 spans 4-8 s; a 1/4 time signature as POP909 files have."""
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.time_signature_changes = [miditoolkit.TimeSignature(1, 4, 0)]
    midi.tempo_changes = [miditoolkit.TempoChange(120.0, 0), miditoolkit.TempoChange(60.0, 2 * 1920)]
    piano = miditoolkit.Instrument(program=0, name="PIANO")
    piano.notes = [miditoolkit.Note(80, 60 + (i % 12), i * 240, i * 240 + 200) for i in range(4 * 8)]
    midi.instruments = [piano]
    midi.dump(str(path))


def test_pop909_chords_map_seconds_to_bars_through_the_tempo_map(tmp_path):
    src = tmp_path / "pop"
    src.mkdir()
    pop_midi(src / "001.mid")
    (src / "001_chord_midi.txt").write_text(
        "0.0 4.0 C:maj\n"      # bars 0 and 1
        "4.0 6.0 A:min\n"      # first half of bar 2 (2 beats at 60 BPM)
        "6.0 7.6 F:maj/3\n"    # 1.6 beats of bar 2
        "7.6 8.4 N\n"          # no chord
        "8.4 8.9 G:7\n"        # half a beat of bar 3: too short
    )
    assert pop909.main([str(src), "--out", str(tmp_path / "p.csv"), "--midi-out", str(tmp_path / "44")]) == 0
    assert read_rows(tmp_path / "p.csv") == [("001.mid", "0", "C:maj"), ("001.mid", "1", "C:maj"),
                                             ("001.mid", "2", "A:min"), ("001.mid", "2", "F:maj")]
    copy = miditoolkit.MidiFile(str(tmp_path / "44" / "001.mid"))
    original = miditoolkit.MidiFile(str(src / "001.mid"))
    assert [(t.numerator, t.denominator) for t in copy.time_signature_changes] == [(4, 4)]
    assert [(n.start, n.end, n.pitch) for n in copy.instruments[0].notes] == [(n.start, n.end, n.pitch) for n in original.instruments[0].notes]
    assert song_from_midi(tmp_path / "44" / "001.mid", "001.mid", chords=False).n_bars == 4  # the preprocessor keeps it
    (src / "001_chord_midi.txt").write_text("0.0 x C:maj\n")
    with pytest.raises(AnnotationError, match="001_chord_midi.txt line 1"):
        list(pop909.pop909_rows(src))


def agreement(shards: Path, labels: Path) -> tuple[int, float]:
    """(bars compared, share of them whose annotated chord is among the preprocessor's heuristic chords)."""
    table = match_labels(read_label_file(LabelSpec("x", labels)), PathIndex(read_song_entries(shards)))
    from musicbert.data import read_songs
    from musicbert.shards import read_manifest

    hits = total = 0
    for url in read_manifest(shards).shard_paths("train"):
        for song in read_songs(url):
            rows, y = table.targets([song.id], np.zeros(song.n_bars, np.int64), song.bar_index)
            for r, target in zip(rows, y):
                names = [table.classes[c] for c in (np.flatnonzero(target) if y.ndim == 2 else [target])]
                found = {chord_name(c) for c in np.flatnonzero(song.chords[r])}
                total += 1
                hits += any(n in found for n in names)
    return total, hits / max(total, 1)


def test_real_mma_chords_line_up_with_the_bars(shared_data, tmp_path):
    src = shared_data / "labelled_mma_generated_seed1"
    assert mma.main([str(src), "--out", str(tmp_path / "c.csv")]) == 0
    rows = read_rows(tmp_path / "c.csv")
    assert len({p for p, _, _ in rows}) == 160 and rows[0] == ("mma_0000_50srock_50sRockPlus.mid", "0", "C#:min")
    names = ["mma_0000_50srock_50sRockPlus.mid", "mma_0001_60srock_60sRock1SusPlus.mid", "mma_0004_8beat_8Beat.mid"]
    songs = [song_from_midi(src / n, n) for n in names]
    total, share = agreement(write_song_shards(tmp_path / "s", {"train": songs}), tmp_path / "c.csv")
    # the heuristic recogniser finds the annotated chord in most bars only if the bars line up
    assert total > 80 and share > 0.7, (total, share)


def test_real_pop909_chords_line_up_with_the_bars(shared_data, tmp_path):
    src = tmp_path / "pop"
    src.mkdir()
    for name in ("001.mid", "001_chord_midi.txt", "002.mid", "002_chord_midi.txt"):
        shutil.copy(shared_data / "labelled_pop909_dev_001-150" / name, src / name)
    assert pop909.main([str(src), "--out", str(tmp_path / "p.csv"), "--midi-out", str(tmp_path / "44")]) == 0
    songs = [song_from_midi(tmp_path / "44" / n, n) for n in ("001.mid", "002.mid")]
    total, share = agreement(write_song_shards(tmp_path / "s", {"train": songs}), tmp_path / "p.csv")
    assert total > 100 and share > 0.5, (total, share)


def test_real_gmd_styles(shared_data, tmp_path):
    assert gmd.main([str(shared_data / "labelled_groove_gmd_train"), "--out", str(tmp_path / "g.csv")]) == 0
    rows = read_rows(tmp_path / "g.csv")
    assert len(rows) == 897 and all((shared_data / "labelled_groove_gmd_train" / p).is_file() for p, _, _ in rows)
    assert {"rock", "funk", "jazz", "latin"} <= {label for _, _, label in rows}
