"""Writing a label CSV (``path,bar,label``) atomically, and the converters' shared command line."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


class AnnotationError(ValueError):
    """A dataset's annotation file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class LabelRow:
    path: str  # relative to the dataset folder, as python -m preprocess --src DATA_DIR records it
    bar: int | None  # 0-based 4/4 bar of the MIDI file from tick 0; None: the whole song
    label: str


def read_index(index: Path, columns: Iterable[str], dataset: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a dataset's own CSV index, checked for the columns a converter needs."""
    if not index.is_file():
        raise AnnotationError(f"{index}: not found; is {index.parent} a {dataset} folder with its {index.name}?")
    with open(index, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{index}: lacks column(s) {missing}; it has {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, row


def write_label_csv(rows: Iterable[LabelRow], out: str | Path) -> int:
    """Write ``rows`` to ``out`` (temporary file, then rename); returns the number of rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "bar", "label"])
            for row in rows:
                writer.writerow([row.path, "" if row.bar is None else row.bar, row.label])
                n += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def converter_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("data_dir", help="the dataset folder (the one given to python -m preprocess --src)")
    p.add_argument("--out", required=True, help="label CSV to write (path,bar,label)")
    return p


def convert(rows: Iterable[LabelRow], out: str | Path) -> int:
    """A converter's CLI body: write ``rows`` to ``out`` and say so; exit status 2 on bad annotations."""
    try:
        n = write_label_csv(rows, out)
    except AnnotationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {out}")
    return 0
