"""Data-loader throughput on real shards: bars (samples) and tokens per second per worker.

    python bench/loader.py                      # shards from examples/midi, default config
    python bench/loader.py --src ../shared/data/multitrack_freedoom_freedm --batches 300

Builds shards with the preprocessor in a temporary folder, then measures

* one worker in this process (``data.workers=0``): every step of the pipeline (reading and
  decoding shards, masking, pair views, packing, tensors) for each objective mode;
* ``--workers`` DataLoader workers (default 2) feeding this process, as training does
  (startup excluded);

and prints the padding efficiency (real tokens / computed positions) and peak memory.
Per-worker rates are per CPU second of the producing process (``/proc/PID/stat``), so
they do not depend on how busy the machine is; wall-clock rates are printed beside them.
A *sample* is one training bar (a masked anchor with its pair view); tokens are real
tokens in the batch (anchors and positive views). The last line is
``RESULT samples_per_s_per_worker=… padding_efficiency=…`` (from the DataLoader run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from musicbert.config import MODES, load_config
from musicbert.data import TrainStream


def build_shards(src: Path, out: Path, shard_size: int) -> dict:
    cmd = [sys.executable, "-m", "preprocess", "--src", str(src), "--out", str(out), "--workers", "2", "--shard-size", str(shard_size)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"preprocessing failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    print(
        f"shards: {src} -> {len(train['shards'])} train shards, {train['songs']} songs, {train['bars']} bars, "
        f"{train['tokens']} tokens ({time.perf_counter() - t:.1f} s to preprocess)"
    )
    return train


def worker_cpu_s(stream) -> float:
    """CPU seconds (user + system) used so far by the stream's DataLoader workers."""
    total = 0.0
    for proc in getattr(getattr(stream, "_it", None), "_workers", []) or []:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def worker_peak_mib(stream) -> float:
    """Largest peak resident memory (VmHWM) among the stream's DataLoader workers, 0 without workers."""
    peak = 0.0
    for proc in getattr(getattr(stream, "_it", None), "_workers", []) or []:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return peak


def measure(cfg, n_batches: int, warmup: int) -> dict:
    """Throughput over ``n_batches`` after ``warmup``: per wall second, and per CPU second of the producer(s)."""
    stream = TrainStream(cfg)
    for _ in range(warmup):
        next(stream)
    bars = tokens = positions = 0
    t, cpu, wcpu = time.perf_counter(), time.process_time(), worker_cpu_s(stream)
    for _ in range(n_batches):
        b = next(stream)
        bars += b.n_bars - len(b.pair_positive)
        tokens += b.n_real_tokens
        positions += b.segments.numel()
    wall = time.perf_counter() - t
    main_cpu = time.process_time() - cpu
    work_cpu = worker_cpu_s(stream) - wcpu
    producer_cpu = work_cpu if cfg.data.workers else main_cpu
    out = {
        "samples_s": bars / wall, "tokens_s": tokens / wall, "batches_s": n_batches / wall,
        "samples_cpu_s": bars / producer_cpu, "tokens_cpu_s": tokens / producer_cpu, "batches_cpu_s": n_batches / producer_cpu,
        "main_ms_per_batch": 1e3 * main_cpu / n_batches,
        "eff": tokens / positions, "bars_per_batch": bars / n_batches, "worker_peak_mib": worker_peak_mib(stream),
    }
    stream.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=REPO / "examples" / "midi", help="folder of MIDI files")
    ap.add_argument("--batches", type=int, default=300, help="batches measured per run")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers in the loader run")
    ap.add_argument("--shard-size", type=int, default=8, help="songs per shard (small: many shard switches)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_tokens=24576")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(tmp) / "shards"
        build_shards(args.src, root, args.shard_size)
        base = [f"data.shards={root}", *args.overrides]
        cfg = load_config(None, [*base, "data.workers=0"])
        print(f"config: rows {cfg.data.max_tokens // cfg.data.row_len} x {cfg.data.row_len}, mode {cfg.objective.mode}")

        print("\none worker in this process (data.workers=0), per objective mode; per CPU second (per wall second):")
        for mode in MODES:
            r = measure(load_config(None, [*base, "data.workers=0", f"objective.mode={mode}"]), args.batches // 3, 2)
            print(f"  {mode:14s} {r['samples_cpu_s']:6.0f} ({r['samples_s']:6.0f}) samples/s  {r['tokens_cpu_s'] / 1e6:5.2f} "
                  f"({r['tokens_s'] / 1e6:5.2f}) M tokens/s  {r['batches_cpu_s']:5.1f} batches/s  "
                  f"padding efficiency {r['eff']:.4f}  ({r['bars_per_batch']:.0f} samples/batch)")
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        w = args.workers
        r = measure(load_config(None, [*base, f"data.workers={w}"]), args.batches, 2 * w)
        print(f"\n{w} DataLoader workers feeding this process ({cfg.objective.mode}):")
        print(f"  per worker CPU second: {r['samples_cpu_s']:.0f} samples/s, {r['tokens_cpu_s'] / 1e6:.2f} M tokens/s, "
              f"{r['batches_cpu_s']:.1f} batches/s")
        print(f"  wall clock, all {w} workers together: {r['samples_s']:.0f} samples/s, {r['tokens_s'] / 1e6:.2f} M tokens/s, "
              f"{r['batches_s']:.1f} batches/s on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})")
        print(f"  main process: {r['main_ms_per_batch']:.2f} ms CPU per batch received")
        print(f"  padding efficiency {r['eff']:.4f}")
        print(f"peak memory: main process {self_peak:.0f} MiB (RSS high-water mark), each worker {r['worker_peak_mib']:.0f} MiB")
        print(f"one worker makes {r['batches_cpu_s']:.0f} batches of {cfg.data.max_tokens} token slots per CPU second; "
              f"a GPU at 20 steps/s needs {20 / r['batches_cpu_s']:.2f} of a worker")
        print(f"RESULT samples_per_s_per_worker={r['samples_cpu_s']:.0f} tokens_per_s_per_worker={r['tokens_cpu_s']:.0f} "
              f"padding_efficiency={r['eff']:.4f}")

if __name__ == "__main__":
    main()
