"""The training and validation pipeline: batch contract, masking, pair views, packing, ranks."""

from __future__ import annotations

import collections
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from synthetic_shards import all_bars, make_shards

from musicbert.batch import Batch
from musicbert.config import load_config
from musicbert.data import TrainStream, read_songs, val_batches
from musicbert.masking import maskable_positions
from musicbert.shards import read_manifest
from musicbert.vocab import VOCAB


@pytest.fixture(scope="module")
def shards(request, tmp_path_factory) -> Path:
    """Real shards from the preprocessor (``example_shards``) when that fixture exists, else synthetic ones."""
    try:
        return Path(request.getfixturevalue("example_shards"))
    except pytest.FixtureLookupError:
        return make_shards(tmp_path_factory.mktemp("shards"), {"train": [12] * 4, "val": [6, 5], "test": [4]})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Shards whose layout the test controls: 6 train shards, a large and a tiny val shard, one-bar songs included."""
    return make_shards(tmp_path_factory.mktemp("synth"), {"train": [10] * 6, "val": [30, 1], "test": [2]}, bars=(1, 30))


def config(root: Path, *overrides: str):
    return load_config(None, [f"data.shards={root}", "data.workers=0", *overrides])


def take(stream, n: int) -> list[Batch]:
    return [next(stream) for _ in range(n)]


def bars_of(batch: Batch) -> list[np.ndarray]:
    """Input ids of each bar, in bar order."""
    out = []
    for row in range(batch.tokens.shape[0]):
        seg = batch.segments[row].numpy()
        tok = batch.tokens[row].numpy()
        for s in range(1, int(seg.max()) + 1):
            out.append(tok[seg == s])
    return out


def originals_of(batch: Batch) -> list[np.ndarray]:
    """Bars with their masked positions restored to the original ids."""
    tokens = batch.tokens.clone()
    tokens[batch.mlm_mask] = batch.mlm_targets
    return bars_of(Batch(tokens, batch.segments, batch.mlm_mask, batch.mlm_targets, batch.pair_anchor, batch.pair_positive))


def mlm_count_per_bar(batch: Batch) -> np.ndarray:
    starts = batch.bar_starts()
    counts = []
    for row, col in starts.tolist():
        seg = batch.segments[row]
        counts.append(int(batch.mlm_mask[row][seg == seg[col]].sum()))
    return np.array(counts)


def check_contract(batch: Batch, cfg) -> None:
    R, L = cfg.data.max_tokens // cfg.data.row_len, cfg.data.row_len
    assert batch.tokens.shape == batch.segments.shape == batch.mlm_mask.shape == (R, L)
    assert batch.tokens.dtype == batch.segments.dtype == torch.int64 and batch.mlm_mask.dtype == torch.bool
    assert batch.mlm_targets.shape == (int(batch.mlm_mask.sum()),)
    assert batch.pair_anchor.shape == batch.pair_positive.shape
    seg, tok = batch.segments, batch.tokens
    assert torch.all(tok[seg == 0] == VOCAB.pad_id)
    assert not torch.any(batch.mlm_mask & (seg == 0))
    for row in range(R):
        s = seg[row]
        n = int((s > 0).sum())
        assert torch.all(s[:n] > 0) and torch.all(s[n:] == 0), "bars are packed from the row's start"
        assert torch.all(torch.diff(s[:n]) >= 0) and torch.all(torch.diff(s[:n]) <= 1) and (n == 0 or s[0] == 1)
    starts = batch.bar_starts()
    assert torch.all(tok[starts[:, 0], starts[:, 1]] == VOCAB.bar_id), "every bar starts with Bar_0"
    for b in bars_of(batch):
        assert b[-1] == VOCAB.eob_id and len(b) <= 512
    targets = batch.mlm_targets
    assert not torch.any((targets == VOCAB.bar_id) | (targets == VOCAB.eob_id) | (targets == VOCAB.pad_id))
    if len(batch.pair_anchor):
        assert int(max(batch.pair_anchor.max(), batch.pair_positive.max())) < batch.n_bars
        assert len(set(batch.pair_anchor.tolist()) | set(batch.pair_positive.tolist())) == 2 * len(batch.pair_anchor)
        counts = mlm_count_per_bar(batch)
        assert np.all(counts[batch.pair_positive.numpy()] == 0), "positive views carry no MLM targets"


@pytest.mark.parametrize("mode", ["BERT", "BERT-aug", "BERT-neighbor", "BERT-dropout"])
def test_batch_contract_and_padding(shards, mode):
    cfg = config(shards, f"objective.mode={mode}")
    batches = take(TrainStream(cfg), 12)
    for batch in batches:
        check_contract(batch, cfg)
    eff = [b.padding_efficiency for b in batches]
    overall = sum(b.n_real_tokens for b in batches) / sum(b.segments.numel() for b in batches)
    assert overall >= 0.96 and min(eff) >= 0.93, eff
    if mode == "BERT":
        assert all(len(b.pair_anchor) == 0 for b in batches)
        assert all(np.all(mlm_count_per_bar(b) > 0) for b in batches)
    else:
        # Nearly every bar is in a pair (BERT-neighbor: not those of one-bar songs).
        paired = sum(2 * len(b.pair_anchor) for b in batches) / sum(b.n_bars for b in batches)
        assert paired > 0.9


def test_small_rows_still_pack(shards):
    # Rows as short as the longest bar (512) cannot be filled as tightly as the default 1024
    # (a bar of 300 leaves room only for bars up to 212), hence the lower bar here.
    cfg = config(shards, "data.row_len=512", "model.max_len=512", "data.max_tokens=4096")
    batches = take(TrainStream(cfg), 10)
    for b in batches:
        check_contract(b, cfg)
    assert np.mean([b.padding_efficiency for b in batches]) >= 0.9


def test_mask_ratio(shards):
    cfg = config(shards, "objective.mode=BERT")
    maskable = masked = 0
    for batch in take(TrainStream(cfg), 8):
        originals = batch.tokens.clone()
        originals[batch.mlm_mask] = batch.mlm_targets
        real = batch.segments > 0
        maskable += int(torch.from_numpy(maskable_positions(originals.numpy())).logical_and(real).sum())
        masked += int(batch.mlm_mask.sum())
        # 80% <mask>, 10% random, 10% unchanged
    assert abs(masked / maskable - cfg.objective.mask_ratio) < 0.01
    inputs = batch.tokens[batch.mlm_mask]
    share_mask = float((inputs == VOCAB.mask_id).float().mean())
    assert 0.7 < share_mask < 0.9


def test_pair_views(synthetic):
    song_of = {}
    for url in read_manifest(synthetic).shard_paths("train"):
        for song in read_songs(url):
            for b in range(song.n_bars):
                song_of.setdefault(tuple(song.bar(b).tolist()), set()).add(song.id)
    for mode in ("BERT-aug", "BERT-neighbor", "BERT-dropout"):
        cfg = config(synthetic, f"objective.mode={mode}")
        unpaired_single = 0
        for batch in take(TrainStream(cfg), 4):
            inputs, originals = bars_of(batch), originals_of(batch)
            paired = set(batch.pair_anchor.tolist()) | set(batch.pair_positive.tolist())
            for a, p in zip(batch.pair_anchor.tolist(), batch.pair_positive.tolist()):
                anchor, pos = originals[a], inputs[p]
                if mode == "BERT-dropout":
                    assert np.array_equal(inputs[a], pos), "same masked tokens"
                elif mode == "BERT-aug":
                    assert len(anchor) == len(pos)
                    p0, p1 = VOCAB.pitch_range
                    v0, v1 = VOCAB.velocity_range
                    is_pitch = (anchor >= p0) & (anchor < p1)
                    is_vel = (anchor >= v0) & (anchor < v1)
                    assert np.array_equal(anchor[~is_pitch & ~is_vel], pos[~is_pitch & ~is_vel])
                    assert len(set((pos[is_pitch] - anchor[is_pitch]).tolist())) <= 1
                    assert len(set((pos[is_vel] - anchor[is_vel]).tolist())) <= 1
                    assert np.all((pos[is_pitch] >= p0) & (pos[is_pitch] < p1))
                else:  # neighbor: an unmasked bar of the same song
                    assert song_of[tuple(anchor.tolist())] & song_of[tuple(pos.tolist())]
            if mode == "BERT-neighbor":
                for i, bar in enumerate(originals):
                    if i not in paired:
                        # only bars of one-bar songs are left without a neighbour
                        unpaired_single += 1
            else:
                assert len(paired) == batch.n_bars
        if mode == "BERT-neighbor":
            assert unpaired_single > 0  # the synthetic corpus has one-bar songs


def test_ranks_see_different_data(shards):
    cfg = config(shards)
    a = [tuple(b.tolist()) for batch in take(TrainStream(cfg, 0, 2), 3) for b in originals_of(batch)]
    b = [tuple(b.tolist()) for batch in take(TrainStream(cfg, 1, 2), 3) for b in originals_of(batch)]
    # Each rank draws its own shards and order; in a small corpus some bars meet by chance.
    assert a[:20] != b[:20]
    assert len(set(a) & set(b)) < 0.5 * len(set(a))


def test_training_covers_every_shard(synthetic):
    cfg = config(synthetic, "objective.mode=BERT", "data.max_tokens=2048")
    want = collections.Counter(tuple(b) for b in all_bars(synthetic, "train"))
    seen = collections.Counter()
    stream = TrainStream(cfg)
    while len(seen) < len(want):
        for bar in originals_of(next(stream)):
            seen[tuple(bar.tolist())] += 1
        assert stream.consumed < 400
    assert set(seen) == set(want)


def val_originals(cfg, rank: int, world: int) -> collections.Counter:
    return collections.Counter(tuple(b.tolist()) for batch in val_batches(cfg, rank, world) for b in originals_of(batch))


def test_val_counts_each_sample_once(synthetic):
    cfg = config(synthetic, "objective.mode=BERT")
    want = collections.Counter(tuple(b) for b in all_bars(synthetic, "val"))
    got = val_originals(cfg, 0, 2) + val_originals(cfg, 1, 2)
    assert got == want
    # More readers than shards: songs are dealt by index instead.
    cfg4 = config(synthetic, "objective.mode=BERT")
    with pytest.warns(UserWarning, match="val shards"):
        parts = [val_originals(cfg4, r, 4) for r in range(4)]
    assert sum(parts, collections.Counter()) == want
    assert all(len(p) for p in parts)


def test_val_is_deterministic(synthetic):
    cfg = config(synthetic)
    one, two = list(val_batches(cfg)), list(val_batches(cfg))
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for name in ("tokens", "segments", "mlm_mask", "mlm_targets", "pair_anchor", "pair_positive"):
            assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.slow
def test_val_with_workers_counts_each_sample_once(synthetic):
    cfg = config(synthetic, "objective.mode=BERT", "data.workers=2")
    want = collections.Counter(tuple(b) for b in all_bars(synthetic, "val"))
    with pytest.warns(UserWarning, match="val shards"):
        got = val_originals(cfg, 0, 2) + val_originals(cfg, 1, 2)
    assert got == want


def _val_rank(rank: int, world: int, root: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = config(Path(root), "objective.mode=BERT")
    counts = []
    for batch in val_batches(cfg, rank, world):
        counts.append(batch.n_bars)
        t = torch.ones(1)
        dist.all_reduce(t)  # a collective per batch, as the loss's gather does
    Path(out, f"rank{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


@pytest.mark.slow
def test_val_no_hang_with_uneven_ranks(synthetic, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_val_rank, args=(2, str(synthetic), port, str(tmp_path)), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(120)
    assert all(p.exitcode == 0 for p in ctx.processes), "a rank hung or failed"
    c0, c1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(c0) == len(c1)  # same number of batches on every rank
    assert c0[-1] == 0 or c1[-1] == 0  # the rank with the tiny shard padded with empty batches
    assert sum(c0) + sum(c1) == len(all_bars(synthetic, "val"))


def test_max_batches(synthetic):
    cfg = config(synthetic)
    assert len(list(val_batches(cfg, max_batches=2))) == 2


@pytest.mark.slow
def test_real_corpus(shared_data, tmp_path):
    """Shards made by the preprocessor from a development corpus (about 10 s)."""
    from preprocess.run import Options, preprocess_corpus

    src = shared_data / "labelled_mma_generated_seed1"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    root = tmp_path / "mma"
    preprocess_corpus(src, root, Options(seed=0, shard_size=16, workers=2))
    for mode in ("BERT", "BERT-neighbor"):
        cfg = config(root, f"objective.mode={mode}")
        batches = take(TrainStream(cfg), 20)
        for b in batches:
            check_contract(b, cfg)
        assert sum(b.n_real_tokens for b in batches) / sum(b.segments.numel() for b in batches) >= 0.97
    cfg = config(root, "objective.mode=BERT")
    want = collections.Counter(tuple(b) for b in all_bars(root, "val"))
    assert val_originals(cfg, 0, 2) + val_originals(cfg, 1, 2) == want
