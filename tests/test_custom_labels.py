"""Annotated labels (``evaluate --labels``): reading, bar mapping from tick 0, probing, reporting.

The synthetic songs are real MIDI files (miditoolkit) run through the preprocessor, so the
bar mapping is the one real corpora get: each bar holds notes of one instrument class, the
label to recover; some songs start with empty bars.
"""

from __future__ import annotations

import json
from pathlib import Path

import miditoolkit
import numpy as np
import pytest

from conftest import reparse
from eval_helpers import tiny_checkpoint
from musicbert import evaluate, report
from musicbert.custom_labels import (
    MULTI_LABEL,
    NUMERIC,
    SINGLE_LABEL,
    LabelFileError,
    LabelSpec,
    PathIndex,
    load_label_tables,
    match_labels,
    read_label_file,
    read_song_entries,
)
from musicbert.tokenizer.encode import song_from_midifile
from musicbert.vocab import VOCAB
from synthetic_shards import write_song_shards

TPB = 480
BAR = 4 * TPB
PROGRAMS = {"piano": 0, "guitar": 24, "violin": 40, "trumpet": 56}
CLASSES = tuple(PROGRAMS)
LOWEST = {"piano": 36, "guitar": 48, "violin": 60, "trumpet": 72}  # each plays its own octave


def song_midi(rng: np.random.Generator, classes: list[str], notes: list[int], lead_empty: int) -> miditoolkit.MidiFile:
    """Bar ``lead_empty + j`` of the file holds ``notes[j]`` notes of instrument ``classes[j]`` (in
    that instrument's octave); earlier bars are empty."""
    midi = miditoolkit.MidiFile(ticks_per_beat=TPB)
    midi.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
    midi.tempo_changes = [miditoolkit.TempoChange(120.0, 0)]
    tracks = {name: miditoolkit.Instrument(program=p, name=name) for name, p in PROGRAMS.items()}
    for j, (cls, n) in enumerate(zip(classes, notes)):
        start = (lead_empty + j) * BAR
        for onset in np.sort(rng.integers(0, 16, n)) * (BAR // 16):
            tracks[cls].notes.append(miditoolkit.Note(90, LOWEST[cls] + int(rng.integers(0, 12)), start + int(onset), start + int(onset) + TPB // 2))
    midi.instruments = [t for t in tracks.values() if t.notes]
    return midi


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shards of 45 train and 45 test songs of 8 bars, and what each file bar holds.

    A third of the songs ("solo") play one instrument throughout, the four in turn: their
    class is also a song-level label. Returns ``(shards, truth)`` with ``truth[path] = (first file bar,
    classes per bar, notes per bar, solo)``.
    """
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("labelled")
    songs = {"train": [], "test": []}
    truth = {}
    for split, n in (("train", 45), ("test", 45)):
        for i in range(n):
            solo = i % 3 == 0
            classes = [CLASSES[i // 3 % 4]] * 8 if solo else [str(c) for c in rng.choice(CLASSES, 8)]
            notes = [int(x) for x in rng.integers(6, 15, 8)]
            lead = int(rng.integers(0, 4))
            path = f"{split}/song{i:02d}.mid"
            songs[split].append(song_from_midifile(reparse(song_midi(rng, classes, notes, lead)), path, chords=False))
            truth[path] = (lead, classes, notes, solo)
    return write_song_shards(root / "shards", songs), truth


def write_csv(path: Path, rows) -> Path:
    path.write_text("path,bar,label\n" + "".join(f"{p},{'' if b is None else b},{l}\n" for p, b, l in rows))
    return path


@pytest.fixture(scope="module")
def label_files(corpus, tmp_path_factory):
    _, truth = corpus
    d = tmp_path_factory.mktemp("labels")
    bars = [(p, lead + j, c) for p, (lead, classes, _, _) in truth.items() for j, c in enumerate(classes)]
    shuffled = np.random.default_rng(1).permutation([c for _, _, c in bars])
    dense = [(p, lead + j, "dense" if n >= 10 else "sparse") for p, (lead, _, notes, _) in truth.items() for j, n in enumerate(notes)]
    return {
        "instrument": write_csv(d / "instrument.csv", bars),
        "shuffled": write_csv(d / "shuffled.csv", [(p, b, c) for (p, b, _), c in zip(bars, shuffled)]),
        "both": write_csv(d / "both.csv", bars + dense),
        "notes": write_csv(d / "notes.csv", [(p, lead + j, n) for p, (lead, _, notes, _) in truth.items() for j, n in enumerate(notes)]),
        "solo": write_csv(d / "solo.csv", [(p, None, classes[0]) for p, (_, classes, _, solo) in truth.items() if solo]),
    }


@pytest.mark.slow
def test_labels_that_follow_the_notes_are_recovered_and_shuffled_ones_are_not(corpus, label_files, tmp_path):
    shards, truth = corpus
    # 128 dims as the demo model: the probes' ridge penalty (alpha 100) is meant for wide features
    tiny_checkpoint(tmp_path / "run", overrides=["model.dim=128", "model.ff_dim=256"])
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(tmp_path / "run"), "--shards", str(shards), "--out", str(out), "--repeats", "2",
                        "--device", "cpu", "--random-init", "--train-bars", "8", "--test-bars", "8"]
                       + [x for name, f in label_files.items() for x in ("--labels", f"{name}={f}")])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["layers"]["2"]
    assert metrics["labels"]["instrument"]["kind"] == SINGLE_LABEL and metrics["labels"]["both"]["kind"] == MULTI_LABEL
    assert metrics["labels"]["notes"]["kind"] == NUMERIC and metrics["labels"]["solo"]["level"] == "song"
    assert all(s["matched"] == s["labelled"] and s["unknown_paths"] == 0 for s in metrics["labels"].values())
    # 4 balanced classes: chance is 0.25
    assert last["instrument"]["mean"] > 0.8, last["instrument"]
    assert abs(last["shuffled"]["mean"] - 0.25) < 0.12, last["shuffled"]
    assert last["solo"]["mean"] > 0.8, last["solo"]
    assert last["both"]["mean"] > 0.8, last["both"]
    counts = np.array([n for _, _, notes, _ in truth.values() for n in notes], dtype=float)
    assert last["notes"]["mean"] < 0.8 * counts.std(), (last["notes"], counts.std())
    assert metrics["better"]["instrument"] == "higher" and metrics["better"]["notes"] == "lower"
    md = (out / "metrics.md").read_text()
    assert "instrument ↑" in md and "notes ↓" in md and "solo: `" in md
    assert (out / "layers.png").stat().st_size > 10_000
    text = report.compare(metrics, metrics)
    assert any(line.startswith("| shuffled | higher") for line in text.splitlines())


def test_file_bars_count_from_tick_0_even_after_empty_bars(tmp_path):
    rng = np.random.default_rng(5)
    # file bars 0-2 empty, bar 3 piano, bar 4 two notes only (not kept), bars 5-6 violin
    midi = song_midi(rng, ["piano", "guitar", "violin", "violin"], [8, 2, 8, 8], lead_empty=3)
    song = song_from_midifile(reparse(midi), "a/b.mid", chords=False)
    assert song.first_bar == 3 and list(song.bar_index) == [0, 2, 3]
    shards = write_song_shards(tmp_path / "s", {"train": [song]})
    csv = write_csv(tmp_path / "l.csv", [("b.mid", 1, "x"), ("a/b.mid", 3, "piano"), ("a/b.mid", 4, "guitar"),
                                         ("a/b.mid", 5, "violin"), ("a/b.mid", 9, "late"), ("c.mid", 0, "x")])
    table = match_labels(read_label_file(LabelSpec("l", csv)), PathIndex(read_song_entries(shards)))
    s = table.summary
    assert (s["matched"], s["bars_before_song"], s["bars_not_kept"], s["bars_after_song"], s["unknown_paths"]) == (2, 1, 1, 1, 1)
    rows, y = table.targets([song.id], np.zeros(3, np.int64), song.bar_index)
    assert list(rows) == [0, 1] and [table.classes[c] for c in y] == ["piano", "violin"]
    # and those kept bars really hold those instruments
    for b, program in ((0, PROGRAMS["piano"]), (1, PROGRAMS["violin"])):
        assert VOCAB.instrument_range[0] + program in set(song.bar(b).tolist())


def test_song_rows_and_bar_rows_combine_into_multilabel(tmp_path):
    csv = write_csv(tmp_path / "m.csv", [("a.mid", None, "rock"), ("a.mid", 2, "loud"), ("b.mid", 0, "soft")])
    f = read_label_file(LabelSpec("m", csv))
    assert f.kind == MULTI_LABEL and f.level == "song and bar" and f.classes == ["loud", "rock", "soft"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label\n", "no label rows"),
        ("file,bar,label\na.mid,1,x\n", "line 1: header"),
        ("path,bar,label\na.mid,1,x\na.mid,-1,y\n", "line 3: bar '-1'"),
        ("path,bar,label\na.mid,1.5,x\n", "line 2: bar '1.5'"),
        ("path,bar,label\na.mid,1,\n", "line 2: empty label"),
        ("path,bar,label\n,1,x\n", "line 2: empty path"),
        ("path,bar,label\na.mid,1,x,extra\n", "line 2: more fields"),
        ("path,bar,label\na.mid,1,3.5\nb.mid,0,1\na.mid,1,4\n", "line 4: a second value for a.mid bar 1"),
        ("path,bar,label\na.mid,,3.5\na.mid,1,4\n", "a.mid has a whole-song value and bar values"),
    ],
)
def test_malformed_label_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LabelFileError) as err:
        read_label_file(LabelSpec("bad", path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_label_specs(tmp_path):
    assert LabelSpec.parse("x/genre.csv") == LabelSpec("genre", Path("x/genre.csv"))
    assert LabelSpec.parse("key=x/k.csv") == LabelSpec("key", Path("x/k.csv"))
    for bad in ("chords=x.csv", "tempo.csv", "a b=x.csv"):
        with pytest.raises(LabelFileError):
            LabelSpec.parse(bad)
    with pytest.raises(LabelFileError, match="given twice"):
        load_label_tables(["a/g.csv", "b/g.csv"], tmp_path)
    with pytest.raises(LabelFileError, match="no such label file"):
        read_label_file(LabelSpec.parse(str(tmp_path / "none.csv")))


def test_bar_labels_need_first_bar_and_bad_files_exit_2(corpus, tmp_path, capsys):
    rng = np.random.default_rng(2)
    song = song_from_midifile(reparse(song_midi(rng, ["piano"] * 3, [8] * 3, 1)), "old.mid", chords=False)
    song.first_bar = None  # as shards written before first_bar was recorded
    shards = write_song_shards(tmp_path / "old", {"train": [song]})
    index = PathIndex(read_song_entries(shards))
    song_level = match_labels(read_label_file(LabelSpec("s", write_csv(tmp_path / "s.csv", [("old.mid", None, "x")]))), index)
    assert song_level.summary["matched"] == 1
    with pytest.raises(LabelFileError, match="preprocess the corpus again"):
        match_labels(read_label_file(LabelSpec("b", write_csv(tmp_path / "b.csv", [("old.mid", 1, "x")]))), index)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,bar,label\nx.mid,one,y\n")
    rc = evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), "--shards", str(corpus[0]), "--out", str(tmp_path / "e"),
                        "--labels", str(bad)])
    assert rc == 2 and f"{bad} line 2: bar 'one'" in capsys.readouterr().err
