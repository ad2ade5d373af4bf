import numpy as np
import pytest

from musicbert.vocab import DURATION_BINS, GM_PROGRAM_NAMES, TEMPO_BINS, VELOCITY_BINS, VOCAB


def test_size_and_order_of_kinds():
    assert len(VOCAB) == 560
    assert VOCAB.tokens[:5] == ("<pad>", "<unk>", "<eob>", "<mask>", "Bar_0")
    order = ["Tempo_0", "Instrument_Acoustic Grand Piano", "Instrument_Drum", "Pitch_0", "Pitch_Drum_0",
             "Position_0", "Duration_0", "Velocity_0", "Velocity_31"]
    ids = [VOCAB.id(t) for t in order]
    assert ids == sorted(ids)
    assert VOCAB.tokens[-1] == "Velocity_31"


@pytest.mark.parametrize(
    "name,rng,count",
    [("tempo_range", "Tempo_", 32), ("pitch_range", "Pitch_", 128), ("drum_pitch_range", "Pitch_Drum_", 128),
     ("position_range", "Position_", 48), ("duration_range", "Duration_", 58), ("velocity_range", "Velocity_", 32)],
)
def test_kind_ranges(name, rng, count):
    lo, hi = getattr(VOCAB, name)
    assert hi - lo == count
    assert VOCAB.token(lo) == f"{rng}0" and VOCAB.token(hi - 1) == f"{rng}{count - 1}"


def test_instrument_range_is_programs_then_drum():
    lo, hi = VOCAB.instrument_range
    assert hi - lo == 129
    assert VOCAB.token(lo + 24) == f"Instrument_{GM_PROGRAM_NAMES[24]}"
    assert VOCAB.token(hi - 1) == "Instrument_Drum"


def test_round_trip_and_unknown_token():
    ids = VOCAB.encode(["Bar_0", "Position_0", "Tempo_5", "<eob>"])
    assert ids.dtype == np.uint16
    assert VOCAB.decode(ids) == ["Bar_0", "Position_0", "Tempo_5", "<eob>"]
    with pytest.raises(KeyError, match="Pitch_128"):
        VOCAB.id("Pitch_128")


def test_bins_match_the_format():
    assert TEMPO_BINS[0] == 30 and TEMPO_BINS[-1] == 210 and len(TEMPO_BINS) == 32
    assert VELOCITY_BINS[0] == 1 and VELOCITY_BINS[-1] == 127 and len(VELOCITY_BINS) == 32
    assert len(DURATION_BINS) == 58 and DURATION_BINS[15] == DURATION_BINS[16] == 21
    assert np.all(np.diff(TEMPO_BINS) > 0) and np.all(np.diff(VELOCITY_BINS) > 0)
