"""Groove MIDI Dataset (``info.csv`` beside the MIDI files) -> a label CSV, one label per file.

::

    python -m preprocess.annotations.gmd DATA_DIR --out gmd_style.csv [--what style|bpm|beat_type|drummer]

``info.csv`` is the dataset's own index (``drummer``, ``style`` such as ``funk`` or
``jazz/swing``, ``bpm``, ``beat_type`` beat/fill, ``midi_filename``...). The MIDI files sit
either in the dataset's own tree (``midi_filename``, e.g. ``drummer1/session1/1_funk_80_beat_4-4.mid``)
or flattened into one folder (a ``file`` column, as in the development copy); the path
written is the one that exists under DATA_DIR. ``--what style`` keeps the primary style
(``jazz`` of ``jazz/swing``) unless ``--full-style``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from preprocess.annotations.labelcsv import AnnotationError, LabelRow, convert, converter_parser, read_index

INDEX = "info.csv"
WHAT = ("style", "bpm", "beat_type", "drummer")


def gmd_rows(data_dir: str | Path, what: str = "style", full_style: bool = False) -> Iterator[LabelRow]:
    data_dir = Path(data_dir)
    index = data_dir / INDEX
    for line, row in read_index(index, ("midi_filename", what), "Groove MIDI Dataset"):
        candidates = [row.get("file") or "", row["midi_filename"]]
        path = next((c for c in candidates if c and (data_dir / c).is_file()), candidates[0] or candidates[1])
        label = row[what].strip()
        if what == "style" and not full_style:
            label = label.split("/")[0]
        if not label:
            raise AnnotationError(f"{index} line {line}: empty {what}")
        yield LabelRow(path, None, label)


def main(argv: list[str] | None = None) -> int:
    p = converter_parser("python -m preprocess.annotations.gmd", "Groove MIDI Dataset info.csv -> label CSV for --labels")
    p.add_argument("--what", choices=WHAT, default="style", help="which column (default: style)")
    p.add_argument("--full-style", action="store_true", help="keep sub-styles (jazz/swing) instead of the primary style")
    args = p.parse_args(argv)
    return convert(gmd_rows(args.data_dir, args.what, args.full_style), args.out)


if __name__ == "__main__":
    sys.exit(main())
