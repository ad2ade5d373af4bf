"""The corpus run: find MIDI files, encode them in a worker pool, write the output folder.

:func:`preprocess_corpus` is what ``python -m preprocess`` calls; tests call it directly.
The result depends only on the files and the options that change content (seed, split,
shard size, limits): ``workers`` and timing do not change a byte of the output (except
which files hit the time limit, naturally).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from musicbert.shards import SPLITS
from musicbert.tokenizer.encode import song_from_midifile, song_id
from musicbert.tokenizer.midi import Limits, read_midi
from preprocess.pool import TaskPool, run_in_process
from preprocess.shards import ErrorLog, OutputDir, SplitWriter, assign_split, write_manifest

EXTENSIONS = (".mid", ".midi", ".kar")
#: The default --seed. Chosen so that the 30 usable bundled songs (examples/midi) split
#: exactly 24/3/3 (tests/conftest.py checks that no split is empty); any seed is fine for
#: a large corpus, where the split sizes follow the fractions closely.
DEFAULT_SEED = 7


@dataclass(frozen=True)
class Options:
    seed: int = DEFAULT_SEED
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shard_size: int = 1000  # songs per shard
    workers: int = 1  # worker processes; 0 = run in this process (no isolation, for debugging)
    timeout: float | None = 120.0  # seconds per file
    memory_mb: int | None = 4096  # address-space budget per worker on top of its start size
    limits: Limits = field(default_factory=Limits)
    chords: bool = True

    def content_options(self) -> dict:
        """What goes into manifest.json: the options that determine the output's content."""
        return {
            "seed": self.seed,
            "split": list(self.split),
            "shard_size": self.shard_size,
            "timeout_s": self.timeout,
            "memory_mb": self.memory_mb,
            **asdict(self.limits),
            "chords": self.chords,
            "extensions": list(EXTENSIONS),
            "time_signature": "4/4 only (no time-signature event counts as 4/4)",
            "min_bar_tokens": 30,
            "max_bar_tokens": 512,
        }


@dataclass
class Summary:
    """What a run did (the CLI prints it; the bench reads the rates)."""

    out: Path
    files: int = 0
    notes: int = 0
    splits: dict = field(default_factory=dict)  # split -> SplitInfo
    rejected: dict = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    worker_restarts: int = 0
    spilled: int = 0  # results parked on disk because an earlier file was still running

    @property
    def songs(self) -> int:
        return sum(s.songs for s in self.splits.values())


def find_midi_files(src: str | Path) -> list[str]:
    """Relative POSIX paths of every .mid/.midi/.kar file under ``src`` (any case), sorted."""
    src = Path(src)
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(src)
        for name in filenames:
            if name.lower().endswith(EXTENSIONS):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def encode_file(src: str, limits: Limits, chords: bool, rel: str) -> tuple:
    """Worker task: one file -> ``(sample, n_bars, n_tokens, n_notes)`` (raises MidiRejected)."""
    midi = read_midi(os.path.join(src, rel), limits)
    song = song_from_midifile(midi, rel, limits, chords=chords)
    return song.to_sample(), song.n_bars, len(song.tokens), midi.n_notes


def _files_to_encode(src: Path, out: str | Path, options: Options) -> list[str]:
    """The MIDI files under ``src`` (relative paths), after checking the folders and options."""
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    if options.shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {options.shard_size}")
    out_abs, src_abs = Path(out).resolve(), src.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        raise ValueError(f"--out {out} contains --src {src}; writing there would replace the MIDI files")
    files = find_midi_files(src)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(EXTENSIONS)} files under {src}")
    return files


def _progress_bar(n_files: int) -> tqdm:
    tqdm.monitor_interval = 0  # no monitor thread (workers may be forked later)
    interval = 0.5 if sys.stderr.isatty() else 30.0  # a batch job's log gets a line per 30 s
    return tqdm(total=n_files, unit="file", dynamic_ncols=True, smoothing=0.05, mininterval=interval)


def preprocess_corpus(
    src: str | Path,
    out: str | Path,
    options: Options = Options(),
    overwrite: bool = False,
    progress: bool = False,
    task: Callable[[str], Any] | None = None,
) -> Summary:
    """Encode every MIDI file under ``src`` into the shard folder ``out``.

    ``task`` (tests and benchmarks) replaces the per-file work: a picklable callable taking the
    relative path and returning what :func:`encode_file` returns.
    Raises :class:`preprocess.shards.OutputExists` before any work if ``out`` is not empty
    and ``overwrite`` is false, ``FileNotFoundError`` if ``src`` has no MIDI files.
    """
    src = Path(src)
    files = _files_to_encode(src, out, options)
    outdir = OutputDir(out, overwrite=overwrite)
    t0 = time.perf_counter()
    summary = Summary(out=Path(out), files=len(files))
    fn = task or functools.partial(encode_file, str(src), options.limits, options.chords)
    pool = None
    bar = None
    try:
        writers = {name: SplitWriter(outdir.tmp, name, options.shard_size) for name in SPLITS}
        errors = ErrorLog(outdir.tmp)
        tasks = ((rel,) for rel in files)
        if options.workers <= 0:
            results = run_in_process(fn, tasks)
        else:
            # Results that finish ahead of a slow file wait in the output's temporary folder (same disk).
            pool = TaskPool(fn, options.workers, timeout=options.timeout, memory_mb=options.memory_mb, spill_dir=outdir.tmp)
            results = pool.map(tasks)
        if progress:
            bar = _progress_bar(len(files))
        for index, result in results:
            rel = files[index]
            if result[0] == "ok":
                sample, n_bars, n_tokens, n_notes = result[1]
                split = assign_split(song_id(rel), options.seed, options.split)
                writers[split].write(sample, n_bars, n_tokens)
                summary.notes += n_notes
            else:
                errors.write(rel, result[1], result[2])
            if bar is not None:
                # every file (not refreshed each time): the bar's last line shows the final counts
                bar.set_postfix(songs=sum(w.songs for w in writers.values()), rejected=errors.count, refresh=False)
                bar.update(1)
        if pool is not None:
            summary.worker_restarts = pool.restarts
            summary.spilled = pool.spilled
            pool.close()
            pool = None
        summary.splits = {name: w.close() for name, w in writers.items()}
        errors.close()
        summary.rejected = dict(sorted(errors.by_reason.items()))
        write_manifest(
            outdir.tmp,
            summary.splits,
            options.content_options(),
            {"files": len(files), "rejected": errors.count, "rejected_by_reason": summary.rejected},
        )
        outdir.commit()
    except BaseException:
        if pool is not None:
            pool.close()
        outdir.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
