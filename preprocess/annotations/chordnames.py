"""One spelling for chord labels from every dataset: ``ROOT:quality``.

The root is a pitch class spelt with sharps as in :data:`musicbert.tokenizer.chords.PITCH_CLASSES`
(``Db`` and ``C#`` are both ``C#``); an inversion's bass (``/3``) is dropped. Qualities that
are one of the seven the project's chord labels use keep that name (``maj``, ``min``,
``dim``, ``aug``, ``dom7``, ``maj7``, ``min7``); any other quality is kept as written
(``sus4``, ``hdim7``, ``m7b5``...), so that no annotation is silently merged into another.
"""

from __future__ import annotations

import re

from musicbert.tokenizer.chords import PITCH_CLASSES

NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
ROOT = re.compile(r"([A-G])([#b]*)(.*)")
#: Harte syntax (POP909) and lead-sheet suffixes (MMA) of the seven qualities.
QUALITY_NAMES = {
    "maj": "maj", "": "maj", "M": "maj",
    "min": "min", "m": "min",
    "dim": "dim", "o": "dim",
    "aug": "aug", "+": "aug",
    "7": "dom7", "dom7": "dom7",
    "maj7": "maj7", "M7": "maj7",
    "min7": "min7", "m7": "min7",
}


class ChordNameError(ValueError):
    """A chord symbol that has no recognisable root."""


def pitch_class(root: str) -> int:
    m = ROOT.fullmatch(root)
    if m is None or m.group(3):
        raise ChordNameError(f"chord root {root!r} is not a letter A-G with optional # or b")
    return (NATURALS[m.group(1)] + m.group(2).count("#") - m.group(2).count("b")) % 12


def chord_label(root: str, quality: str) -> str:
    """``ROOT:quality`` of a root name and a quality (Harte or lead-sheet spelling)."""
    quality = quality.split("/")[0]
    return f"{PITCH_CLASSES[pitch_class(root)]}:{QUALITY_NAMES.get(quality, quality)}"


def harte_label(symbol: str) -> str | None:
    """``B:maj`` / ``E:min7/b3`` (Harte) -> label; ``N`` / ``X`` (no chord) -> None."""
    if symbol in ("N", "X"):
        return None
    root, _, quality = symbol.partition(":")
    return chord_label(root, quality or "maj")


def leadsheet_label(symbol: str) -> str:
    """``Dbm`` / ``Ab7`` / ``Cmaj7/E`` (lead sheet, as MMA writes them) -> label."""
    m = ROOT.fullmatch(symbol.split("/")[0])
    if m is None:
        raise ChordNameError(f"chord {symbol!r} does not start with a root A-G")
    return chord_label(m.group(1) + m.group(2), m.group(3))
