"""Shared test fixtures.

Tests that read the development corpus in ``../shared/data`` skip where it is absent
(a user's clone); the bundled ``examples/midi`` songs are always there.
"""

from __future__ import annotations

import io
from pathlib import Path

import miditoolkit
import pytest

from musicbert.tokenizer.midi import ParsedMidi, parse_midi_bytes

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_MIDI = REPO / "examples" / "midi"
SHARED_DATA = REPO.parent / "shared" / "data"


def reparse(m: miditoolkit.MidiFile) -> ParsedMidi:
    """A file built with miditoolkit, written to bytes and read back as the preprocessor reads files."""
    buf = io.BytesIO()
    m.dump(file=buf)
    return parse_midi_bytes(buf.getvalue())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (development corpus is optional)")
    return SHARED_DATA


#: Options of the ``example_shards`` folder (tests that rebuild it compare against these).
EXAMPLE_SHARDS_OPTIONS = dict(seed=7, shard_size=8, workers=2)


@pytest.fixture(scope="session")
def example_shards(tmp_path_factory) -> Path:
    """A preprocessor output folder built once per session from ``examples/midi``.

    ``python -m preprocess`` with ``--seed 7 --shard-size 8 --workers 2``: 30 of the 34
    songs are kept (4 are not 4/4; see errors.jsonl) and seed 7 (the CLI's default) splits
    them 24/3/3 (train in 3 shards); the fixture asserts that no split is empty.
    Read it with ``musicbert.shards.read_manifest(path)``. Treat it as read-only.
    """
    from musicbert.shards import read_manifest
    from preprocess.run import Options, preprocess_corpus

    out = tmp_path_factory.mktemp("example_shards") / "shards"
    preprocess_corpus(EXAMPLES_MIDI, out, Options(**EXAMPLE_SHARDS_OPTIONS))
    manifest = read_manifest(out)
    empty = [name for name, s in manifest.splits.items() if s.songs == 0]
    assert not empty, f"example_shards: splits {empty} are empty; choose another seed in EXAMPLE_SHARDS_OPTIONS"
    return out
