"""MMA-generated songs (``labels.csv`` beside the MIDI files) -> label CSVs.

::

    python -m preprocess.annotations.mma DATA_DIR --out mma_chords.csv              # chord per bar
    python -m preprocess.annotations.mma DATA_DIR --out mma_style.csv --what style  # style per song

``labels.csv`` has one row per file: ``file``, ``style_file`` (the MMA style library, e.g.
``50srock``), ``groove``, ``time_sig``, ``tempo_bpm``, ``key``, ``chords`` (one chord per bar,
``|``-separated) and ``n_bars``. MMA starts the song at tick 0, so chord ``k`` is the chord of
bar ``k`` of the file. Songs not in 4/4 are written too (their bars are the file's own); the
preprocessor keeps only 4/4 songs, so ``--labels`` reports them as unknown paths.

``--what``: ``chords`` (per bar, spelt by :mod:`.chordnames`), ``style`` (``style_file``),
``groove`` (the MMA groove, finer than the style), ``key`` or ``tempo`` (numeric, per song).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from preprocess.annotations.chordnames import ChordNameError, leadsheet_label
from preprocess.annotations.labelcsv import AnnotationError, LabelRow, convert, converter_parser, read_index

INDEX = "labels.csv"
SONG_COLUMNS = {"style": "style_file", "groove": "groove", "key": "key", "tempo": "tempo_bpm"}
WHAT = ("chords", *SONG_COLUMNS)


def mma_rows(data_dir: str | Path, what: str = "chords") -> Iterator[LabelRow]:
    index = Path(data_dir) / INDEX
    column = "chords" if what == "chords" else SONG_COLUMNS[what]
    for line, row in read_index(index, ("file", column), "MMA-generated"):
        if what != "chords":
            yield LabelRow(row["file"], None, row[column].strip())
            continue
        for bar, symbol in enumerate(row["chords"].split("|")):
            try:
                yield LabelRow(row["file"], bar, leadsheet_label(symbol.strip()))
            except ChordNameError as exc:
                raise AnnotationError(f"{index} line {line}: bar {bar}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    p = converter_parser("python -m preprocess.annotations.mma", "MMA labels.csv -> label CSV for --labels")
    p.add_argument("--what", choices=WHAT, default="chords", help="which label (default: chords, one per bar)")
    args = p.parse_args(argv)
    return convert(mma_rows(args.data_dir, args.what), args.out)


if __name__ == "__main__":
    sys.exit(main())
