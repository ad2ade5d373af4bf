"""Per-bar input corruptions for pre-training (NumPy only, so they run in DataLoader workers).

- :func:`mask_bar`: BERT masking (SPEC §5). ``round(mask_ratio * n_maskable)`` positions are
  chosen among the bar's tokens that are not ``Bar_0``, ``<eob>`` or ``<pad>``; each chosen
  position independently becomes ``<mask>`` with probability 0.8, a random token with
  probability 0.1, and stays unchanged with probability 0.1. The random token is drawn
  uniformly from the musical tokens only (never ``<pad> <unk> <eob> <mask>`` nor ``Bar_0``;
  the reference could insert special tokens there).
- :func:`augment_bar`: the BERT-aug positive view. All non-drum pitches shift by one ``k``
  in ``[-max_pitch_shift, max_pitch_shift]`` and all velocity bins by one ``j`` in
  ``[-max_velocity_shift, max_velocity_shift]``; ``k`` and ``j`` are drawn uniformly among the
  values that keep every pitch in 0..127 and every velocity bin in 0..31. ``Pitch_Drum_*``
  tokens are different tokens and never move.

Both functions take a 1-D array of vocabulary ids (any integer dtype, e.g. the shards'
``uint16``) and a ``numpy.random.Generator``; they return new arrays of the same dtype and
never modify their input.
"""

from __future__ import annotations

import numpy as np

from musicbert.vocab import VOCAB, Vocab

MASK_PROB = 0.8  # of the chosen positions: share replaced by <mask>
RANDOM_PROB = 0.1  # share replaced by a random musical token (the rest, 0.1, stays unchanged)


def maskable_positions(tokens: np.ndarray, vocab: Vocab = VOCAB) -> np.ndarray:
    """Boolean array: True where a token may be chosen for MLM (not ``Bar_0``, ``<eob>``, ``<pad>``)."""
    tokens = np.asarray(tokens)
    return (tokens != vocab.bar_id) & (tokens != vocab.eob_id) & (tokens != vocab.pad_id)


def n_masked(n_maskable: int, mask_ratio: float = 0.15) -> int:
    """How many positions :func:`mask_bar` chooses: ``round(mask_ratio * n_maskable)`` (Python's round)."""
    return int(round(mask_ratio * n_maskable))


def random_token_ids(vocab: Vocab = VOCAB) -> np.ndarray:
    """Ids the random-replacement branch may insert: every token except the specials and ``Bar_0``."""
    excluded = set(vocab.special_ids) | {vocab.bar_id}
    return np.array([i for i in range(len(vocab)) if i not in excluded], dtype=np.int64)


_RANDOM_IDS_CACHE: dict[str, np.ndarray] = {}


def _random_ids(vocab: Vocab) -> np.ndarray:
    ids = _RANDOM_IDS_CACHE.get(vocab.sha256)
    if ids is None:
        ids = _RANDOM_IDS_CACHE[vocab.sha256] = random_token_ids(vocab)
    return ids


def mask_bar(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mask_ratio: float = 0.15,
    vocab: Vocab = VOCAB,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-mask one bar.

    Returns ``(masked, chosen)``: ``masked`` is a copy of ``tokens`` (same dtype) with the
    chosen positions corrupted (80% ``<mask>``, 10% random musical token, 10% unchanged);
    ``chosen`` is a boolean array of the same length, True at the positions whose original
    token is an MLM target (``tokens[chosen]`` are the targets, in order).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"mask_bar expects one bar (1-D ids), got shape {tokens.shape}")
    candidates = np.flatnonzero(maskable_positions(tokens, vocab))
    k = n_masked(len(candidates), mask_ratio)
    masked = tokens.copy()
    chosen = np.zeros(tokens.shape[0], dtype=bool)
    if k == 0:
        return masked, chosen
    picks = rng.choice(candidates, size=k, replace=False)
    chosen[picks] = True
    u = rng.random(k)
    to_mask = picks[u < MASK_PROB]
    to_random = picks[(u >= MASK_PROB) & (u < MASK_PROB + RANDOM_PROB)]
    masked[to_mask] = vocab.mask_id
    if len(to_random):
        ids = _random_ids(vocab)
        masked[to_random] = ids[rng.integers(0, len(ids), size=len(to_random))]
    return masked, chosen


def allowed_shifts(values: np.ndarray, max_shift: int, lo: int, hi: int) -> tuple[int, int]:
    """Inclusive range of shifts ``s`` in ``[-max_shift, max_shift]`` keeping ``values + s`` in ``[lo, hi]``."""
    if values.size == 0:
        return -max_shift, max_shift
    low = max(-max_shift, lo - int(values.min()))
    high = min(max_shift, hi - int(values.max()))
    return low, high


def augment_bar(
    tokens: np.ndarray,
    rng: np.random.Generator,
    max_pitch_shift: int = 6,
    max_velocity_shift: int = 3,
    vocab: Vocab = VOCAB,
) -> np.ndarray:
    """The BERT-aug view of one (unmasked) bar: non-drum pitches + k, velocity bins + j.

    ``k`` is uniform over the shifts in ``[-max_pitch_shift, max_pitch_shift]`` that keep every
    non-drum pitch in 0..127, ``j`` likewise for velocity bins in 0..31 (0 is always allowed,
    so a bar with extreme values still gets a valid, possibly unshifted, view). A bar without
    pitched notes (drums only) keeps its pitches. Returns a new array of the same dtype.
    """
    tokens = np.asarray(tokens)
    ids = tokens.astype(np.int64)
    p0, p1 = vocab.pitch_range
    v0, v1 = vocab.velocity_range
    is_pitch = (ids >= p0) & (ids < p1)
    is_vel = (ids >= v0) & (ids < v1)
    k_lo, k_hi = allowed_shifts(ids[is_pitch] - p0, max_pitch_shift, 0, p1 - p0 - 1)
    j_lo, j_hi = allowed_shifts(ids[is_vel] - v0, max_velocity_shift, 0, v1 - v0 - 1)
    k = int(rng.integers(k_lo, k_hi + 1))
    j = int(rng.integers(j_lo, j_hi + 1))
    ids[is_pitch] += k
    ids[is_vel] += j
    return ids.astype(tokens.dtype)
