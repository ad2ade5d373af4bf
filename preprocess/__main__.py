"""``python -m preprocess --src DIR --out DIR``: MIDI files -> bar-level REMI+ shards.

Finds .mid/.midi/.kar files under --src (recursively, sorted), encodes each in a pool
of worker processes (per-file time limit, crash recovery) and writes --out:
``train|val|test-NNNNNN.tar`` (WebDataset, one sample per song), ``manifest.json`` and
``errors.jsonl`` (one line per file not used, with a reason).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from musicbert.tokenizer.errors import REASONS
from musicbert.tokenizer.midi import Limits
from preprocess.run import DEFAULT_SEED, Options, preprocess_corpus
from preprocess.shards import OutputExists, parse_split


class _Terminated(BaseException):
    """Raised in the main process on SIGTERM so that the run unwinds and cleans up."""


def _terminate(signum, frame):
    raise _Terminated()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="MIDI files -> bar-level REMI+ tokens and per-bar labels in WebDataset shards.",
        epilog="Rejection reasons in errors.jsonl: " + "; ".join(f"{k}: {v}" for k, v in REASONS.items()),
    )
    p.add_argument("--src", required=True, help="folder searched recursively for .mid/.midi/.kar files")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--workers", type=int, default=_cpus(),
                   help="worker processes (default: the CPUs available, %(default)s here); 0 = in this process")
    p.add_argument("--shard-size", type=int, default=1000, help="songs per shard (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the song-level split (default %(default)s)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (swapped in when complete)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per file before its worker is killed (default %(default)s)")
    p.add_argument("--memory-mb", type=int, default=4096, help="memory budget per worker in MiB, 0 = none (default %(default)s)")
    p.add_argument("--max-file-mb", type=float, default=Limits.max_file_bytes / 2**20,
                   help="files larger than this are rejected as too_large (default %(default)s)")
    p.add_argument("--max-notes", type=int, default=Limits.max_notes, help="notes per file limit (default %(default)s)")
    p.add_argument("--max-bars", type=int, default=Limits.max_bars, help="songs spanning more bars are rejected as too_long (default %(default)s)")
    p.add_argument("--no-chords", action="store_true", help="skip chord recognition (chord labels all zero)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        split = parse_split(args.split)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = Options(
        seed=args.seed,
        split=split,
        shard_size=args.shard_size,
        workers=args.workers,
        timeout=args.timeout if args.timeout > 0 else None,
        memory_mb=args.memory_mb or None,
        limits=Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_notes=args.max_notes, max_bars=args.max_bars),
        chords=not args.no_chords,
    )
    # SIGTERM (a batch system's time limit, kill): clean up the temporary folder like Ctrl-C does
    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = preprocess_corpus(args.src, args.out, options, overwrite=args.overwrite,
                                    progress=not args.no_progress)
    except (OutputExists, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, quota, permission: one line; --out is left as it was
        print(f"error: writing {exc.filename or args.out}: {exc.strerror or exc}; --out left as it was", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; --out left as it was", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated; --out left as it was", file=sys.stderr)
        return 143
    print(f"{summary.files} files in {summary.seconds:.1f} s ({summary.files / max(summary.seconds, 1e-9):.1f} files/s), "
          f"{summary.songs} songs kept, {sum(summary.rejected.values())} not used")
    for name, s in summary.splits.items():
        print(f"  {name:5s}: {s.songs} songs, {s.bars} bars, {s.tokens} tokens, {len(s.shards)} shards")
        if s.songs == 0:
            print(f"  warning: split {name!r} is empty", file=sys.stderr)
    if summary.rejected:
        print("  not used: " + ", ".join(f"{k} {v}" for k, v in summary.rejected.items())
              + f" (details in {os.path.join(args.out, 'errors.jsonl')})")
    if summary.worker_restarts:
        print(f"  {summary.worker_restarts} worker(s) were replaced after a crash or timeout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
