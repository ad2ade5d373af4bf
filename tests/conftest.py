"""Shared test fixtures.

Tests that read the development corpus in ``../shared/data`` skip where it is absent
(a user's clone); the bundled ``examples/midi`` songs are always there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_MIDI = REPO / "examples" / "midi"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (development corpus is optional)")
    return SHARED_DATA
