"""Probing annotated labels: ``python -m musicbert.evaluate ... --labels [NAME=]FILE.csv``.

Each label file adds one metric per layer, named ``NAME`` (default: the file's stem), probed
on the same sampled bars, features and repeats as the seven metrics of
:mod:`musicbert.probes`.

The CSV (UTF-8, a header line, extra columns ignored)::

    path,bar,label
    pop/001.mid,0,C:maj
    pop/001.mid,1,A:min
    pop/001.mid,1,F:maj          <- a second label for bar 1: a multi-label probe
    jazz/tune.mid,,swing         <- no bar: the whole song is labelled

``path``
    the song's path as recorded in the shards' ``song.json``: relative to the folder given
    to ``python -m preprocess --src``. A path that names no song exactly but is the
    unique tail of one (``001.mid`` for ``pop/001.mid``, at a ``/``) matches that song.
``bar``
    optional: the 0-based bar of the MIDI file counted in 4/4 bars (48 grid steps) from
    tick 0, so that annotations made on the score line up. It is mapped to the song's
    kept bars through ``first_bar`` in ``song.json`` (the bar of the song's first note,
    which is ``bar_index`` 0). An empty ``bar`` labels every bar of the song.
``label``
    a class name, or a number. A bar's labels are those of its own rows plus those of its
    song's rows without a bar.

Kinds (decided from the file)
    ``numeric``      every label is a number: ridge regression (alpha 100), metric RMSE
                     (lower is better). One value per bar: a bar that gets two is an error.
                     Write integer class ids as text (``class_3``) to probe them as classes.
    ``multi-label``  some bar has several labels: ridge classifier, one target per label,
                     metric the weighted ROC-AUC of the ``instruments``/``chords`` metrics.
    ``single-label`` otherwise: ridge classifier over the classes, metric the accuracy of
                     its argmax (the ``tempo`` metric's standard scoring).
    Features are standardised with the training rows' statistics, exactly as for the seven
    metrics (the same helpers do it). Sampled bars without a label are left out of the
    probe's training and test rows. The ``reference`` protocol does not apply (the
    reference has no such metric): these metrics are always scored the standard way.

What does not match is counted, logged and recorded in ``metrics.json`` (``labels``), never
fatal: rows whose path names no song of the shards (the preprocessor rejected the file, or
it is not in the corpus), bar rows before the song's first note or after its last kept
bar, and bar rows on bars the preprocessor did not keep (fewer than 30 tokens). A malformed
file is a :class:`LabelFileError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musicbert.feature_store import FeatureRows, SubsetRows
from musicbert.probes.metrics import METRICS, ProbeError
from musicbert.probes.scoring import probe_accuracy, probe_multilabel, probe_regression
from musicbert.shards import read_manifest

log = logging.getLogger(__name__)

NUMERIC, MULTI_LABEL, SINGLE_LABEL = "numeric", "multi-label", "single-label"
METRIC_OF_KIND = {NUMERIC: "RMSE", MULTI_LABEL: "weighted ROC-AUC", SINGLE_LABEL: "accuracy"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
EXAMPLES_KEPT = 5  # unmatched paths quoted in metrics.json


class LabelFileError(ProbeError):
    """A label file or ``--labels`` option cannot be used; the message names the file and line."""


# ----------------------------------------------------------------------------- the CSV


@dataclass(frozen=True)
class LabelSpec:
    """One ``--labels [NAME=]FILE.csv`` option."""

    name: str
    file: Path

    @classmethod
    def parse(cls, text: str) -> "LabelSpec":
        name, sep, file = text.partition("=")
        if not sep:
            name, file = Path(text).stem, text
        if not NAME_PATTERN.fullmatch(name):
            raise LabelFileError(
                f"--labels {text!r}: metric name {name!r} must start with a letter or digit and hold only "
                f"letters, digits, '_', '.', '-' (give one as NAME=FILE.csv)"
            )
        if name in METRICS:
            raise LabelFileError(f"--labels {text!r}: {name!r} is one of the seven metrics; name it NAME=FILE.csv")
        return cls(name, Path(file))


@dataclass
class LabelFile:
    """A label file as read: labels per song path and per (song path, file bar)."""

    name: str
    file: Path
    kind: str
    classes: list[str]  # sorted class names (empty for numeric)
    song_rows: dict[str, list[int]] = field(default_factory=dict)  # path -> class ids (numeric: [row index])
    bar_rows: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    values: list[float] = field(default_factory=list)  # numeric: the value of each row index
    rows: int = 0

    @property
    def level(self) -> str:
        if self.song_rows and self.bar_rows:
            return "song and bar"
        return "bar" if self.bar_rows else "song"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_label_file(spec: LabelSpec) -> LabelFile:
    """Read and check ``spec.file`` (see the module docstring); raise :class:`LabelFileError`."""
    where = str(spec.file)
    try:
        text = spec.file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelFileError(f"{where}: no such label file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"{where}: cannot read it as UTF-8 text: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise LabelFileError(f"{where} line 1: header {header} lacks column(s) {missing}; expected path,[bar,]label")
    raw: list[tuple[int, str, int | None, str]] = []  # (line, path, bar, label)
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise LabelFileError(f"{where} line {line}: more fields than the header has")
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            bar_text = (row.get("bar") or "").strip()
            if not path and not label and not bar_text:
                continue  # blank line
            if not path:
                raise LabelFileError(f"{where} line {line}: empty path")
            if not label:
                raise LabelFileError(f"{where} line {line}: empty label for {path}")
            bar = None
            if bar_text:
                if not bar_text.isdigit():
                    raise LabelFileError(f"{where} line {line}: bar {bar_text!r} is not a whole number >= 0")
                bar = int(bar_text)
            raw.append((line, path, bar, label))
    except csv.Error as exc:
        raise LabelFileError(f"{where} line {reader.line_num}: not valid CSV: {exc}") from None
    if not raw:
        raise LabelFileError(f"{where}: no label rows")
    numbers = [_number(label) for *_, label in raw]
    if all(v is not None for v in numbers):
        return _numeric_file(spec, raw, numbers)
    classes = sorted({label for *_, label in raw})
    class_id = {c: i for i, c in enumerate(classes)}
    out = LabelFile(spec.name, spec.file, SINGLE_LABEL, classes, rows=len(raw))
    for _, path, bar, label in raw:
        target = out.song_rows.setdefault(path, []) if bar is None else out.bar_rows.setdefault((path, bar), [])
        if class_id[label] not in target:
            target.append(class_id[label])
    if any(len(v) > 1 for v in (*out.song_rows.values(), *out.bar_rows.values())) or (
        out.song_rows and any(path in out.song_rows for path, _ in out.bar_rows)
    ):
        out.kind = MULTI_LABEL
    return out


def _numeric_file(spec: LabelSpec, raw: list, numbers: list[float]) -> LabelFile:
    out = LabelFile(spec.name, spec.file, NUMERIC, [], values=list(numbers), rows=len(raw))
    first_line: dict[object, int] = {}
    for i, (line, path, bar, _) in enumerate(raw):
        key = path if bar is None else (path, bar)
        target = out.song_rows if bar is None else out.bar_rows
        if key in target and numbers[target[key][0]] != numbers[i]:
            raise LabelFileError(
                f"{spec.file} line {line}: a second value for {path}{'' if bar is None else f' bar {bar}'} "
                f"(first on line {first_line[key]}); numeric labels take one value per bar"
            )
        target.setdefault(key, [i])
        first_line.setdefault(key, line)
    clash = sorted({path for path, _ in out.bar_rows} & set(out.song_rows))
    if clash:
        raise LabelFileError(
            f"{spec.file}: {clash[0]} has a whole-song value and bar values; numeric labels take one value per bar"
        )
    return out


# ----------------------------------------------------------------------------- the shards' songs


@dataclass(frozen=True)
class SongEntry:
    id: str
    path: str
    first_bar: int | None
    bar_index: np.ndarray  # int32: song bar of each kept bar


def read_song_entries(shards_dir: str | Path) -> list[SongEntry]:
    """Every song of every split: only ``song.json`` and ``bar_index.npy`` are decoded."""
    manifest = read_manifest(shards_dir)
    entries: list[SongEntry] = []
    for split in manifest.splits:
        for shard in manifest.shard_paths(split):
            entries += _shard_entries(shard)
    return entries


def _shard_entries(shard: str) -> list[SongEntry]:
    meta: dict[str, dict] = {}
    bars: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, name = member.name.partition(".")
                if name not in ("song.json", "bar_index.npy"):
                    continue
                data = tar.extractfile(member).read()
                if name == "song.json":
                    meta[key] = json.loads(data)
                else:
                    bars[key] = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, tarfile.TarError, ValueError) as exc:
        log.warning("label matching skips shard %s: cannot read it: %s", shard, exc)
    return [
        SongEntry(str(m.get("id", key)), str(m.get("path", "")), m.get("first_bar"), bars[key])
        for key, m in meta.items()
        if key in bars
    ]


class PathIndex:
    """Find a song by its path, or by a unique tail of it at a ``/``."""

    def __init__(self, entries: Iterable[SongEntry]) -> None:
        self.exact: dict[str, SongEntry] = {}
        self.tails: dict[str, list[SongEntry]] = {}
        for e in entries:
            self.exact[e.path] = e
            parts = e.path.split("/")
            for i in range(1, len(parts)):
                self.tails.setdefault("/".join(parts[i:]), []).append(e)

    def find(self, path: str) -> SongEntry | None:
        path = path.replace("\\", "/").removeprefix("./")
        if path in self.exact:
            return self.exact[path]
        found = self.tails.get(path, [])
        return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------- matched labels


@dataclass
class LabelTable:
    """A label file matched to the shards' songs: ready to give every sampled bar its target."""

    name: str
    file: Path
    kind: str
    classes: list[str]
    values: list[float]
    song_targets: dict[str, list[int]]  # song id -> class ids (numeric: row index)
    bar_targets: dict[tuple[str, int], list[int]]  # (song id, bar_index) -> class ids
    summary: dict

    @property
    def metric(self) -> str:
        return METRIC_OF_KIND[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.kind != NUMERIC

    def targets(self, song_ids: Sequence[str], song: np.ndarray, bar_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, y)`` for bars given as (song id of each, bar_index of each): the rows that
        have a label, and their targets (multi-hot uint8, class id int64 or value float64)."""
        rows, labels = [], []
        for i, (s, b) in enumerate(zip(song, bar_index)):
            sid = song_ids[int(s)]
            found = self.song_targets.get(sid, []) + self.bar_targets.get((sid, int(b)), [])
            if found:
                rows.append(i)
                labels.append(found)
        rows_arr = np.asarray(rows, dtype=np.int64)
        if self.kind == NUMERIC:
            return rows_arr, np.asarray([self.values[found[0]] for found in labels], dtype=np.float64)
        if self.kind == SINGLE_LABEL:
            return rows_arr, np.asarray([found[0] for found in labels], dtype=np.int64)
        y = np.zeros((len(rows), len(self.classes)), dtype=np.uint8)
        for r, found in enumerate(labels):
            y[r, found] = 1
        return rows_arr, y

    def score(self, train_x: FeatureRows, train, test_x: FeatureRows, test) -> tuple[float, str | None]:
        """The metric on one layer's features; ``train``/``test`` are :class:`musicbert.probes.BarSample`."""
        rows_tr, ytr = self.targets(train.song_ids, train.song, train.bar_index)
        rows_te, yte = self.targets(test.song_ids, test.song, test.bar_index)
        xtr, xte = SubsetRows(train_x, rows_tr), SubsetRows(test_x, rows_te)
        if self.kind == NUMERIC:
            return probe_regression(self.name, xtr, ytr, xte, yte)
        if self.kind == SINGLE_LABEL:
            return probe_accuracy(self.name, xtr, ytr, xte, yte)
        return probe_multilabel(self.name, xtr, ytr, xte, yte, "standard")


def match_labels(labels: LabelFile, index: PathIndex) -> LabelTable:
    """Map a label file's paths to song ids and its file bars to kept bars, counting what does not match."""
    unknown: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    song_targets = _match_song_rows(labels, index, unknown, counts)
    bar_targets = _match_bar_rows(labels, index, unknown, counts)
    keys = len(labels.song_rows) + len(labels.bar_rows)
    summary = {
        "file": str(labels.file),
        "kind": labels.kind,
        "metric": METRIC_OF_KIND[labels.kind],
        "level": labels.level,
        "classes": len(labels.classes),
        "rows": labels.rows,
        "labelled": keys,  # distinct songs (rows without bar) and (song, bar) pairs
        "matched": counts["matched_rows"],
        "unknown_paths": len(unknown),
        "unknown_path_labels": sum(unknown.values()),
        "unknown_path_examples": sorted(unknown)[:EXAMPLES_KEPT],
        "bars_before_song": counts["bars_before_song"],
        "bars_after_song": counts["bars_after_song"],
        "bars_not_kept": counts["bars_not_kept"],
    }
    table = LabelTable(labels.name, labels.file, labels.kind, labels.classes, labels.values, song_targets,
                       bar_targets, summary)
    _log_summary(table)
    return table


def _match_song_rows(labels: LabelFile, index: PathIndex, unknown: Counter, counts: Counter) -> dict[str, list[int]]:
    """Song-level labels by song id (a song named by several paths takes the union of their labels)."""
    song_targets: dict[str, list[int]] = {}
    for path, found in labels.song_rows.items():
        entry = index.find(path)
        if entry is None:
            unknown[path] += 1
            continue
        target = song_targets.setdefault(entry.id, [])
        target += [x for x in found if x not in target]
        counts["matched_rows"] += 1
    return song_targets


def _match_bar_rows(labels: LabelFile, index: PathIndex, unknown: Counter, counts: Counter) -> dict[tuple[str, int], list[int]]:
    """Bar-level labels by (song id, bar counted from the song's first kept bar); bars outside
    the song or not kept are counted by reason. Needs ``first_bar`` in every matched song."""
    bar_targets: dict[tuple[str, int], list[int]] = {}
    kept_bars: dict[str, set[int]] = {}
    no_first_bar = set()
    for (path, bar), found in labels.bar_rows.items():
        entry = index.find(path)
        if entry is None:
            unknown[path] += 1
            continue
        if entry.first_bar is None:
            no_first_bar.add(entry.path)
            continue
        song_bar = bar - int(entry.first_bar)
        if entry.id not in kept_bars:
            kept_bars[entry.id] = set(int(b) for b in entry.bar_index)
        if song_bar < 0:
            counts["bars_before_song"] += 1
        elif song_bar > max(kept_bars[entry.id], default=-1):
            counts["bars_after_song"] += 1
        elif song_bar not in kept_bars[entry.id]:
            counts["bars_not_kept"] += 1
        else:
            bar_targets[(entry.id, song_bar)] = found
            counts["matched_rows"] += 1
    if no_first_bar:
        raise LabelFileError(
            f"{labels.file}: bar labels need shards that record each song's first_bar (song.json); "
            f"{len(no_first_bar)} song(s) such as {sorted(no_first_bar)[0]} lack it: preprocess the corpus again"
        )
    return bar_targets


def _log_summary(table: LabelTable) -> None:
    s = table.summary
    log.info("labels %s (%s, %s, %s level, %d classes): %d of %d labelled songs/bars matched",
             table.name, s["file"], s["kind"], s["level"], s["classes"], s["matched"], s["labelled"])
    if s["unknown_paths"]:
        log.warning("labels %s: %d path(s) name no song of the shards (%d labels), e.g. %s",
                    table.name, s["unknown_paths"], s["unknown_path_labels"], ", ".join(s["unknown_path_examples"]))
    outside = s["bars_before_song"] + s["bars_after_song"]
    if outside or s["bars_not_kept"]:
        log.warning("labels %s: %d bar label(s) outside their song (%d before its first note, %d after its last "
                    "kept bar), %d on bars not kept (fewer than 30 tokens)", table.name, outside,
                    s["bars_before_song"], s["bars_after_song"], s["bars_not_kept"])


def load_label_tables(specs: Sequence[str | LabelSpec], shards_dir: str | Path) -> list[LabelTable]:
    """Parse ``--labels`` options, read the files and match them to the songs of ``shards_dir``."""
    parsed = [s if isinstance(s, LabelSpec) else LabelSpec.parse(s) for s in specs]
    names = [s.name for s in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LabelFileError(f"--labels: metric name(s) {twice} given twice; name them NAME=FILE.csv")
    if not parsed:
        return []
    files = [read_label_file(s) for s in parsed]
    index = PathIndex(read_song_entries(shards_dir))
    return [match_labels(f, index) for f in files]
