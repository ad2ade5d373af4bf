"""BERT masking and the BERT-aug augmentation (musicbert/masking.py)."""

from __future__ import annotations

import numpy as np
import pytest

from musicbert.masking import augment_bar, mask_bar, maskable_positions, n_masked, random_token_ids
from musicbert.vocab import GM_PROGRAM_NAMES, VOCAB

P0 = VOCAB.pitch_range[0]
D0 = VOCAB.drum_pitch_range[0]
V0 = VOCAB.velocity_range[0]


def make_bar(rng: np.random.Generator, n_notes: int, pitches=None, velocities=None, drums=None) -> np.ndarray:
    """A syntactically valid bar: Bar_0 Position_0 Tempo then notes, then <eob>."""
    toks = [VOCAB.bar_id, VOCAB.id("Position_0"), VOCAB.id(f"Tempo_{int(rng.integers(32))}")]
    for i in range(n_notes):
        drum = bool(drums[i]) if drums is not None else bool(rng.random() < 0.3)
        pitch = int(pitches[i]) if pitches is not None else int(rng.integers(128))
        vel = int(velocities[i]) if velocities is not None else int(rng.integers(32))
        toks += [VOCAB.id(f"Position_{int(rng.integers(48))}")]
        if drum:
            toks += [VOCAB.id("Instrument_Drum"), VOCAB.id(f"Pitch_Drum_{pitch}")]
        else:
            toks += [VOCAB.id(f"Instrument_{GM_PROGRAM_NAMES[int(rng.integers(128))]}"),
                     VOCAB.id(f"Pitch_{pitch}")]
        toks += [VOCAB.id(f"Velocity_{vel}"), VOCAB.id(f"Duration_{int(rng.integers(58))}")]
    toks.append(VOCAB.eob_id)
    return np.array(toks, dtype=np.uint16)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("n_notes", [0, 1, 5, 20, 101])
def test_mask_count_and_never_bar_or_eob(n_notes):
    rng = np.random.default_rng(n_notes)
    for _ in range(20):
        bar = make_bar(rng, n_notes)
        masked, chosen = mask_bar(bar, rng)
        n_maskable = int(maskable_positions(bar).sum())
        assert n_maskable == len(bar) - 2
        assert chosen.sum() == round(0.15 * n_maskable) == n_masked(n_maskable)
        assert not chosen[bar == VOCAB.bar_id].any()
        assert not chosen[bar == VOCAB.eob_id].any()
        # Bar_0 and <eob> are never changed, unchosen positions are never changed.
        assert np.array_equal(masked[~chosen], bar[~chosen])
        assert masked.dtype == bar.dtype and masked.shape == bar.shape


def test_mask_never_touches_padding_and_does_not_modify_input():
    rng = np.random.default_rng(0)
    bar = np.concatenate([make_bar(rng, 10), np.zeros(7, dtype=np.uint16)])
    before = bar.copy()
    masked, chosen = mask_bar(bar, rng)
    assert not chosen[bar == VOCAB.pad_id].any()
    assert chosen.sum() == round(0.15 * (len(bar) - 7 - 2))
    assert np.array_equal(bar, before)


def test_mask_80_10_10_proportions_and_random_never_special():
    rng = np.random.default_rng(1)
    n_mask = n_random = n_same = 0
    random_inserted = []
    for _ in range(3000):
        bar = make_bar(rng, 20)
        masked, chosen = mask_bar(bar, rng)
        orig, new = bar[chosen], masked[chosen]
        is_mask = new == VOCAB.mask_id
        is_same = new == orig
        n_mask += int(is_mask.sum())
        n_same += int(is_same.sum())
        other = ~is_mask & ~is_same
        n_random += int(other.sum())
        random_inserted.append(new[other])
    total = n_mask + n_random + n_same
    assert total > 40000
    # A random draw equals the original with probability ~1/555, counted as "same": tiny shift.
    assert abs(n_mask / total - 0.8) < 0.01
    assert abs(n_random / total - 0.1) < 0.01
    assert abs(n_same / total - 0.1) < 0.01
    inserted = np.concatenate(random_inserted)
    forbidden = set(VOCAB.special_ids) | {VOCAB.bar_id}
    assert not set(inserted.tolist()) & forbidden
    # The random branch reaches (nearly) the whole musical vocabulary.
    assert len(set(inserted.tolist())) > 0.95 * len(random_token_ids())


def test_random_token_ids_exclude_specials():
    ids = random_token_ids()
    assert len(ids) == len(VOCAB) - 5
    for sid in (*VOCAB.special_ids, VOCAB.bar_id):
        assert sid not in ids


def test_mask_is_reproducible_with_seed():
    bar = make_bar(np.random.default_rng(3), 30)
    a = mask_bar(bar, np.random.default_rng(42))
    b = mask_bar(bar, np.random.default_rng(42))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# --------------------------------------------------------------------------- augmentation


def _pitches(bar):
    b = bar.astype(np.int64)
    return b[(b >= P0) & (b < P0 + 128)] - P0


def _drums(bar):
    b = bar.astype(np.int64)
    return b[(b >= D0) & (b < D0 + 128)] - D0


def _vels(bar):
    b = bar.astype(np.int64)
    return b[(b >= V0) & (b < V0 + 32)] - V0


def test_augment_shifts_uniformly_and_keeps_everything_else():
    rng = np.random.default_rng(0)
    for _ in range(500):
        bar = make_bar(rng, int(rng.integers(1, 40)))
        aug = augment_bar(bar, rng)
        assert aug.dtype == bar.dtype and aug.shape == bar.shape
        p, pa = _pitches(bar), _pitches(aug)
        v, va = _vels(bar), _vels(aug)
        assert len(p) == len(pa) and len(v) == len(va)
        if len(p):
            k = np.unique(pa - p)
            assert len(k) == 1 and -6 <= k[0] <= 6  # the same k for every non-drum pitch
        ju = np.unique(va - v)
        assert len(ju) == 1 and -3 <= ju[0] <= 3
        assert pa.min(initial=0) >= 0 and pa.max(initial=0) <= 127
        assert va.min() >= 0 and va.max() <= 31
        assert np.array_equal(_drums(bar), _drums(aug))  # drum pitches never shift
        other = ~np.isin(np.arange(len(bar)), np.flatnonzero(
            ((bar >= P0) & (bar < P0 + 128)) | ((bar >= V0) & (bar < V0 + 32))))
        assert np.array_equal(bar[other], aug[other])


def test_augment_respects_range_at_edges_and_covers_allowed_shifts():
    rng = np.random.default_rng(5)
    # Pitches 2..125, velocity bins 1..30: k in [-2, 2], j in [-1, 1].
    bar = make_bar(rng, 4, pitches=[2, 60, 125, 40], velocities=[1, 30, 10, 5], drums=[0, 0, 0, 0])
    ks, js = [], []
    for _ in range(4000):
        aug = augment_bar(bar, rng)
        ks.append(int(_pitches(aug)[0] - 2))
        js.append(int(_vels(aug)[0] - 1))
    assert set(ks) == {-2, -1, 0, 1, 2}
    assert set(js) == {-1, 0, 1}
    counts = np.bincount(np.array(ks) + 2)
    assert counts.min() > 4000 / 5 * 0.85  # uniform over the allowed values


def test_augment_full_range_covered_for_central_values():
    rng = np.random.default_rng(6)
    bar = make_bar(rng, 3, pitches=[50, 60, 70], velocities=[10, 15, 20], drums=[0, 1, 0])
    ks, js = set(), set()
    for _ in range(3000):
        aug = augment_bar(bar, rng)
        ks.add(int(_pitches(aug)[0] - 50))
        js.add(int(_vels(aug)[0] - 10))
    assert ks == set(range(-6, 7))
    assert js == set(range(-3, 4))


def test_augment_extreme_values_only_allow_zero_and_drums_never_move():
    rng = np.random.default_rng(7)
    bar = make_bar(rng, 4, pitches=[0, 127, 0, 127], velocities=[0, 31, 0, 31], drums=[0, 0, 1, 1])
    for _ in range(50):
        aug = augment_bar(bar, rng)
        assert np.array_equal(aug, bar)
    drums_only = make_bar(rng, 6, pitches=[0, 127, 3, 4, 5, 6], drums=[1] * 6)
    for _ in range(50):
        aug = augment_bar(drums_only, rng)
        assert np.array_equal(_drums(aug), _drums(drums_only))
