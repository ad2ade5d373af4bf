"""Evaluation memory at two corpus sizes 8x apart, and the projection to Lakh MIDI at BERT-base size.

    python bench/evaluate_memory.py                    # ~4 min on 2 idle cores
    python bench/evaluate_memory.py --songs 1200 --factor 8 --batch-tokens 4096 --timing-bars 40000 160000

1. **Memory.** Writes two synthetic shard folders (``tests/synthetic_shards.py``; train
   ``--songs`` and ``--songs x --factor`` songs, test an eighth of that, as Lakh's 80/10/10
   split) and runs ``musicbert.evaluate`` on each in its own process (both at once;
   ``--device cpu``, all layers, ``--repeats``), reading the process's peak RSS
   (``VmHWM``). The model has BERT-base's width (768) so that a bar's features weigh what
   they weigh on Lakh, but two layers, a narrow feed-forward and ``max_len`` 4 (bars cut to
   4 tokens) so that the CPU finishes: memory does not depend on those. ``--batch-tokens``
   is small so that the batch's activations (a fixed working set) are full at both sizes.
   The growth between the two sizes is compared with one layer's training features at the
   large size, ``F = n_train x 768 x 4`` bytes.
2. **Probe time.** ``score_layer`` on random 768-dim features of each of the two
   ``--timing-bars`` sizes of training bars with k = 1000 clusters (as on Lakh), CPU
   seconds per layer, after the memory runs (not beside them). It is not proportional to
   the bars: mini-batch k-means, most of it, runs a number of mini-batch steps that does
   not grow with them, and its k-means++ start uses a fixed-size sample. So it is
   extrapolated along the line through the two measurements.
3. **Projection** for Lakh at BERT-base size (12 layers, 5 repeats, k = 1000, ~110,000
   songs: 440k training + 110k test bars per repeat): peak RSS = the small run's peak +
   the measured growth per training bar x the training bars added (the per-bar growth holds
   at any layer count: layers wait on disk); probe time = 12 layers x 5 repeats x the probe
   time per layer on the line through the two timings at Lakh's training bars; GPU time = forward FLOPs per bar (dense
   ``2 x tokens x layers x (4 d^2 + 2 d ff)`` plus attention ``4 x layers x d x tokens^2``)
   x bars / an assumed sustained bf16 throughput (``--gpu-tflops``), plus the probe time.

Last line: ``RESULT peak_small_mib=… peak_large_mib=… growth_mib=… one_layer_train_mib=… bytes_per_train_bar=…
lakh_peak_gib=… lakh_gpu_min=… lakh_probe_core_h=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np

MIB = 1 << 20
BENCH_MODEL = ["model.dim=768", "model.n_layers=2", "model.n_heads=12", "model.ff_dim=256", "model.max_len=4",
               "model.rotary_dims=8", "model.dropout=0.0"]
BASE = {"dim": 768, "n_layers": 12, "ff_dim": 3072}
LAKH = {"songs": 110_000, "train_bars": 440_000, "test_bars": 110_000, "repeats": 5, "clusters": 1000}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_checkpoint(run_dir: Path) -> None:
    from musicbert.checkpoint import save_checkpoint
    from musicbert.config import load_config
    from musicbert.model import MusicBERT
    from musicbert.vocab import VOCAB

    import torch

    cfg = load_config(None, BENCH_MODEL + [f"run_dir={run_dir}"])
    torch.manual_seed(0)
    model = MusicBERT(cfg.model)
    save_checkpoint(run_dir, 0, {"model": model.state_dict(), "config": cfg.to_dict(), "vocab_sha256": VOCAB.sha256}, keep=1)


def reset_peak_rss() -> None:
    """Start a new ``VmHWM`` period (Linux >= 4.0: writing 5 to ``clear_refs`` resets the peak to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args: argparse.Namespace) -> None:
    """Run one evaluation in this process; print its peak RSS, the peak of each stage and the timings as JSON.

    Each stage (sampling, features, probes) starts a new peak period, so its peak is its own;
    the run's peak is the largest of them (and of what happens between them).
    """
    from musicbert import evaluate
    from musicbert.probes import runner

    timings = {"features_cpu_s": 0.0, "probes_cpu_s": 0.0}
    peaks = {"sampling_mib": 0.0, "features_mib": 0.0, "probes_mib": 0.0, "between_mib": 0.0}

    def staged(fn, stage, timing=None):
        def wrapper(*a, **kw):
            peaks["between_mib"] = max(peaks["between_mib"], peak_rss_mib())
            reset_peak_rss()
            t = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                if timing:
                    timings[timing] += time.process_time() - t
                peaks[stage] = max(peaks[stage], peak_rss_mib())
                reset_peak_rss()
        return wrapper

    # the names _score_repeat and probe_model call
    runner._draw_repeat = staged(runner._draw_repeat, "sampling_mib")
    runner.encode_bars = staged(runner.encode_bars, "features_mib", "features_cpu_s")
    runner.score_layer = staged(runner.score_layer, "probes_mib", "probes_cpu_s")
    started = time.perf_counter()
    metrics = evaluate.evaluate(args.run, args.shards, None, layers="all", repeats=args.repeats, device="cpu",
                                clusters=args.clusters, seed=0, batch_tokens=args.batch_tokens, work_dir=args.shards.parent)
    peaks["between_mib"] = max(peaks["between_mib"], peak_rss_mib())
    s = metrics["settings"]
    print(json.dumps({"peak_mib": max(peaks.values()), **peaks, "wall_s": time.perf_counter() - started, **timings,
                      "train_bars": s["train_bars"], "test_bars": s["test_bars"], "layers": len(s["layers"])}))


def start_evaluation(run: Path, shards: Path, args: argparse.Namespace) -> subprocess.Popen:
    """A fresh process (so that its peak RSS is this evaluation's alone) running :func:`child`."""
    cmd = [sys.executable, __file__, "--child", "--run", str(run), "--shards", str(shards), "--repeats", str(args.repeats),
           "--clusters", str(args.clusters), "--batch-tokens", str(args.batch_tokens)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish_evaluation(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"evaluation failed ({' '.join(proc.args)}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def probe_seconds_per_layer(n_train: int, dim: int) -> float:
    """CPU seconds of score_layer for one layer: random features, random labels, k = 1000."""
    from musicbert.probes import score_layer
    from test_probes import synthetic_sample

    rng = np.random.default_rng(0)
    train, test = synthetic_sample(rng, n_train, n_train // 5), synthetic_sample(rng, n_train // 4, n_train // 40)
    xtr = rng.normal(size=(n_train, dim)).astype(np.float32)
    xte = rng.normal(size=(n_train // 4, dim)).astype(np.float32)
    t = time.process_time()
    score_layer(xtr, train, xte, test, clusters=LAKH["clusters"])
    return time.process_time() - t


def forward_flops_per_bar(tokens: float, dim: int, n_layers: int, ff_dim: int) -> float:
    dense = 2 * tokens * n_layers * (4 * dim * dim + 2 * dim * ff_dim)
    attention = 4 * n_layers * dim * tokens * tokens
    return dense + attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--songs", type=int, default=1200,
                    help="train-split songs of the small corpus (default 1200: enough training bars, ~5,600, to fill the fixed buffers)")
    ap.add_argument("--factor", type=int, default=8, help="large corpus = small x factor (default 8)")
    ap.add_argument("--repeats", type=int, default=2, help="evaluation repeats (default 2; memory does not grow with them)")
    ap.add_argument("--batch-tokens", type=int, default=4096,
                    help="tokens per forward (default 4096: the batch's activations, a fixed working set, are full at both sizes)")
    ap.add_argument("--clusters", type=int, default=50, help="k of the memory runs (default 50; k-means memory does not depend on k)")
    ap.add_argument("--timing-bars", type=int, nargs=2, default=[40_000, 160_000],
                    help="training bars of the two probe timings (default 40000 160000; k = 1000 uncapped)")
    ap.add_argument("--tokens-per-bar", type=float, default=234.0,
                    help="mean tokens per bar on Lakh for the FLOP estimate (default 234, the bundled songs' train split)")
    ap.add_argument("--gpu-tflops", type=float, default=200.0,
                    help="sustained bf16 TFLOP/s of feature extraction on the GPU (default 200: ~20%% of an H100/H200's dense peak)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from synthetic_shards import make_shards

    log(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        tmp = Path(tmp)
        write_checkpoint(tmp / "run")
        sizes = {"small": args.songs, "large": args.songs * args.factor}
        running = {}
        for name, songs in sizes.items():  # both at once, each in its own process
            shards = make_shards(tmp / name, {"train": [songs], "val": [songs // 8], "test": [songs // 8]}, seed=1)
            running[name] = start_evaluation(tmp / "run", shards, args)
        runs = {name: finish_evaluation(proc) for name, proc in running.items()}
    timed = {n: probe_seconds_per_layer(n, BASE["dim"]) for n in args.timing_bars}  # alone, after the memory runs
    for name, r in runs.items():
        log(f"{name}: {sizes[name]} train / {sizes[name] // 8} test songs, {r['train_bars']} + {r['test_bars']} bars per repeat, "
            f"{r['layers']} layers x {args.repeats} repeats: peak RSS {r['peak_mib']:.0f} MiB "
            f"({r['wall_s']:.0f} s; CPU s: features {r['features_cpu_s']:.1f}, probes {r['probes_cpu_s']:.1f}); "
            f"peak by stage: sampling {r['sampling_mib']:.0f}, features {r['features_mib']:.0f}, probes {r['probes_mib']:.0f}, "
            f"between stages {r['between_mib']:.0f} MiB")
    small, large = runs["small"], runs["large"]
    n_small, n_large = (np.max(r["train_bars"]) for r in (small, large))
    growth = large["peak_mib"] - small["peak_mib"]
    one_layer = n_large * BASE["dim"] * 4 / MIB
    per_train_bar = growth * MIB / (n_large - n_small)
    log(f"growth: {growth:.0f} MiB for {n_large - n_small} more training bars = {per_train_bar:.0f} bytes per training bar; "
        f"one layer's training features at the large size: F = {n_large} x 768 x 4 B = {one_layer:.0f} MiB "
        f"(growth = {growth / one_layer:.2f} F)")

    (n1, t1), (n2, t2) = sorted(timed.items())
    per_bar = (t2 - t1) / (n2 - n1)
    probe_s = t2 + per_bar * (LAKH["train_bars"] - n2)  # one layer at Lakh's training bars
    log(f"probes: {t1:.1f} CPU s per layer at {n1} training bars, {t2:.1f} s at {n2} (768 dims, k = 1000)")

    lakh_peak = (small["peak_mib"] * MIB + per_train_bar * (LAKH["train_bars"] - n_small)) / (1 << 30)
    bars = LAKH["train_bars"] + LAKH["test_bars"]
    flops_bar = forward_flops_per_bar(args.tokens_per_bar, BASE["dim"], BASE["n_layers"], BASE["ff_dim"])
    gpu_s = LAKH["repeats"] * bars * flops_bar / (args.gpu_tflops * 1e12)
    probe_lakh_s = LAKH["repeats"] * BASE["n_layers"] * probe_s
    disk_gb = bars * BASE["n_layers"] * BASE["dim"] * 4 / 1e9
    log(f"Lakh, BERT-base (12 layers, 5 repeats, k = 1000, {LAKH['train_bars']} + {LAKH['test_bars']} bars per repeat):")
    log(f"  peak RSS = {small['peak_mib']:.0f} MiB + {per_train_bar:.0f} B x {LAKH['train_bars'] - n_small} = {lakh_peak:.2f} GiB"
        f"  (temporary feature file: {disk_gb:.1f} GB of disk per repeat)")
    log(f"  features: {flops_bar / 1e9:.1f} GFLOP per bar ({args.tokens_per_bar:.0f} tokens) x {bars} bars x 5 repeats "
        f"/ {args.gpu_tflops:.0f} TFLOP/s = {gpu_s / 60:.1f} min on one GPU")
    log(f"  probes: ({t2:.1f} s + {per_bar * 1e3:.3f} ms x ({LAKH['train_bars']} - {n2})) = {probe_s:.0f} s a layer "
        f"x 12 layers x 5 repeats = {probe_lakh_s / 3600:.1f} h "
        f"of CPU time"
        f" ({probe_lakh_s / 3600 / 16:.1f} h on the 16 cores of a one-GPU node, if BLAS and k-means scale)")
    log(f"RESULT peak_small_mib={small['peak_mib']:.0f} peak_large_mib={large['peak_mib']:.0f} growth_mib={growth:.0f} "
        f"one_layer_train_mib={one_layer:.0f} bytes_per_train_bar={per_train_bar:.0f} lakh_peak_gib={lakh_peak:.2f} "
        f"lakh_gpu_min={gpu_s / 60:.1f} lakh_probe_core_h={probe_lakh_s / 3600:.1f}")


if __name__ == "__main__":
    main()
