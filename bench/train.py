"""Training-step throughput: MusicBERT on packed bars vs HuggingFace BERT on padded bars.

One full training step = forward, MLM + contrastive loss (1.0 x MLM + 0.1 x NT-Xent on the
bars' first-token states, BERT-neighbor pairs), backward and an AdamW step. Both models see
exactly the same bars in the same steps:

* ours (:class:`musicbert.model.MusicBERT`): the batches of the real training stream
  (:class:`musicbert.data.TrainStream`), bars packed end to end into rows of 1024;
* HuggingFace ``BertForMaskedLM`` of the same size (same vocabulary, dim, layers, heads,
  feed-forward, dropout, SDPA attention): the same bars one per row, padded to the
  longest bar of the batch, as a user of that library would feed them.

The figure of merit is *real* (non-padding) tokens per second. Steps alternate
(ours, HF, ours, HF, ...) on the same batch so that a noisy machine slows both alike;
each distinct batch is repeated, and the headline figures take, per batch, the best of its
repeats (on a shared machine single steps are slowed up to ~10x by other work; the figures
from all steps summed are printed as well).

Sizes: ``small`` (dim 256, 4 layers, 4 heads, ff 1024) on CPU, ``base`` (768, 12, 12, 3072)
on CUDA (bf16 autocast; it also prints MFU = useful FLOP/s / peak, useful FLOPs counting
real tokens only and attention inside each bar).

Bars: shards written by ``python -m preprocess --src examples/midi`` (made once under
``runs/bench/shards`` when ``--shards`` is not given). If the preprocessor cannot be run,
the bench falls back to synthetic bars of plausible shape and says so loudly.

Run: ``python bench/train.py`` (no arguments; under 5 minutes on 2 CPU cores). The last
line is ``RESULT real_tokens_per_s=... hf_real_tokens_per_s=... ratio=...``.
Needs ``transformers`` (``pip install -e '.[bench]'``); it is never a runtime dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from musicbert.batch import Batch, bar_lengths
from musicbert.config import Config, DataConfig, ModelConfig, ObjectiveConfig
from musicbert.contrastive import nt_xent
from musicbert.data import TrainStream
from musicbert.model import MusicBERT, training_flops
from musicbert.monitor import peak_flops as device_peak_flops
from musicbert.objectives import PretrainingLoss
from musicbert.shards import ShardFormatError, read_manifest
from musicbert.vocab import VOCAB

#: 1.0 x MLM + 0.1 x NT-Xent on BERT-neighbor pairs, for both models.
OBJECTIVE = ObjectiveConfig(mode="BERT-neighbor", mlm_weight=1.0, nce_weight=0.1, temperature=0.1)


SIZES = {
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 2, "ff_dim": 128},  # bench/gpu.py --dry-run
    "small": {"dim": 256, "n_layers": 4, "n_heads": 4, "ff_dim": 1024},
    "base": {"dim": 768, "n_layers": 12, "n_heads": 12, "ff_dim": 3072},
}


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- bars


def find_or_make_shards(path: str | None) -> tuple[str, str]:
    """A shard folder and a word saying where its bars come from ("real" or "SYNTHETIC")."""
    if path:
        return path, "real"
    out = REPO / "runs" / "bench" / "shards"
    if (out / "manifest.json").is_file():
        try:
            read_manifest(out)
            return str(out), "real"
        except ShardFormatError as exc:
            log(f"cached shards are stale ({exc}); preprocessing again")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "preprocess", "--src", str(REPO / "examples" / "midi"), "--out", str(out), "--overwrite"]
    log(f"preprocessing the bundled songs once: {' '.join(cmd)}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode == 0 and (out / "manifest.json").is_file():
        log(f"  done in {time.perf_counter() - t:.1f} s")
        return str(out), "real"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    warnings.warn(f"preprocessor failed ({' | '.join(tail)}); using SYNTHETIC bars instead", stacklevel=1)
    sys.path.insert(0, str(REPO / "tests"))
    from synthetic_shards import make_shards

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_shards_"))
    make_shards(tmp, {"train": [20, 20], "val": [4], "test": [4]}, seed=0)
    return str(tmp), "SYNTHETIC"


def make_batches(shards: str, n: int, max_tokens: int, row_len: int, seed: int) -> list[Batch]:
    cfg = Config(
        model=ModelConfig(),
        objective=OBJECTIVE,
        data=DataConfig(shards=shards, max_tokens=max_tokens, row_len=row_len, workers=0, seed=seed),
    )
    urls = read_manifest(shards).shard_paths("train")
    stream = TrainStream(cfg, urls=urls)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


@dataclass
class Padded:
    """Bars one per row, padded to the longest of the batch (the HF layout)."""

    input_ids: torch.Tensor  # [n_bars, Lmax]
    attention_mask: torch.Tensor  # [n_bars, Lmax]
    labels: torch.Tensor  # [n_bars, Lmax], -100 where not predicted
    pair_anchor: torch.Tensor
    pair_positive: torch.Tensor
    bar_lengths: list[int]

    @property
    def n_real_tokens(self) -> int:
        return sum(self.bar_lengths)

    def to(self, device: torch.device) -> Padded:
        return Padded(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                      self.pair_anchor.to(device), self.pair_positive.to(device), self.bar_lengths)  # fmt: skip


def bars_of(batch: Batch) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[int, int]]]:
    """The bars of a packed batch in bar order, as (input ids, labels with -100), and its pairs."""
    originals = torch.full_like(batch.tokens, -100)
    originals[batch.mlm_mask] = batch.mlm_targets
    spans = zip(batch.bar_starts().tolist(), bar_lengths(batch.segments).tolist())
    bars = [(batch.tokens[r, c : c + n], originals[r, c : c + n]) for (r, c), n in spans]
    return bars, list(zip(batch.pair_anchor.tolist(), batch.pair_positive.tolist()))


def pad(bars: list[tuple[torch.Tensor, torch.Tensor]], pairs: list[tuple[int, int]]) -> Padded:
    lmax = max(len(b) for b, _ in bars)
    n = len(bars)
    ids = torch.full((n, lmax), VOCAB.pad_id, dtype=torch.long)
    lab = torch.full((n, lmax), -100, dtype=torch.long)
    att = torch.zeros((n, lmax), dtype=torch.long)
    for i, (b, lb) in enumerate(bars):
        ids[i, : len(b)] = b
        lab[i, : len(b)] = lb
        att[i, : len(b)] = 1
    anchor = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    positive = torch.tensor([p for _, p in pairs], dtype=torch.long)
    return Padded(ids, att, lab, anchor, positive, [len(b) for b, _ in bars])


def padded_same_steps(batch: Batch) -> Padded:
    """Exactly the bars of one packed batch, same masks and targets, same pairs."""
    return pad(*bars_of(batch))


def padded_shuffled(batches: list[Batch], seed: int) -> list[Padded]:
    """The same bars over the run, dealt as a user's loader would: units (anchor with its
    positive) in random order, an equal number of bars per batch. The packer groups bars of
    similar length into one batch (first-fit decreasing), which flatters padding; this does not."""
    units = []
    for batch in batches:
        bars, pairs = bars_of(batch)
        partner = {a: p for a, p in pairs}
        positives = set(partner.values())
        for i, bar in enumerate(bars):
            if i in positives:
                continue
            units.append([bar, bars[partner[i]]] if i in partner else [bar])
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    per_batch = sum(len(u) for u in units) / len(batches)
    out: list[Padded] = []
    cur: list = []
    cur_pairs: list[tuple[int, int]] = []
    dealt = 0
    for j in order:
        unit = units[j]
        if len(unit) == 2:
            cur_pairs.append((len(cur), len(cur) + 1))
        cur.extend(unit)
        dealt += len(unit)
        if dealt >= per_batch * (len(out) + 1) and len(out) < len(batches) - 1:
            out.append(pad(cur, cur_pairs))
            cur, cur_pairs = [], []
    if cur:
        out.append(pad(cur, cur_pairs))
    return out


# --------------------------------------------------------------------------- models and steps


def build_ours(size: str, dropout: float, device: torch.device, attention: str | None = None):
    kwargs = {"attention": attention} if attention else {}
    model = MusicBERT(ModelConfig(vocab_size=len(VOCAB), max_len=512, dropout=dropout, **SIZES[size]), **kwargs).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def build_hf(size: str, dropout: float, device: torch.device):
    from transformers import BertConfig, BertForMaskedLM

    s = SIZES[size]
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=s["dim"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        intermediate_size=s["ff_dim"],
        max_position_embeddings=512,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=VOCAB.pad_id,
    )
    try:
        model = BertForMaskedLM._from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError):
        model = BertForMaskedLM(cfg)
    model = model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def step_ours(model, opt, batch: Batch, loss_fn: PretrainingLoss, autocast) -> float:
    with autocast():
        out = model.forward_batch(batch)
        terms = loss_fn.terms(out, batch)
        loss = loss_fn.weighted(terms, 1.0 / max(1, terms["mlm_count"]))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_hf(model, opt, p: Padded, autocast) -> float:
    """HF's own MLM loss (a mean over the labelled positions) + the same weighted NT-Xent."""
    with autocast():
        out = model(input_ids=p.input_ids, attention_mask=p.attention_mask, labels=p.labels, output_hidden_states=True)
        z = out.hidden_states[-1][:, 0]
        nce, _ = nt_xent(z[p.pair_anchor], z[p.pair_positive], OBJECTIVE.temperature)
        loss = OBJECTIVE.mlm_weight * out.loss + OBJECTIVE.nce_weight * nce
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def useful_flops(size: str, p: Padded) -> float:
    """Useful FLOPs of one training step on these bars (:func:`musicbert.model.training_flops`)."""
    cfg = ModelConfig(vocab_size=len(VOCAB), **SIZES[size])
    return training_flops(cfg, sum(p.bar_lengths), sum(n * n for n in p.bar_lengths), int((p.labels != -100).sum()))


# --------------------------------------------------------------------------- memory


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_peak_child(which: str, size: str, dropout: float, attention, batch, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    base = _rss_kib()
    dev = torch.device("cpu")
    # the first step also allocates AdamW's state
    if which == "ours":
        step_ours(*build_ours(size, dropout, dev, attention), batch, PretrainingLoss(OBJECTIVE), contextlib.nullcontext)
    else:
        step_hf(*build_hf(size, dropout, dev), batch, contextlib.nullcontext)
    queue.put((_hwm_kib() - base) * 1024)


def cpu_peak_bytes(which: str, size: str, dropout: float, attention: str | None, batch) -> int | None:
    """Peak RSS growth of a fresh process that builds one model and runs one step on ``batch``."""
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_cpu_peak_child, args=(which, size, dropout, attention, batch, torch.get_num_threads(), q))
        proc.start()
        value = q.get(timeout=240)
        proc.join(timeout=30)
        return int(value)
    except Exception as exc:  # noqa: BLE001 - memory is a side figure; say why it is missing
        log(f"  (peak memory of {which} not measured: {exc})")
        return None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", help="shard folder (default: preprocess examples/midi once into runs/bench/shards)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--size", choices=tuple(SIZES), help="default: small on CPU, base on CUDA")
    ap.add_argument("--max-tokens", type=int, help="room per packed batch (default: 4096 on CPU, 12288 on CUDA)")
    ap.add_argument("--row-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, help="timed steps per model (default: 12 on CPU, 24 on CUDA)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct batches, cycled through (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    ap.add_argument("--dropout", type=float, default=0.0, help="both models (default 0.0, as configs/base.yaml)")
    ap.add_argument("--peak-flops", type=float, help="accelerator peak FLOP/s for MFU (default: by device name; H100 SXM bf16 989e12)")
    ap.add_argument("--attention", help="passed to MusicBERT(attention=...) (e.g. bars, rows); default: the model's")
    ap.add_argument("--no-shuffled", action="store_true", help="skip the HF run on randomly dealt batches")
    ap.add_argument("--profile", action="store_true", help="print where the time of one step goes, for each model")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model peak-memory measurement on CPU")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def make_inputs(shards: str | None, n_batches: int, max_tokens: int, row_len: int, seed: int) -> tuple[str, list[Batch], list[Padded], list[Padded]]:
    """``(origin of the bars, packed batches, the same bars padded, the bars in random padded batches)``."""
    shards, origin = find_or_make_shards(shards)
    t = time.perf_counter()
    packed = make_batches(shards, n_batches, max_tokens, row_len, seed)
    same = [padded_same_steps(b) for b in packed]
    user = padded_shuffled(packed, seed)
    log(f"bars: {origin} ({shards}); {n_batches} distinct batches of room {max_tokens} "
        f"({max_tokens // row_len} rows x {row_len}), made in {time.perf_counter() - t:.1f} s")
    describe_batches(packed, same, user)
    return origin, packed, same, user


def describe_batches(packed: list[Batch], same: list[Padded], user: list[Padded]) -> None:
    """Bars, tokens, masked positions and pairs per batch, and the share of real positions per layout."""
    n = len(packed)
    real = [b.n_real_tokens for b in packed]
    lengths = [k for p in same for k in p.bar_lengths]
    log(f"  per batch: {sum(len(p.bar_lengths) for p in same) / n:.1f} bars (mean {sum(lengths) / len(lengths):.0f} tokens, "
        f"max {max(lengths)}), {sum(real) / n:.0f} real tokens, "
        f"{sum(int(b.mlm_mask.sum()) for b in packed) / n:.0f} masked, {sum(len(b.pair_anchor) for b in packed) / n:.1f} pairs")
    eff = lambda ps: 100 * sum(p.n_real_tokens for p in ps) / sum(p.input_ids.numel() for p in ps)
    log(f"  share of computed positions that are real: ours (packed) {100 * sum(real) / sum(b.tokens.numel() for b in packed):.1f}%, "
        f"HF same-step bars {eff(same):.1f}%, HF shuffled bars {eff(user):.1f}%")


@dataclass
class Timings:
    """Seconds per timed step of each model, the best per distinct batch, peak GPU memory."""

    times: dict[str, list[float]]
    best: dict[str, dict[int, float]]
    peak_memory: dict[str, int]


def time_steps(runs: dict[str, Callable[[int], float]], steps: int, n_batches: int, warmup: int, cuda: bool) -> Timings:
    """Warm-up, then ``steps`` timed steps per model, alternating models (A B C A B C ...: a
    noisy machine slows all alike); a non-finite loss stops the bench."""
    t = Timings({w: [] for w in runs}, {w: {} for w in runs}, {"ours": 0, "hf": 0})

    def timed(which: str, i: int) -> float:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = runs[which](i)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise RuntimeError(f"{which}: non-finite loss {loss} at batch {i}")
        if cuda:
            key = "ours" if which == "ours" else "hf"
            t.peak_memory[key] = max(t.peak_memory[key], torch.cuda.max_memory_allocated())
        return dt

    for w in range(warmup):
        for which in runs:
            timed(which, w % n_batches)
    t_start = time.perf_counter()
    for k in range(steps):
        i = k % n_batches
        for which in runs:
            dt = timed(which, i)
            t.times[which].append(dt)
            t.best[which][i] = min(t.best[which].get(i, math.inf), dt)
    log(f"timed {steps} steps per model, alternating {' / '.join(runs)}, in {time.perf_counter() - t_start:.1f} s")
    return t


def report_throughput(t: Timings, tokens_of: dict, flops_of: dict, steps: int, n_batches: int) -> tuple[dict, dict]:
    """Log real tokens/s per model and the ratios; returns (tokens/s, useful FLOP/s) per model.

    Headline: per batch, the best of its repeats (what the machine does when nothing else
    interferes; on a shared machine, bursts of other work slow single steps up to ~10x because
    the OpenMP threads wait for a descheduled one). The summed-time figure is printed too."""
    tps, tps_sum, fps = {}, {}, {}
    for which, times in t.times.items():
        best = t.best[which]
        tps_sum[which] = sum(tokens_of[which][k % n_batches] for k in range(steps)) / sum(times)
        best_time = sum(best.values())
        tps[which] = sum(tokens_of[which][i] for i in best) / best_time
        fps[which] = sum(flops_of[which][i] for i in best) / best_time
        ts = sorted(times)
        log(f"{which:>11}: {tps[which]:>9,.0f} real tokens/s (best of {steps // n_batches} per batch; all steps summed "
            f"{tps_sum[which]:,.0f}); step median {1000 * ts[len(ts) // 2]:.0f} ms, min {1000 * ts[0]:.0f}, max {1000 * ts[-1]:.0f}")
    pairwise = sorted(h / o for o, h in zip(t.times["ours"], t.times["hf"]))
    log(f"ratio ours / HF (same bars per step): {tps['ours'] / tps['hf']:.2f} (best of per batch); "
        f"{tps_sum['ours'] / tps_sum['hf']:.2f} from all steps summed; per step pair median {pairwise[len(pairwise) // 2]:.2f} "
        f"(range {pairwise[0]:.2f}..{pairwise[-1]:.2f})")
    if "hf_shuffled" in tps:
        log(f"ratio ours / HF (the same bars in random batches, as a user's loader would deal them): "
            f"{tps['ours'] / tps['hf_shuffled']:.2f} (summed: {tps_sum['ours'] / tps_sum['hf_shuffled']:.2f})")
    return tps, fps


def profile_steps(runs: dict[str, Callable[[int], float]], cuda: bool) -> None:
    """Where the time of one step goes, for each model."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for which in ("ours", "hf"):
        with profile(activities=acts, record_shapes=True) as prof:
            runs[which](0)
            if cuda:
                torch.cuda.synchronize()
        log(f"\nprofile of one {which} step (top 20 by self time):")
        log(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))


def log_cpu_memory(packed: list[Batch], same: list[Padded], size: str, dropout: float, attention: str | None) -> None:
    """Peak memory of one training step of each model on the largest batch, each in a fresh process."""
    real = [b.n_real_tokens for b in packed]
    big = max(range(len(packed)), key=lambda i: real[i])
    for which, batch in (("ours", packed[big]), ("hf", same[big])):
        b = cpu_peak_bytes(which, size, dropout, attention, batch)
        if b is not None:
            log(f"peak memory of one training step, {which}: {b / 2**20:.0f} MiB "
                f"(RSS growth of a fresh process: model, AdamW state, activations; {real[big]} real tokens)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("base" if cuda else "small")
    max_tokens = args.max_tokens or (12288 if cuda else 4096)
    steps = args.steps or (24 if cuda else 12)
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    try:
        import transformers
    except ImportError:
        log("transformers is not installed: pip install -e '.[bench]'  (or .venv/bin/pip install transformers)")
        return 2

    dev_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    log(f"device: {dev_name}; torch {torch.__version__}; transformers {transformers.__version__}")
    s = SIZES[size]
    log(f"size {size}: dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} heads, ff {s['ff_dim']}; dropout {args.dropout}; "
        f"{'bf16 autocast' if cuda else 'fp32'}")

    n_batches = min(steps, args.distinct)
    origin, packed, same, user = make_inputs(args.shards, n_batches, max_tokens, args.row_len, args.seed)

    packed_dev = [b.to(device) for b in packed]
    same_dev = [p.to(device) for p in same]
    user_dev = [p.to(device) for p in user]
    loss_fn = PretrainingLoss(OBJECTIVE)
    ours, opt_ours = build_ours(size, args.dropout, device, args.attention)
    hf, opt_hf = build_hf(size, args.dropout, device)
    log(f"parameters: ours {sum(p.numel() for p in ours.parameters()) / 1e6:.2f} M "
        f"(attention layout {getattr(ours, 'attention', 'n/a')!r}), "
        f"HF {sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M; loss: musicbert.objectives.PretrainingLoss")
    ours.train()
    hf.train()

    runs = {
        "ours": lambda i: step_ours(ours, opt_ours, packed_dev[i], loss_fn, autocast),
        "hf": lambda i: step_hf(hf, opt_hf, same_dev[i], autocast),
        "hf_shuffled": lambda i: step_hf(hf, opt_hf, user_dev[i], autocast),
    }
    if args.no_shuffled:
        del runs["hf_shuffled"]
    real = [b.n_real_tokens for b in packed]
    tokens_of = {"ours": real, "hf": real, "hf_shuffled": [p.n_real_tokens for p in user]}
    flops_of = {"ours": [useful_flops(size, p) for p in same], "hf": [useful_flops(size, p) for p in same],
                "hf_shuffled": [useful_flops(size, p) for p in user]}  # fmt: skip
    timings = time_steps(runs, steps, n_batches, args.warmup, cuda)
    tps, fps = report_throughput(timings, tokens_of, flops_of, steps, n_batches)
    if cuda:
        peak_flops = args.peak_flops or device_peak_flops(device) or 989e12
        log(f"MFU (useful FLOPs: real tokens, attention inside bars / {peak_flops / 1e12:.0f} TFLOP/s bf16 dense peak): "
            + ", ".join(f"{w} {100 * fps[w] / peak_flops:.1f}% ({fps[w] / 1e12:.1f} TFLOP/s)" for w in runs))
        log(f"peak GPU memory allocated in a step: ours {timings.peak_memory['ours'] / 2**30:.2f} GiB, "
            f"HF {timings.peak_memory['hf'] / 2**30:.2f} GiB")
    else:
        log("useful FLOP/s (real tokens, attention inside bars): " + ", ".join(f"{w} {fps[w] / 1e9:.1f} GFLOP/s" for w in runs))
        log(f"peak RSS of this process (both models resident): {_hwm_kib() / 2**20:.2f} GiB")
    if args.profile:
        profile_steps(runs, cuda)

    if not cuda and not args.no_memory:
        del ours, hf, opt_ours, opt_hf, runs
        log_cpu_memory(packed, same, size, args.dropout, args.attention)

    if origin != "real":
        log("WARNING: bars were SYNTHETIC (the preprocessor could not be run); figures are indicative only")
    extra = (f" hf_shuffled_real_tokens_per_s={tps['hf_shuffled']:.0f} ratio_shuffled={tps['ours'] / tps['hf_shuffled']:.2f}"
             if "hf_shuffled" in tps else "")
    log(f"RESULT real_tokens_per_s={tps['ours']:.0f} hf_real_tokens_per_s={tps['hf']:.0f} ratio={tps['ours'] / tps['hf']:.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
