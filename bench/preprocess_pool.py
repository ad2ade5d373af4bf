"""Preprocessing with a few slow files: wall time against perfect balance, new pool vs old.

    python bench/preprocess_pool.py                       # 400, then 4000 files, 4 of them 10 s, 8 workers
    python bench/preprocess_pool.py --baseline 2382ef3    # also the pool of that commit, same run

Two corpora by default, each run the same way: the issue's example (400 files, 4 of them
10 s), where no schedule comes within 1.3x of perfect balance (a 10 s file cannot be split),
and ten times as many ordinary files with the same 4 slow ones, where perfect balance can
be reached and a corpus of Lakh's size sits: its slow files are a small share of the work.

Runs the whole corpus path (``preprocess_corpus``: pool, results in file order, shard
writer, manifest) on ``--files`` empty ``.mid`` files with a task that sleeps instead of
encoding -- ``--fast`` seconds per file, ``--slow`` seconds for ``--n-slow`` files at
places drawn with a fixed seed -- and returns a synthetic sample of ``--payload-kb`` KiB.
Sleeping needs no CPU, so the figures measure scheduling, not the machine.

Bounds printed beside the wall time:

* *perfect balance* = total task time / workers (what the issue's 7.5 s is);
* *best possible* = max(perfect balance, the longest task): no schedule beats it;
* *in file order* = the wall time of an ideal pool (no overhead) that hands each free
  worker the next file, simulated: the best any pool can do that does not know in
  advance which files are slow.

``--baseline REV`` also runs the pool of commit ``REV`` (``git show REV:preprocess/pool.py``,
loaded as a module of its own) in the same run, and checks that both runs wrote
byte-identical folders. The last line is ``RESULT wall_s_400=… vs_perfect_balance_400=… vs_best_possible_400=…
vs_in_file_order_400=… [old_wall_s_400=…] wall_s_4000=… …``, a group per corpus size.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import heapq
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from musicbert.tokenizer.encode import song_id  # noqa: E402
import preprocess.run  # noqa: E402
from preprocess.run import Options, preprocess_corpus  # noqa: E402


def sleepy_task(slow: frozenset[str], fast_s: float, slow_s: float, payload: int, rel: str) -> tuple:
    """What ``encode_file`` returns, after sleeping ``slow_s`` for the files in ``slow``, else ``fast_s``."""
    time.sleep(slow_s if rel in slow else fast_s)
    data = hashlib.shake_256(rel.encode()).digest(payload)
    return {"__key__": song_id(rel), "tokens.npy": data}, 1, payload // 8, 10


def old_pool_class(rev: str):
    """``TaskPool`` of commit ``rev``, taking (and ignoring) the keyword arguments the new one takes."""
    source = subprocess.run(["git", "show", f"{rev}:preprocess/pool.py"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    # the tokeniser's modules have moved from preprocess/ to musicbert/tokenizer/ since then
    source = source.replace("from preprocess.errors import", "from musicbert.tokenizer.errors import")
    module = types.ModuleType("old_pool")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:preprocess/pool.py", "exec"), module.__dict__)

    class OldPool(module.TaskPool):
        spilled = 0

        def __init__(self, fn, workers, timeout=None, memory_mb=None, **_ignored):
            super().__init__(fn, workers, timeout=timeout, memory_mb=memory_mb)

    return OldPool


def in_file_order(durations: list[float], workers: int) -> float:
    """Makespan of handing each task, in order, to the first worker that is free (no overhead)."""
    free_at = [0.0] * workers
    for d in durations:
        heapq.heappush(free_at, heapq.heappop(free_at) + d)
    return max(free_at)


def run(src: Path, out: Path, task, workers: int) -> tuple[float, object]:
    t = time.perf_counter()
    summary = preprocess_corpus(src, out, Options(workers=workers, shard_size=100), task=task)
    return time.perf_counter() - t, summary


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def scenario(n_files: int, args: argparse.Namespace) -> tuple[int, dict[str, float]]:
    """Run one corpus of ``n_files`` files (old pool first with ``--baseline``); exit status and RESULT figures."""
    names = [f"f{i:05d}.mid" for i in range(n_files)]
    slow_at = sorted(np.random.default_rng(args.seed).choice(n_files, args.n_slow, replace=False).tolist())
    task = functools.partial(sleepy_task, frozenset(names[i] for i in slow_at), args.fast, args.slow, args.payload_kb * 1024)
    total = args.n_slow * args.slow + (n_files - args.n_slow) * args.fast
    balance = total / args.workers
    best = max(balance, args.slow if args.n_slow else args.fast)
    greedy = in_file_order([args.slow if i in slow_at else args.fast for i in range(n_files)], args.workers)
    print(f"\n{n_files} files, {args.n_slow} of them {args.slow:g} s (at {slow_at}), the others {args.fast:g} s; "
          f"{args.workers} workers; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"perfect balance {balance:.2f} s (total {total:.1f} s / {args.workers}); best possible {best:.2f} s; "
          f"in file order {greedy:.2f} s")

    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        for name in names:
            (src / name).touch()
        rows = []
        if args.baseline:
            with mock.patch.object(preprocess.run, "TaskPool", old_pool_class(args.baseline)):
                wall, _ = run(src, tmp / "old", task, args.workers)
            rows.append((f"old pool ({args.baseline})", wall, None))
        wall_new, summary = run(src, tmp / "new", task, args.workers)
        rows.append(("this pool", wall_new, summary.spilled))
        for name, wall, spilled in rows:
            extra = "" if spilled is None else f"; {spilled} results waited on disk"
            print(f"{name:22s} {wall:6.2f} s wall = {wall / balance:.2f}x perfect balance, {wall / best:.2f}x best possible, "
                  f"{wall / greedy:.2f}x in file order{extra}")
        same = True
        if args.baseline:
            same = tree_digest(tmp / "old") == tree_digest(tmp / "new")
            print(f"old and new output folders byte-identical: {same}")
    figures = {"wall_s": wall_new, "vs_perfect_balance": wall_new / balance, "vs_best_possible": wall_new / best,
               "vs_in_file_order": wall_new / greedy}
    if args.baseline:
        figures["old_wall_s"] = rows[0][1]
    return (0 if same else 1), figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, nargs="+", default=[400, 4000], help="corpus sizes, one run each (default %(default)s)")
    ap.add_argument("--n-slow", type=int, default=4)
    ap.add_argument("--fast", type=float, default=0.05, help="seconds per ordinary file (default %(default)s)")
    ap.add_argument("--slow", type=float, default=10.0, help="seconds per slow file (default %(default)s)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--payload-kb", type=int, default=64, help="size of each result (default %(default)s KiB)")
    ap.add_argument("--seed", type=int, default=0, help="draws the places of the slow files")
    ap.add_argument("--baseline", metavar="REV", help="also run the pool of this git commit (e.g. 2382ef3, before issue 14)")
    args = ap.parse_args()

    status, result = 0, []
    for n_files in args.files:
        failed, figures = scenario(n_files, args)
        status |= failed
        result += [f"{key}_{n_files}={value:.2f}" for key, value in figures.items()]
    print(f"peak memory (maxrss): main process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"largest worker {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    print("RESULT " + " ".join(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
