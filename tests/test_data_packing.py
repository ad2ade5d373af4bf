"""The packer on its own: exact subset sums, pairs kept together, nothing waits for ever."""

from __future__ import annotations

import itertools
from operator import itemgetter

import numpy as np
import torch

from musicbert.batch import batch_from_buffer, batch_to_buffer
from musicbert.packing import Packer, Piece, Unit, empty_batch, subset_sum
from musicbert.vocab import VOCAB


def test_subset_sum_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 60, size=int(rng.integers(0, 9))).tolist()
        cap = int(rng.integers(0, 150))
        best = max((sum(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r) if sum(c) <= cap), default=0)
        chosen = subset_sum(list(enumerate(sizes)), cap, size=itemgetter(1))
        assert len({i for i, _ in chosen}) == len(chosen)
        assert sum(n for _, n in chosen) == best
        assert sum(subset_sum(sizes, cap)) == best  # plain sizes


def test_subset_sum_reads_only_until_the_cap_is_reached_exactly():
    read = []

    def sizes():
        for n in itertools.cycle([7, 5, 11]):  # endless
            read.append(n)
            yield n

    assert sum(subset_sum(sizes(), 23)) == 23
    assert read == [7, 5, 11]  # 7 + 5 + 11 = 23: nothing after the third is read


def bar(n: int, tag: int) -> np.ndarray:
    out = np.full(n, 200 + tag % 300, dtype=np.int64)
    out[0], out[-1] = VOCAB.bar_id, VOCAB.eob_id
    return out


def random_unit(rng: np.random.Generator, key: int) -> Unit:
    """A bar of 30..512 tokens, with a positive view of 30..512 tokens 70% of the time."""
    a = int(rng.integers(30, 513))
    anchor = Piece(bar(a, key), np.zeros(a, dtype=bool), bar(a, key))
    positive = Piece(bar(int(rng.integers(30, 513)), key)) if rng.random() < 0.7 else None
    return Unit(anchor, positive, key=(key,))


def test_pairs_stay_together_and_no_unit_starves():
    rng = np.random.default_rng(1)
    packer = Packer(n_rows=4, row_len=1024)
    effs = []
    next_id, first_seen, batches_of = 0, {}, {}
    for step in range(200):
        while packer.wants_more():
            packer.add(random_unit(rng, next_id))
            first_seen[next_id] = step
            next_id += 1
        before = {u.key[0] for u in packer.pool}
        batch = packer.next_batch()
        after = {u.key[0] for u in packer.pool}
        for k in before - after:
            batches_of[k] = step
        starts = batch.bar_starts()
        for a, p in zip(batch.pair_anchor.tolist(), batch.pair_positive.tolist()):
            ra, ca = starts[a].tolist()
            rp, cp = starts[p].tolist()
            assert batch.tokens[ra, ca + 1] == batch.tokens[rp, cp + 1], "anchor and positive of one unit"
        effs.append(batch.padding_efficiency)
    assert np.mean(effs) > 0.97
    waited = [batches_of[k] - first_seen[k] for k in batches_of]
    assert max(waited) <= packer.max_age + 2
    assert len(batches_of) > 0.9 * next_id


def test_buffer_roundtrip():
    packer = Packer(n_rows=2, row_len=64)
    for n in (20, 30, 40):
        chosen = np.zeros(n, dtype=bool)
        chosen[3:6] = True
        packer.add(Unit(Piece(bar(n, n), chosen, bar(n, n) + 1), Piece(bar(n // 2, n))))
    batch = packer.next_batch()
    back = batch_from_buffer(batch_to_buffer(batch))
    for name in ("tokens", "segments", "mlm_mask", "mlm_targets", "pair_anchor", "pair_positive"):
        assert torch.equal(getattr(batch, name), getattr(back, name)), name
        assert getattr(batch, name).dtype == getattr(back, name).dtype
    empty = empty_batch(3, 16)
    assert empty.n_bars == 0 and empty.tokens.shape == (3, 16) and len(empty.mlm_targets) == 0


def test_large_batches_pack_as_tightly_and_deterministically():
    """96 rows: each row still chooses among the oldest units only, and fills as well as 4 rows do."""

    def run() -> tuple[list[float], list[bytes]]:
        rng = np.random.default_rng(2)
        packer = Packer(n_rows=96, row_len=1024)
        effs, digests, next_id = [], [], 0
        for _ in range(6):
            while packer.wants_more():
                packer.add(random_unit(rng, next_id))
                next_id += 1
            batch = packer.next_batch()
            effs.append(batch.padding_efficiency)
            digests.append(batch.tokens.numpy().tobytes() + batch.pair_anchor.numpy().tobytes())
        return effs, digests

    effs, digests = run()
    assert np.mean(effs) > 0.98
    assert run()[1] == digests
