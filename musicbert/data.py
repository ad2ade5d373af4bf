"""The streaming data pipeline: WebDataset shards -> bars and pair views -> packed batches.

Training (:class:`TrainStream`)
    An endless stream of :class:`~musicbert.batch.Batch` per rank; a run's length is a
    number of steps, and no rank can run out of data. Everything is *counter-based*: in
    worker ``w`` of rank ``r`` (its "role"), the ``j``-th shard it opens is fixed by
    ``(seed, r, w, j)`` (a fresh permutation of the shard list per pass, so every shard is
    read once per pass, in an order of its own per rank and worker); the bars of that shard
    are visited in an order shuffled by a generator seeded ``(seed, r, w, j)``; a few shards
    are open at once and bars are taken from them in turn (a shuffle across songs); and the
    masking and pair view of the bar at position ``p`` of shard ``j`` use a generator seeded
    ``(seed, r, w, j, p)``. Bars then wait in a pool from which :class:`~musicbert.packing.Packer`
    packs batches of ``cfg.data.max_tokens // cfg.data.row_len`` rows of ``cfg.data.row_len``
    tokens (first-fit decreasing, anchor and positive in the same batch).

    A worker's position is therefore a few integers: the open shards' counters and offsets,
    the next shard counter, whose turn it is, and the pool's ``(j, p, age)`` triples, from
    which the pool's bars are recomputed exactly. Each batch travels with its worker's state
    after it; the main process keeps the state of the last batch it *consumed* from each
    worker and how many batches it consumed, and on restore starts each worker in the role
    that continues DataLoader's round-robin order (batch ``n`` comes from worker ``n % W``).
    So the batches after a resume are exactly those an uninterrupted run would have seen.

Pair views (``cfg.objective.mode``): :func:`musicbert.objectives.pair_view`.

Validation (:func:`val_batches`)
    One fixed pass over the val split. Shards are dealt to the ``world_size x workers`` readers
    (or, with fewer shards than readers, songs are dealt by their index), so each song is
    read exactly once across ranks. Masking is seeded by ``(seed, song id, bar)``: the same
    bar is masked the same way at every evaluation, whatever the number of ranks.

Shard problems: a shard that cannot be opened or read is skipped with a :class:`DataWarning`
naming it (songs read before a read error are kept); a sample that does not decode is
skipped with a warning naming shard and sample (:mod:`musicbert.shard_reader`). DataLoader
workers are set up by :func:`musicbert.loader_workers.worker_init`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from musicbert.batch import Batch, batch_from_buffer, batch_to_buffer
from musicbert.config import Config
from musicbert.distributed import all_reduce_max
from musicbert.loader_workers import worker_init
from musicbert.masking import mask_bar
from musicbert.objectives import pair_view
from musicbert.packing import Packer, Piece, Unit, empty_batch
from musicbert.shard_reader import DataWarning, ShuffledShard, SongBars, read_songs
from musicbert.shards import read_manifest

STATE_FORMAT = "musicbert-train-stream"
STATE_VERSION = 1
MAX_OPEN_SHARDS = 8  # per worker; fewer when shards are large (see _n_open)
MIN_OPEN_SHARDS = 2

# Distinguish the uses of the seed so that no two generators share a stream.
_TAG_SHARDS, _TAG_ORDER, _TAG_BAR, _TAG_VAL = 1, 2, 3, 4


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) % (1 << 63) for k in key])))


# --------------------------------------------------------------------------- bars -> units


def make_unit(song: SongBars, b: int, rng: np.random.Generator, cfg: Config, key: tuple[int, ...] = ()) -> Unit:
    """Bar ``b`` of ``song``: its masked anchor and the pair view of ``cfg.objective.mode``."""
    bar = song.bar(b).astype(np.int64)
    masked, chosen = mask_bar(bar, rng, cfg.objective.mask_ratio)
    positive = pair_view(cfg.objective, bar, masked, song.n_bars, b, song.bar, rng)
    return Unit(Piece(masked, chosen, bar), None if positive is None else Piece(positive), key)


def _n_rows(cfg: Config) -> int:
    return max(1, cfg.data.max_tokens // cfg.data.row_len)


# --------------------------------------------------------------------------- training


class _TrainSource:
    """The bars of one (rank, role), in a fixed, counter-addressed order."""

    def __init__(self, urls: Sequence[str], cfg: Config, rank: int, role: int, gen: int, n_open: int, state: dict | None):
        self.urls = list(urls)
        self.cfg = cfg
        self.key = (cfg.data.seed, gen, rank, role)
        self._perm: tuple[int, np.ndarray] | None = None
        self._cache: dict[int, ShuffledShard] = {}
        self._empty_run = 0
        if state:
            self.open = [list(map(int, s)) for s in state["open"]]
            self.next = int(state["next"])
            self.turn = int(state["turn"])
        else:
            self.open = [[j, 0] for j in range(n_open)]
            self.next = n_open
            self.turn = 0

    def state(self) -> dict:
        return {"open": [list(s) for s in self.open], "next": self.next, "turn": self.turn}

    def url(self, j: int) -> str:
        n = len(self.urls)
        epoch = j // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _rng(*self.key, _TAG_SHARDS, epoch).permutation(n))
        return self.urls[int(self._perm[1][j % n])]

    def shard(self, j: int) -> ShuffledShard:
        if j not in self._cache:
            self._cache[j] = ShuffledShard(self.url(j), _rng(*self.key, _TAG_ORDER, j))
        return self._cache[j]

    def forget_closed(self) -> None:
        keep = {j for j, _ in self.open}
        self._cache = {j: s for j, s in self._cache.items() if j in keep}

    def unit_at(self, j: int, pos: int) -> Unit:
        song, b = self.shard(j).at(pos)
        return make_unit(song, b, _rng(*self.key, _TAG_BAR, j, pos), self.cfg, key=(j, pos))

    def next_unit(self) -> Unit:
        while True:
            i = self.turn % len(self.open)
            j, pos = self.open[i]
            shard = self.shard(j)
            if pos < shard.n_bars:
                self.open[i][1] = pos + 1
                self.turn += 1
                self._empty_run = 0
                return self.unit_at(j, pos)
            # This shard is used up (or unreadable): the slot takes the next shard.
            if shard.n_bars == 0:
                self._empty_run += 1
                if self._empty_run > 2 * len(self.urls) + len(self.open):
                    raise RuntimeError(f"no readable bars in any of the {len(self.urls)} shards, e.g. {self.urls[0]}")
            self._cache.pop(j, None)
            self.open[i] = [self.next, 0]
            self.next += 1


def _train_batches(urls: Sequence[str], cfg: Config, rank: int, role: int, gen: int, n_open: int, state: dict | None) -> Iterator[tuple[Batch, str]]:
    """Endless batches of one role, each with the role's state (JSON) after it."""
    source = _TrainSource(urls, cfg, rank, role, gen, n_open, state.get("source") if state else None)
    packer = Packer(_n_rows(cfg), cfg.data.row_len)
    if state:
        for j, pos, age in state["pool"]:
            unit = source.unit_at(j, pos)
            unit.age = age
            packer.add(unit)
        source.forget_closed()
    n = int(state.get("batches", 0)) if state else 0
    while True:
        while packer.wants_more():
            packer.add(source.next_unit())
        batch = packer.next_batch()
        n += 1
        after = {"source": source.state(), "pool": [[*u.key, u.age] for u in packer.pool], "batches": n}
        yield batch, json.dumps(after)


class _TrainDataset(IterableDataset):
    def __init__(self, urls, cfg, rank, gen, n_open, states, offset, n_roles):
        self.urls, self.cfg, self.rank, self.gen, self.n_open = list(urls), cfg, rank, gen, n_open
        self.states, self.offset, self.n_roles = states, offset, n_roles

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.offset) % self.n_roles
        for batch, state in _train_batches(self.urls, self.cfg, self.rank, role, self.gen, self.n_open, self.states[role] or None):
            yield batch_to_buffer(batch), role, state


def _n_open(cfg: Config, songs: int, shards: int) -> int:
    """Shards open at once per worker: enough to mix ``cfg.data.shuffle_buffer`` songs, within bounds."""
    per_shard = max(1.0, songs / max(1, shards))
    return int(min(MAX_OPEN_SHARDS, max(MIN_OPEN_SHARDS, math.ceil(cfg.data.shuffle_buffer / per_shard))))


class TrainStream:
    """Endless training batches for one rank; ``state_dict()`` / ``load_state_dict()`` resume exactly.

    ``urls`` overrides the manifest's train shards (``cfg.data.shards``). With
    ``cfg.data.workers`` = 0 everything runs in this process.
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, state: dict | None = None, urls: Sequence[str] | None = None):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        if urls is None:
            manifest = read_manifest(cfg.data.shards)
            urls = manifest.shard_paths("train")
            info = manifest.splits["train"]
            self.n_open = _n_open(cfg, info.songs, len(info.shards))
        else:
            self.n_open = MIN_OPEN_SHARDS
        self.urls = list(urls)
        if not self.urls:
            raise ValueError(f"no training shards (cfg.data.shards = {cfg.data.shards!r})")
        self.n_workers = cfg.data.workers
        self.n_roles = max(1, self.n_workers)
        if rank == 0 and len(self.urls) < world_size * self.n_roles:
            warnings.warn(
                f"{len(self.urls)} training shards for {world_size} ranks x {self.n_roles} workers: every worker "
                "reads every shard (in its own order); more, smaller shards mix better",
                DataWarning,
                stacklevel=2,
            )
        self._gen = 0
        self._consumed = 0
        self._states: list[dict] = [{} for _ in range(self.n_roles)]
        self._it: Iterator | None = None
        if state is not None:
            self.load_state_dict(state)

    # -- state
    def state_dict(self) -> dict:
        """This rank's position: JSON-able (str, int, lists, dicts) and ``torch.load(weights_only=True)``-safe."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.cfg.data.seed,
            "rank": self.rank,
            "workers": self.n_roles,
            "n_open": self.n_open,
            "gen": self._gen,
            "consumed": self._consumed,
            "worker_states": json.loads(json.dumps(self._states)),
        }

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict must be called before the first batch is taken")
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} state: format {state.get('format')!r} version {state.get('version')!r}")
        same = {k: state.get(k) for k in ("seed", "rank", "workers")} == {
            "seed": self.cfg.data.seed,
            "rank": self.rank,
            "workers": self.n_roles,
        }
        if not same:
            warnings.warn(
                f"data stream state is for seed {state.get('seed')}, rank {state.get('rank')}, {state.get('workers')} workers; "
                f"this is seed {self.cfg.data.seed}, rank {self.rank}, {self.n_roles} workers: starting a fresh stream "
                "(different from the one before, but not an exact continuation)",
                DataWarning,
                stacklevel=2,
            )
            self._gen = int(state.get("gen", 0)) + 1
            self._consumed = 0
            self._states = [{} for _ in range(self.n_roles)]
            return
        self._gen = int(state["gen"])
        self._consumed = int(state["consumed"])
        self.n_open = int(state.get("n_open", self.n_open))
        self._states = json.loads(json.dumps(state["worker_states"]))

    # -- iteration
    def _start(self) -> None:
        dataset = _TrainDataset(self.urls, self.cfg, self.rank, self._gen, self.n_open, self._states, self._consumed % self.n_roles, self.n_roles)
        workers = self.n_workers
        self._loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=functools.partial(worker_init, os.getpid()) if workers > 0 else None,
        )
        self._it = iter(self._loader)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._start()
        buf, role, state = next(self._it)
        batch = batch_from_buffer(buf)
        if role != self._consumed % self.n_roles:
            raise RuntimeError(f"DataLoader returned a batch of worker role {role}, expected {self._consumed % self.n_roles}")
        self._states[role] = json.loads(state)
        self._consumed += 1
        return batch

    @property
    def consumed(self) -> int:
        return self._consumed

    def close(self) -> None:
        """Stop the workers (a new ``next()`` starts them again from the current state)."""
        self._it = None
        self._loader = None


# --------------------------------------------------------------------------- validation


def _song_seed(song_id: str) -> int:
    try:
        return int(song_id, 16) & ((1 << 63) - 1)
    except ValueError:
        return zlib.crc32(song_id.encode())


def _val_units(urls: Sequence[str], part: int, n_parts: int, cfg: Config) -> Iterator[Unit]:
    if len(urls) >= n_parts:
        mine, deal = list(urls)[part::n_parts], False
    else:
        mine, deal = list(urls), True
    index = 0
    for url in mine:
        for song in read_songs(url):
            index += 1
            if deal and (index - 1) % n_parts != part:
                continue
            bars = SongBars(song.id, song.tokens, song.offsets)
            sid = _song_seed(song.id)
            for b in range(bars.n_bars):
                yield make_unit(bars, b, _rng(cfg.data.seed, _TAG_VAL, sid, b), cfg)


def _val_part_batches(urls: Sequence[str], part: int, n_parts: int, cfg: Config) -> Iterator[Batch]:
    packer = Packer(_n_rows(cfg), cfg.data.row_len)
    for unit in _val_units(urls, part, n_parts, cfg):
        packer.add(unit)
        if not packer.wants_more():
            yield packer.next_batch()
    while len(packer):
        yield packer.next_batch()


class _ValDataset(IterableDataset):
    def __init__(self, urls, cfg, rank, world_size, n_workers):
        self.urls, self.cfg, self.rank, self.world_size, self.n_workers = list(urls), cfg, rank, world_size, n_workers

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n = max(1, self.n_workers)
        for batch in _val_part_batches(self.urls, self.rank * n + worker, self.world_size * n, self.cfg):
            yield batch_to_buffer(batch)


def _all_ranks_any(flag: bool) -> bool:
    """True while any rank still has a batch (one tiny all_reduce)."""
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend and "gloo" not in backend else torch.device("cpu")
    return bool(all_reduce_max([float(flag)], device).item())


def val_batches(
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    urls: Sequence[str] | None = None,
    workers: int | None = None,
) -> Iterator[Batch]:
    """One deterministic pass over the val split (``urls`` overrides the manifest's).

    Every rank yields the same number of batches when ``torch.distributed`` is initialised:
    a rank whose share is used up yields empty batches (``n_bars == 0``) until every rank's
    is, so collectives in the consumer never hang. ``max_batches`` stops every rank after
    that many; ``workers`` defaults to ``cfg.data.workers``.
    """
    if urls is None:
        urls = read_manifest(cfg.data.shards).shard_paths("val")
    urls = list(urls)
    workers = cfg.data.workers if workers is None else workers
    readers = world_size * max(1, workers)
    if rank == 0 and urls and len(urls) < readers:
        warnings.warn(
            f"{len(urls)} val shards for {world_size} ranks x {max(1, workers)} workers: every reader reads every shard "
            "and keeps every n-th song",
            DataWarning,
            stacklevel=2,
        )
    loader = DataLoader(
        _ValDataset(urls, cfg, rank, world_size, workers),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=functools.partial(worker_init, os.getpid()) if workers > 0 else None,
    )
    synced = world_size > 1 and dist.is_available() and dist.is_initialized()
    it = iter(loader)
    n = 0
    done = False
    try:
        while max_batches is None or n < max_batches:
            buf = None if done else next(it, None)
            done = buf is None
            batch = None if done else batch_from_buffer(buf)
            if synced:
                if not _all_ranks_any(batch is not None):
                    return
                if batch is None:
                    batch = empty_batch(_n_rows(cfg), cfg.data.row_len)
            elif batch is None:
                return
            n += 1
            yield batch
    finally:
        del it
