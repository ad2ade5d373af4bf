"""Packing cost per token against the number of rows per batch, and padding efficiency.

    python bench/packing.py                          # shards from examples/midi, BERT-neighbor
    python bench/packing.py --rows 12 24 48 96 --rounds 5 objective.mode=BERT

Builds shards with the preprocessor in a temporary folder (as ``bench/loader.py`` does),
makes the training bars with their pair views once per measurement (``make_unit``, the
same code the training stream uses; not timed), and times :class:`~musicbert.packing.Packer`
alone (``add`` and ``next_batch``: choosing the rows and building the batch tensors) at
each number of rows per batch of ``data.row_len`` tokens, with the packer's default pool.
Each measurement packs about the same number of tokens; the row counts are measured in
turn, ``--rounds`` times, and the least CPU time per token of each is kept (load from
other processes only ever adds time). Padding efficiency is real tokens / positions over
the measured batches.

The packer runs in DataLoader workers, which use one torch thread
(:func:`musicbert.loader_workers.worker_init`); so does this script. With torch's default
threads, counting a batch's real tokens (a torch reduction, outside the timed part) runs
in parallel once a batch has more than 32,768 positions (32 rows of 1024), and the OpenMP
thread then spins idle for a while, its CPU time counted by ``time.process_time`` inside
the next timed part: a spurious 1.7-2x step between 32 and 40 rows (measured 2026-12-02).

The last line is ``RESULT ns_per_token_12=… ratio_96_12=… padding_efficiency_12=…``
for the smallest and largest row counts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loader import build_shards  # noqa: E402  (bench/ is this script's folder)

from musicbert.config import load_config  # noqa: E402
from musicbert.data import make_unit, read_songs  # noqa: E402
from musicbert.packing import Packer, Unit  # noqa: E402
from musicbert.shards import Song, read_manifest  # noqa: E402


def training_units(songs: list[Song], cfg, seed: int) -> Iterator[Unit]:
    """Endless units: every bar of the corpus in a shuffled order per pass, masked and paired as in training."""
    bars = [(song, b) for song in songs for b in range(song.n_bars)]
    rng = np.random.default_rng(seed)
    for k in itertools.count():
        for i in rng.permutation(len(bars)):
            song, b = bars[i]
            yield make_unit(song, b, np.random.default_rng([seed, k, int(i)]), cfg)


def measure(songs: list[Song], cfg, rows: int, tokens: int, warmup: int) -> dict:
    """CPU seconds per real token of ``Packer.add`` + ``Packer.next_batch`` over about ``tokens`` slots."""
    packer = Packer(rows, cfg.data.row_len)
    units = training_units(songs, cfg, seed=rows)
    n_batches = max(4, round(tokens / (rows * cfg.data.row_len)))
    cpu = 0.0
    real = positions = 0
    for step in range(warmup + n_batches):
        fresh, fresh_tokens = [], 0
        while packer.pool_tokens + fresh_tokens < packer.window_tokens:  # what the stream adds before a batch
            fresh.append(next(units))  # made outside the timed part
            fresh_tokens += fresh[-1].size
        t = time.process_time()
        for unit in fresh:
            packer.add(unit)
        batch = packer.next_batch()
        elapsed = time.process_time() - t
        if step >= warmup:
            cpu += elapsed
            real += batch.n_real_tokens
            positions += batch.segments.numel()
    return {"ns_per_token": 1e9 * cpu / real, "ms_per_batch": 1e3 * cpu / n_batches, "eff": real / positions, "batches": n_batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=REPO / "examples" / "midi", help="folder of MIDI files")
    ap.add_argument("--rows", type=int, nargs="+", default=[12, 24, 48, 96], help="rows per batch to compare")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="token slots packed per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per row count, least kept")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. objective.mode=BERT")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in the DataLoader workers that pack batches (see the docstring)

    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        root = Path(tmp) / "shards"
        build_shards(args.src, root, shard_size=8)
        cfg = load_config(None, [f"data.shards={root}", *args.overrides])
        songs = [song for url in read_manifest(root).shard_paths("train") for song in read_songs(url)]
    print(f"{sum(s.n_bars for s in songs)} training bars, mode {cfg.objective.mode}, rows of {cfg.data.row_len}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    best: dict[int, dict] = {}
    for r in range(args.rounds):
        for rows in args.rows:
            m = measure(songs, cfg, rows, args.tokens, warmup=3)
            print(f"[round {r + 1}] {rows:3d} rows: {m['ns_per_token']:6.1f} ns/token, {m['ms_per_batch']:6.2f} ms/batch "
                  f"({m['batches']} batches), padding efficiency {m['eff']:.4f}")
            if rows not in best or m["ns_per_token"] < best[rows]["ns_per_token"]:
                best[rows] = m

    lo, hi = min(args.rows), max(args.rows)
    print(f"\nleast of {args.rounds} (CPU time of Packer.add + next_batch per real token):")
    print(f"| rows per batch | ns per token | ms per batch | vs {lo} rows | padding efficiency |")
    print("|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        m = best[rows]
        print(f"| {rows} | {m['ns_per_token']:.1f} | {m['ms_per_batch']:.2f} | {m['ns_per_token'] / best[lo]['ns_per_token']:.2f}x "
              f"| {m['eff']:.4f} |")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    print(f"RESULT ns_per_token_{lo}={best[lo]['ns_per_token']:.1f} ns_per_token_{hi}={best[hi]['ns_per_token']:.1f} "
          f"ratio_{hi}_{lo}={best[hi]['ns_per_token'] / best[lo]['ns_per_token']:.2f} "
          f"padding_efficiency_{lo}={best[lo]['eff']:.4f} padding_efficiency_{hi}={best[hi]['eff']:.4f}")


if __name__ == "__main__":
    main()
