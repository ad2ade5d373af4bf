"""Fidelity to the reference: this preprocessor's bars against the reference code's, bar for bar.

Usage: ``python bench/fidelity.py [--data DIR] [--reference FILE] [--shards DIR] [--limit N]``.

With no arguments it preprocesses the 523 development files that
``../shared/fidelity/reference_bars_dev.jsonl.gz`` covers (the reference code's output for
them; its README gives the format) into a temporary folder, with this project's default
options, and compares. ``--shards`` compares an existing preprocessor output of
``../shared/data`` instead. It prints:

* files kept by each, bars both keep (same song, same ``bar_index``);
* the share of those bars with identical tokens, and with identical notes (every token but
  the tempo token);
* the agreement of each label (instruments, groove, chords: same set; tempo: same bin;
  mean velocity and mean duration: equal to 1e-4);
* every bar whose notes differ, in classes (:func:`classify`), with counts; each class is
  a documented difference (README, "Differences from the reference implementation");
* notes kept by each on the files both keep, and the files where this project keeps fewer;
* on ``labelled_mma_generated_seed1`` (true chord per bar in ``labels.csv``): the share of
  bars whose chord labels contain the true chord, for each.

The last line is machine-readable: ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from musicbert.probes import iter_split_songs  # noqa: E402
from musicbert.shards import SPLITS  # noqa: E402
from musicbert.tokenizer.chords import PITCH_CLASS_OF_NAME, PITCH_CLASSES, chord_index, chord_name  # noqa: E402
from musicbert.tokenizer.midi import nearest_bin, note_table, read_midi, tempo_map  # noqa: E402
from musicbert.vocab import POSITIONS_PER_BAR, TEMPO_BINS, VOCAB  # noqa: E402
from preprocess.run import Options, preprocess_corpus  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data"
DEFAULT_REFERENCE = SHARED / "fidelity" / "reference_bars_dev.jsonl.gz"
MMA_FOLDER = "labelled_mma_generated_seed1"
TEMPO_TOKEN = 2  # Bar_0 Position_0 Tempo_t
LABELS = ("instruments", "groove", "chords", "tempo", "mean_velocity", "mean_duration")
#: The reference's tempo defects (README, "Differences from the reference implementation"),
#: which this project does not reproduce; :func:`tempo_class` names the ones behind a bar's tempo.
TEMPO_DEFECTS = (
    "tempo read from the first track only",
    "BPM truncated to an integer before binning",
    "tempo in force = first change of the last bar with a change (changes in dropped leading bars unseen)",
)


@dataclass
class BarPair:
    """One bar both keep: the reference's record and this project's tokens and labels."""

    path: str
    ref: dict
    tokens: list[str]
    labels: dict


@dataclass
class Fidelity:
    ref_files: int = 0
    ref_kept: int = 0
    ours_kept: int = 0
    both_kept: int = 0
    ref_bars: int = 0
    ours_bars: int = 0
    both_bars: int = 0
    identical_tokens: int = 0
    identical_notes: int = 0
    label_agree: dict = field(default_factory=dict)
    classes: Counter = field(default_factory=Counter)  # bars whose notes differ, by kind
    tempo_classes: Counter = field(default_factory=Counter)  # bars whose tempo token differs, by cause
    ref_notes: int = 0
    ours_notes: int = 0
    fewer_notes: list = field(default_factory=list)  # (path, ours, ref)
    chord_truth: dict = field(default_factory=dict)  # (who, kind) -> (hits, bars), see chord_truth()

    def share(self, n: int) -> float:
        return n / self.both_bars if self.both_bars else float("nan")


def load_reference(path: Path) -> dict[str, dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {rec["path"]: rec for rec in map(json.loads, f)}


def preprocess_reference_files(data: Path, paths: list[str], out: Path, workers: int) -> Path:
    """Preprocess exactly ``paths`` (relative to ``data``; linked into a temporary tree) into ``out``."""
    corpus = out.parent / "corpus"
    for rel in paths:
        dst = corpus / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((data / rel).resolve(), dst)
    preprocess_corpus(corpus, out, Options(workers=workers))
    return out


def read_our_songs(shards: Path) -> dict[str, object]:
    return {song.path: song for split in SPLITS for song in iter_split_songs(shards, split)}


def our_bar(song, k: int) -> tuple[list[str], dict]:
    tokens = VOCAB.decode(song.bar(k))
    labels = {
        "instruments": set(np.flatnonzero(song.instruments[k]).tolist()),
        "groove": set(np.flatnonzero(song.groove[k]).tolist()),
        "chords": {chord_name(int(c)) for c in np.flatnonzero(song.chords[k])},
        "tempo": int(TEMPO_BINS[int(song.tempo[k])]),
        "mean_velocity": float(song.velocity[k]),
        "mean_duration": float(song.duration[k]),
    }
    return tokens, labels


def ref_labels(bar: dict) -> dict:
    return {
        "instruments": set(bar["inst"]),
        "groove": set(bar["groove"]),
        "chords": set(bar["chord"]),
        "tempo": int(bar["tempo"]),
        "mean_velocity": float(bar["mean_velocity"]),
        "mean_duration": float(bar["mean_duration"]),
    }


def labels_agree(name: str, a, b) -> bool:
    if name in ("mean_velocity", "mean_duration"):
        return abs(a - b) <= 1e-4 * max(1.0, abs(b))
    return a == b


def notes_of(tokens: list[str]) -> list[tuple[str, ...]]:
    """The bar's notes as 5-token tuples (a note cut by the 512-token limit is left out)."""
    body = tokens[3:-1]
    return [tuple(body[i : i + 5]) for i in range(0, len(body) - 4, 5)]


def classify(ours: list[str], ref: list[str]) -> str:
    """The kind of difference between two bars whose notes differ."""
    a, b = notes_of(ours), notes_of(ref)
    if sorted(a) == sorted(b):
        return "same notes, other order"
    if len(ours) == len(ref) == 512:
        return "bar cut at 512 tokens (after another difference)"
    if len(a) == len(b):
        diff = {i for x, y in zip(a, b) for i in range(5) if x[i] != y[i]}
        names = ", ".join(("position", "instrument", "pitch", "velocity", "duration")[i] for i in sorted(diff))
        return f"same number of notes, different {names}"
    return "more notes here" if len(a) > len(b) else "fewer notes here"


def reference_style_tempo_bins(midi, first_bar: int, n_bars: int, defects: tuple[bool, bool, bool]) -> np.ndarray:
    """Tempo bin of every song bar computed with the chosen reference defects (:data:`TEMPO_DEFECTS`)."""
    first_track, truncate, carry = defects
    events = [e for e in midi.tempos if not first_track or e[2] == 0]
    ticks, bpm = tempo_map(events)
    if truncate:
        bpm = np.floor(bpm)
    bars = (ticks * 12 // midi.ticks_per_beat) // POSITIONS_PER_BAR - first_bar
    bins = nearest_bin(bpm, TEMPO_BINS)
    out = np.empty(n_bars, dtype=np.int64)
    current = bins[0]
    for j in range(n_bars):
        inside = np.flatnonzero(bars == j)
        if len(inside):
            current = bins[inside[0]]
        elif not carry:
            before = np.flatnonzero(bars < j)
            current = bins[before[-1]] if len(before) else bins[0]
        out[j] = current
    return out


def tempo_classes(path: Path, j_tempos: dict[int, int]) -> dict[int, str]:
    """For song bars ``j`` whose reference tempo bin is ``j_tempos[j]``, the defects that explain it.

    Tries the defects alone, then in pairs, then all three; a bar no combination explains is
    ``"tempo: unexplained"``.
    """
    midi = read_midi(path)
    table = note_table(midi)
    first_bar = int(table.onset.min()) // POSITIONS_PER_BAR
    n_bars = max(j_tempos) + 1
    combos = sorted((c for c in np.ndindex(2, 2, 2) if any(c)), key=sum)
    models = {c: reference_style_tempo_bins(midi, first_bar, n_bars, tuple(map(bool, c))) for c in combos}
    out = {}
    for j, want in j_tempos.items():
        hit = next((c for c in combos if models[c][j] == want), None)
        out[j] = "tempo: unexplained" if hit is None else "tempo: " + " + ".join(d for d, on in zip(TEMPO_DEFECTS, hit) if on)
    return out


def compare(reference: dict[str, dict], songs: dict[str, object], data: Path) -> Fidelity:
    fid = Fidelity(ref_files=len(reference))
    for path, rec in reference.items():
        ref_bars = rec.get("bars") or []
        song = songs.get(path)
        fid.ref_kept += bool(ref_bars)
        fid.ours_kept += song is not None
        fid.ref_bars += len(ref_bars)
        fid.ours_bars += song.n_bars if song is not None else 0
        if not ref_bars or song is None:
            continue
        fid.both_kept += 1
        ours_by_j = {int(j): k for k, j in enumerate(song.bar_index)}
        ours_notes = sum(len(notes_of(our_bar(song, k)[0])) for k in range(song.n_bars))
        ref_notes = sum(len(notes_of(bar["events"])) for bar in ref_bars)
        fid.ours_notes += ours_notes
        fid.ref_notes += ref_notes
        if ours_notes < ref_notes:
            fid.fewer_notes.append((path, ours_notes, ref_notes))
        tempo_differs: dict[int, int] = {}
        for bar in ref_bars:
            k = ours_by_j.get(int(bar["j"]))
            if k is None:
                continue
            tokens, labels = our_bar(song, k)
            fid.both_bars += 1
            ref_tokens = bar["events"]
            fid.identical_tokens += tokens == ref_tokens
            if tokens[TEMPO_TOKEN] != ref_tokens[TEMPO_TOKEN]:
                tempo_differs[int(bar["j"])] = VOCAB.id(ref_tokens[TEMPO_TOKEN]) - VOCAB.tempo_range[0]
            same_notes = tokens[:TEMPO_TOKEN] + tokens[TEMPO_TOKEN + 1 :] == ref_tokens[:TEMPO_TOKEN] + ref_tokens[TEMPO_TOKEN + 1 :]
            fid.identical_notes += same_notes
            if not same_notes:
                fid.classes[classify(tokens, ref_tokens)] += 1
            rl = ref_labels(bar)
            for name in LABELS:
                fid.label_agree[name] = fid.label_agree.get(name, 0) + labels_agree(name, labels[name], rl[name])
        if tempo_differs:
            fid.tempo_classes.update(tempo_classes(data / path, tempo_differs).values())
    return fid


# ------------------------------------------------------------------ true chords of the MMA songs


def parse_mma_chord(name: str) -> str:
    """``labels.csv`` chord (``Dbm``, ``Ab7``, ``Cmaj7``, ``Ebm7``, ``G``) as ``ROOT:quality``."""
    m = re.fullmatch(r"([A-G][b#]?)(m7|maj7|m|7|)", name)
    if not m:
        raise ValueError(f"unknown chord {name!r} in labels.csv")
    quality = {"": "maj", "m": "min", "7": "dom7", "m7": "min7", "maj7": "maj7"}[m[2]]
    return chord_name(chord_index(PITCH_CLASS_OF_NAME[m[1]], quality))


def chord_truth(data: Path, reference: dict[str, dict], songs: dict[str, object]) -> dict[tuple[str, str], tuple[int, int]]:
    """MMA songs: per side and bar kind, (bars whose chord labels hold the true chord, bars).

    Kinds: ``all`` bars with a true chord, and ``changes``, the bars whose true chord differs
    from the previous bar's (where a chord segment should start).
    """
    labels_csv = data / MMA_FOLDER / "labels.csv"
    if not labels_csv.is_file():
        return {}
    with open(labels_csv, newline="") as f:
        truth = {f"{MMA_FOLDER}/{row['file']}": [parse_mma_chord(c) for c in row["chords"].split("|")] for row in csv.DictReader(f)}
    hits: Counter = Counter()

    def count(who: str, chords: list[str], j: int, found: bool) -> None:
        kinds = ("all", "changes") if j == 0 or chords[j - 1] != chords[j] else ("all",)
        for kind in kinds:
            hits[who, kind, "hit"] += found
            hits[who, kind, "bars"] += 1

    for path, chords in truth.items():
        for bar in (reference.get(path) or {}).get("bars") or []:
            if int(bar["j"]) < len(chords):
                count("reference", chords, int(bar["j"]), chords[int(bar["j"])] in bar["chord"])
        song = songs.get(path)
        for k, j in enumerate(song.bar_index if song is not None else ()):
            if j < len(chords):
                count("ours", chords, int(j), bool(song.chords[k, chord_index(*_split_name(chords[j]))]))
    return {(who, kind): (hits[who, kind, "hit"], hits[who, kind, "bars"])
            for who in ("ours", "reference") for kind in ("all", "changes")}


def _split_name(name: str) -> tuple[int, str]:
    root, quality = name.split(":")
    return PITCH_CLASSES.index(root), quality


# ------------------------------------------------------------------ report


def measure(data: Path, reference_path: Path, shards: Path | None = None, limit: int | None = None,
            workers: int = 2) -> Fidelity:
    reference = load_reference(reference_path)
    if limit is not None:
        reference = dict(sorted(reference.items())[:: max(1, len(reference) // limit)][:limit])
    with tempfile.TemporaryDirectory(prefix="bench_fidelity_") as tmp:
        if shards is None:
            shards = preprocess_reference_files(data, sorted(reference), Path(tmp) / "shards", workers)
        songs = read_our_songs(shards)
    fid = compare(reference, songs, data)
    fid.chord_truth = chord_truth(data, reference, songs)
    return fid


def report(fid: Fidelity) -> str:
    lines = [
        f"files: {fid.ref_files}; kept by the reference {fid.ref_kept}, here {fid.ours_kept}, by both {fid.both_kept}",
        f"bars kept: reference {fid.ref_bars}, here {fid.ours_bars}; both keep {fid.both_bars}",
        f"identical tokens: {fid.identical_tokens} ({fid.share(fid.identical_tokens):.2%})",
        f"identical notes (all but the tempo token): {fid.identical_notes} ({fid.share(fid.identical_notes):.2%})",
        "label agreement: " + ", ".join(f"{n} {fid.share(fid.label_agree.get(n, 0)):.2%}" for n in LABELS),
        f"notes on the files both keep: reference {fid.ref_notes}, here {fid.ours_notes}; "
        f"files where this project keeps fewer: {len(fid.fewer_notes)}",
    ]
    lines += [f"  fewer notes: {p}: {a} here, {b} reference" for p, a, b in fid.fewer_notes[:20]]
    lines.append(f"bars whose notes differ: {fid.both_bars - fid.identical_notes}")
    lines += [f"  {n:6d}  {name}" for name, n in fid.classes.most_common()]
    lines.append(f"bars whose tempo token differs: {sum(fid.tempo_classes.values())}")
    lines += [f"  {n:6d}  {name}" for name, n in fid.tempo_classes.most_common()]
    for (who, kind), (h, n) in sorted(fid.chord_truth.items(), key=lambda x: (x[0][1], x[0][0])):
        what = "bars" if kind == "all" else "bars where the chord changes"
        lines.append(f"MMA true chord among the bar's chord labels, {what}, {who}: {h}/{n} ({h / max(n, 1):.2%})")
    ours_ct, ref_ct = fid.chord_truth.get(("ours", "all"), (0, 1)), fid.chord_truth.get(("reference", "all"), (0, 1))
    lines.append(
        f"RESULT both_bars={fid.both_bars} identical_tokens={fid.share(fid.identical_tokens):.4f} "
        f"identical_notes={fid.share(fid.identical_notes):.4f} "
        + " ".join(f"{n}={fid.share(fid.label_agree.get(n, 0)):.4f}" for n in LABELS)
        + f" chord_truth={ours_ct[0] / max(ours_ct[1], 1):.4f} chord_truth_reference={ref_ct[0] / max(ref_ct[1], 1):.4f}"
        f" files_fewer_notes={len(fid.fewer_notes)}"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="development corpus (default %(default)s)")
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="reference bars (default %(default)s)")
    ap.add_argument("--shards", type=Path, default=None, help="an existing preprocessor output of --data")
    ap.add_argument("--limit", type=int, default=None, help="compare only N files, evenly spread (default: all)")
    ap.add_argument("--workers", type=int, default=2, help="preprocessing workers (default %(default)s)")
    args = ap.parse_args()
    for p in (args.data, args.reference):
        if not p.exists():
            print(f"error: {p} not found", file=sys.stderr)
            return 2
    print(report(measure(args.data, args.reference, args.shards, args.limit, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
