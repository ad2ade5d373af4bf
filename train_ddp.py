#!/usr/bin/env python3
"""Pre-train MusicBERT with DistributedDataParallel. Read top to bottom: this file is the loop.

Usage (one node, 4 GPUs; CPU: the same with gloo, one rank per core you give it)::

    torchrun --standalone --nproc_per_node=4 train_ddp.py --config configs/neighbor.yaml \\
        run_dir=runs/neighbor train.max_steps=1000        # dotted overrides, parsed as YAML

What one step does, on every rank
    1. take ``train.accum_steps`` packed batches from this rank's :class:`~musicbert.data.TrainStream`;
    2. one all_reduce of the masked-token and pair counts, so that the MLM (and NT-Xent) loss is
       normalised by the GLOBAL number of terms: each rank back-propagates
       ``world_size x (its sum) / (global count)``, and DDP's gradient averaging turns that into the
       gradient of the global mean, whatever the ranks' shares;
    3. forward + backward of each micro-batch under autocast (bf16 / fp16 + GradScaler / fp32),
       DDP's gradient all_reduce only on the last one (``no_sync`` on the others);
    4. unscale, clip the gradient norm, then one all_reduce of the step's statistics, a
       non-finite-loss flag and a stop flag (SIGTERM/SIGUSR1 seen by any rank): all ranks agree
       whether to apply the update, skip it (NaN/inf) or stop after it;
    5. Noam learning rate (``musicbert/schedule.py``), AdamW step.
    Then, at their intervals: log (rank 0: ``RUN_DIR/log.jsonl``, ``RUN_DIR/tb``), validate (all
    ranks, unwrapped model, local sums and one all_reduce), probe (rank 0, others wait at a
    barrier), checkpoint (every rank's RNG and data position gathered to rank 0, which writes).

Run folder (``run_dir``)
    ``checkpoints/step_XXXXXXXX.pt`` (+ ``.sha256``), ``log.jsonl`` (+ ``log.rewound.jsonl``),
    ``tb/``, ``config.yaml``, ``.lock`` and ``COMPLETE`` (JSON ``{"step": N}``) once
    ``train.max_steps`` is reached. One run at a time: rank 0 holds a lock on the folder for
    the whole run (``musicbert/run_lock.py``; the kernel frees it when the process ends, even
    by kill -9), and a second run on the same folder is refused in one line naming the holder.

Resume and exit codes
    Started again with the same ``run_dir``, training resumes from the newest valid checkpoint
    (an unreadable newest one is reported, moved aside to ``*.corrupt`` and the previous one used)
    and continues exactly: model, optimiser, schedule, scaler, every rank's RNG states and data
    position are restored, so the losses are those of an uninterrupted run. The world size must
    be the one that wrote the checkpoint (each rank's data position and RNG belong to that rank);
    another world size is refused with a message (start a new run_dir instead). If checkpoints
    exist and none can be read, the run is refused with the list; ``--start-over`` then trains
    from step 0 in the same folder (the unreadable files are kept as ``*.corrupt``, the earlier
    log lines in ``log.rewound.jsonl``).
    Exit 0: ``max_steps`` reached (or the run was already complete), or stopped by SIGTERM/SIGUSR1
    after writing a checkpoint. Exit 1: an error: more than ``train.max_bad_steps`` consecutive
    non-finite losses, or an I/O error (disk full, quota, permission) writing a checkpoint or a
    log, reported in one line naming the file; the checkpoints written before are intact.
    Exit 2: a bad config, data or run folder (e.g. no readable checkpoint). Exit 3: the run
    folder is in use by another run. Every rank exits with the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from musicbert import checkpoint as ckpt
from musicbert import distributed as dist_utils
from musicbert import run_lock
from musicbert.config import Config, ConfigError, load_config
from musicbert.contrastive import nt_xent, nt_xent_local
from musicbert.data import TrainStream, val_batches
from musicbert.model import MusicBERT, training_flops
from musicbert.monitor import Monitor, peak_flops, setup_logging
from musicbert.schedule import NoamSchedule
from musicbert.shards import ShardFormatError
from musicbert.vocab import VOCAB

log = logging.getLogger("musicbert.train")

COMPLETE = "COMPLETE"
EXIT_ERROR, EXIT_BAD_INPUT, EXIT_BUSY = 1, 2, 3

# ----------------------------------------------------------------------------- signals

_stop_signal: int | None = None  # set by the handler; the loop agrees on it at the next step boundary


def _on_stop_signal(signum, _frame) -> None:
    global _stop_signal
    _stop_signal = signum


def install_signal_handlers() -> None:
    """SIGTERM and SIGUSR1 only set a flag. Installed before the data workers fork, so they
    inherit this harmless handler instead of dying mid-checkpoint when the process group is signalled."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_stop_signal)


# ----------------------------------------------------------------------------- set-up helpers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 run_dir=runs/x")
    p.add_argument(
        "--start-over", action="store_true",
        help="train from step 0 in a run_dir whose checkpoints all fail to load (they are kept as *.corrupt, "
        "the earlier log lines in log.rewound.jsonl); refused while a readable checkpoint exists",
    )
    return p.parse_intermixed_args(argv)


# ----------------------------------------------------------------------------- rank 0 decides


class RunStopped(Exception):
    """Ends the run on every rank with ``exit_code``; ``message`` (one line) is what rank 0 logs."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def io_error_line(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{exc.filename}: {exc.strerror} ({code}); stopping (the checkpoints written before are intact)"


def on_rank0(info: dist_utils.DistInfo, action):
    """Run ``action()`` on rank 0 alone and let every rank know how it went.

    Returns its result on rank 0 (None on the others). When it fails with an error that has a
    one-line explanation (busy or unreadable run folder, I/O error), every rank raises the same
    :class:`RunStopped`, so no rank is left waiting in a collective for one that has gone.
    """
    result, failure = None, None
    if info.is_main:
        try:
            result = action()
        except RunStopped as exc:
            failure = (exc.exit_code, exc.message)
        except run_lock.RunDirBusy as exc:
            failure = (EXIT_BUSY, str(exc))
        except ckpt.UnreadableCheckpoints as exc:
            failure = (EXIT_BAD_INPUT, f"{exc}\nTo train from step 0 in this folder, run again with --start-over "
                       "(the files are kept as *.corrupt, log.jsonl's lines in log.rewound.jsonl), or use another run_dir.")
        except OSError as exc:
            failure = (EXIT_ERROR, io_error_line(exc))
    failure = dist_utils.broadcast_object(failure)
    if failure is not None:
        raise RunStopped(*failure)
    return result


def find_resume_point(run_dir: Path, start_over: bool) -> tuple[Path, dict] | None:
    """Rank 0: the checkpoint to resume from (unreadable newer ones moved aside), or None for
    step 0. All checkpoints unreadable: :class:`~musicbert.checkpoint.UnreadableCheckpoints`
    unless ``start_over``, which moves them aside and starts from scratch."""
    try:
        found = ckpt.find_latest(run_dir, quarantine_bad=True)
    except ckpt.UnreadableCheckpoints as exc:
        if not start_over:
            raise
        for path, reason in exc.failures:
            log.warning("--start-over: %s; moved aside to %s", reason, ckpt.quarantine(path).name)
        return None
    if found is not None and start_over:
        raise RunStopped(EXIT_BAD_INPUT, f"--start-over: {found[0]} is readable; resume from it (drop --start-over) or use another run_dir")
    return found


def write_complete(run_dir: Path, step: int) -> None:
    (run_dir / COMPLETE).write_text(json.dumps({"step": step}) + "\n")


def autocast_settings(precision: str, device: torch.device) -> tuple[str, torch.dtype | None, bool]:
    """``(precision, autocast dtype or None for fp32, use GradScaler)`` for ``train.precision``."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a GPU (use fp32 or bf16 on CPU)")
    return precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], precision == "fp16"


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, not on biases and LayerNorm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=device.type == "cuda")


def bar_length_square_sum(segments: torch.Tensor) -> int:
    """Sum over bars of (bar length)^2: the attention work of a packed batch (for MFU)."""
    seg = segments.long()
    keys = (torch.arange(seg.shape[0])[:, None] * (int(seg.max()) + 1) + seg)[seg > 0]
    return int((torch.bincount(keys).double() ** 2).sum()) if keys.numel() else 0


def check_resumable(state: dict, path: Path, cfg: Config, world_size: int) -> None:
    """Refuse checkpoints that cannot continue this run exactly; say why and what to do."""
    if state["vocab_sha256"] != VOCAB.sha256:
        raise SystemExit(f"{path}: written with another vocabulary (hash differs); it cannot be resumed with this code")
    if state.get("world_size") != world_size:
        raise SystemExit(
            f"{path}: written by {state.get('world_size')} ranks, this run has {world_size}. Exact resume needs "
            f"the same world size (each rank's data position and RNG state belong to that rank): restart with "
            f"{state.get('world_size')} ranks, or train in a new run_dir."
        )
    if state["config"].get("model") != cfg.to_dict()["model"]:
        raise SystemExit(f"{path}: model config differs from the checkpoint's: {state['config'].get('model')} vs {cfg.to_dict()['model']}")
    for section in ("objective", "data", "train", "probe"):
        before, now = state["config"].get(section, {}), cfg.to_dict()[section]
        changed = {k: f"{before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v}
        if changed:
            log.warning("resuming with changed %s settings: %s", section, changed)


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: MusicBERT, cfg: Config, info: dist_utils.DistInfo, amp) -> dict[str, float]:
    """Losses on the val split. Every rank sums over its own share (no collective per batch in
    here: the forward runs on the unwrapped model and NT-Xent uses this rank's negatives only),
    then one all_reduce adds the sums. Empty batches (a rank whose share ran out) are skipped.
    NT-Xent here uses the negatives of the batch only, so it is not comparable with the training
    value (negatives from all ranks); its trend is what matters. Returns {} when the val split
    gave no masked token at all."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # ce, mlm correct, mlm n, nce x pairs, nce acc x pairs, pairs
    for batch in val_batches(cfg, info.rank, info.world_size, max_batches=cfg.train.val_batches):
        if batch.n_bars == 0:
            continue
        batch = batch.to(info.device, non_blocking=True)
        with amp():
            out = model(batch.tokens, batch.segments, batch.mlm_mask)
        logits = out.mlm_logits.float()
        sums[0] += float(F.cross_entropy(logits, batch.mlm_targets, reduction="sum"))
        sums[1] += float((logits.argmax(-1) == batch.mlm_targets).sum())
        sums[2] += batch.mlm_targets.numel()
        if batch.pair_anchor.numel():
            bars = out.bar_states[-1].float()
            nce, acc = nt_xent_local(bars[batch.pair_anchor], bars[batch.pair_positive], cfg.objective.temperature)
            sums[3:6] += torch.tensor([float(nce), float(acc), 1.0], dtype=torch.float64) * batch.pair_anchor.numel()
    sums = dist_utils.all_reduce_sum(sums, info.device).cpu()
    model.train()
    if sums[2] == 0:
        return {}  # no val data: nothing to report (a 0 loss would read as a perfect model)
    metrics = {"mlm_loss": sums[0].item() / sums[2].item(), "mlm_acc": sums[1].item() / sums[2].item()}
    if sums[5] > 0:
        metrics |= {"nce_loss": sums[3].item() / sums[5].item(), "nce_acc": sums[4].item() / sums[5].item()}
    return metrics


# ----------------------------------------------------------------------------- probes


def run_probes(model: MusicBERT, cfg: Config, step: int, monitor: Monitor, info: dist_utils.DistInfo) -> None:
    """Rank 0 probes the bar embeddings on a small sample (fit on train, score on val; see
    ``musicbert.probes``) and writes bar embeddings with their labels for TensorBoard's
    projector; the other ranks wait at a barrier."""
    if info.is_main:
        from musicbert import probes

        t0 = time.time()
        shards = cfg.data.shards
        try:
            per_layer = probes.run_probes(model, shards, cfg.probe.layers, cfg.probe.max_songs, info.device, seed=cfg.train.seed)
            if cfg.probe.projector_bars > 0:
                probes.write_projector(monitor.tb, model, shards, step, max_bars=cfg.probe.projector_bars, device=info.device, seed=cfg.train.seed)
        except Exception:  # noqa: BLE001 - a failed probe must not end a long training run
            log.exception("step %d: probes failed; training continues", step)
            per_layer = {}
        finally:
            model.train()
        if per_layer:
            metrics = {f"probe_{name}/layer_{layer:02d}": value for layer, per in per_layer.items() for name, value in per.items()}
            monitor.log(step, metrics | {"seconds": time.time() - t0}, kind="probe")
            last = max(per_layer)
            log.info("step %d probes, layer %d: %s", step, last, " ".join(f"{k} {v:.4g}" for k, v in per_layer[last].items()))
    dist_utils.barrier()


# ----------------------------------------------------------------------------- checkpoint


def save(step, model, opt, schedule, scaler, stream, cfg, info, extra) -> None:
    """Gather every rank's RNG state and data position to all ranks; rank 0 writes the file,
    and nobody runs ahead (or exits) before it is on disk. A failed write stops every rank."""
    per_rank = dist_utils.all_gather_objects({"rng": ckpt.rng_state(), "data": stream.state_dict()})

    def write() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "world_size": info.world_size,
            "rng": [r["rng"] for r in per_rank],
            "data": [r["data"] for r in per_rank],
            "config": cfg.to_dict(),
            "vocab_sha256": VOCAB.sha256,
            "extra": dict(extra),
        }
        t0 = time.time()
        path = ckpt.save_checkpoint(cfg.run_dir, step, state, keep=cfg.train.keep_checkpoints)
        log.info("step %d: saved %s (%.1f s)", step, path, time.time() - t0)

    on_rank0(info, write)


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, info: dist_utils.DistInfo, start_over: bool = False) -> int:
    """The run, on every rank; rank 0 holds the run folder's lock throughout."""
    run_dir = Path(cfg.run_dir)
    lock = on_rank0(info, lambda: run_lock.acquire(run_dir))
    try:
        return _train(cfg, info, start_over)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, info: dist_utils.DistInfo, start_over: bool) -> int:
    run_dir = Path(cfg.run_dir)
    max_steps = cfg.train.max_steps

    # A finished run stays finished (a requeued job must not train again).
    done = run_dir / COMPLETE
    if done.is_file():
        finished_at = json.loads(done.read_text()).get("step", 0)
        if finished_at >= max_steps:
            log.info("%s: run is complete (step %d, max_steps %d); nothing to do", run_dir, finished_at, max_steps)
            return 0
        log.info("run completed at step %d but max_steps is now %d: continuing", finished_at, max_steps)

    # Precision, model, optimiser, schedule. The same seed on every rank gives the same initial
    # weights (DDP also broadcasts rank 0's); the RNG is then re-seeded per rank for dropout.
    device = info.device
    precision, amp_dtype, use_scaler = autocast_settings(cfg.train.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    torch.manual_seed(cfg.train.seed)
    model = MusicBERT(cfg.model, attention=cfg.train.attention).to(device)
    opt = make_optimizer(model, cfg, device)
    schedule = NoamSchedule(opt, cfg.train.lr, cfg.train.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    torch.manual_seed(cfg.train.seed * 1_000_003 + 1 + info.rank)
    contrastive = cfg.objective.mode != "BERT"

    # Resume: rank 0 picks the newest valid checkpoint (moving unreadable ones aside) and tells
    # the others which file to read; every rank loads it (run_dir is on a shared file system).
    step, extra, data_state, rng_state = 0, {"skipped_steps": 0, "tokens": 0, "seconds": 0.0}, None, None
    found = on_rank0(info, lambda: find_resume_point(run_dir, start_over))
    path = dist_utils.broadcast_object(str(found[0]) if found else None)
    if path is not None:
        state = found[1] if info.is_main else ckpt.load_checkpoint(path)
        check_resumable(state, Path(path), cfg, info.world_size)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        extra.update(state.get("extra", {}))
        data_state = state["data"][info.rank]
        rng_state = state["rng"][info.rank]
        log.info("resumed from %s at step %d", path, step)
        del state, found
    elif info.is_main:
        log.info("starting %s from scratch", run_dir)

    on_rank0(info, lambda: (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)))
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "model %.1fM parameters; %d ranks (%s, %s); precision %s; mode %s",
            n_params / 1e6, info.world_size, info.backend, device, precision + (" + GradScaler" if use_scaler else ""), cfg.objective.mode,
        )
    if step >= max_steps:  # finished, but died before writing COMPLETE
        on_rank0(info, lambda: write_complete(run_dir, step))
        return 0

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = on_rank0(info, lambda: Monitor(run_dir, enabled=True, resume_step=step))
    monitor = monitor or Monitor(run_dir, enabled=False)  # does nothing, on the other ranks
    stream = TrainStream(cfg, info.rank, info.world_size, state=data_state)
    if rng_state is not None:
        ckpt.set_rng_state(rng_state)  # last, after everything that draws random numbers at start-up

    peak = peak_flops(device)  # MFU = musicbert.model.training_flops per second / peak
    accum, W = cfg.train.accum_steps, info.world_size
    bad_in_a_row = 0
    t_log, tokens_since, bars_since, flops_since = time.time(), 0, 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    exit_code = 0
    val_is_empty = False
    try:
        while step < max_steps:
            t_step = time.time()
            # (1) this step's micro-batches. (Starting DataLoader workers draws their base seed from
            # the global torch RNG; keep that out of the RNG that dropout uses, so that a resumed
            # run, which restarts the workers, draws the same dropout masks as an uninterrupted one.)
            rng = torch.get_rng_state()
            micro = [next(stream) for _ in range(accum)]
            torch.set_rng_state(rng)
            # (2) global term counts for the loss normalisation (and global throughput).
            local = [
                sum(b.mlm_targets.numel() for b in micro),
                sum(b.n_real_tokens for b in micro),
                sum(b.n_bars for b in micro),
                sum(bar_length_square_sum(b.segments) for b in micro),
                *(b.pair_anchor.numel() for b in micro),
            ]
            n_mlm, step_tokens, step_bars, attn_sq, *pairs = dist_utils.all_reduce_sum(local, device).tolist()
            n_mlm, n_pairs = max(n_mlm, 1.0), max(sum(pairs), 1.0)

            # (3) forward/backward; gradients are all-reduced by DDP on the last micro-batch only.
            # ce, mlm ok, nce, nce acc, pairs, bad loss, stop, bad grad, log write failed
            stats = torch.zeros(9, dtype=torch.float64, device=device)
            for i, batch in enumerate(micro):
                batch = batch.to(device, non_blocking=True)
                sync = i == accum - 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    with amp():
                        out = ddp(batch.tokens, batch.segments, batch.mlm_mask)
                    logits = out.mlm_logits.float()
                    ce = F.cross_entropy(logits, batch.mlm_targets, reduction="sum")
                    loss = cfg.objective.mlm_weight * ce * (W / n_mlm)
                    stats[0] += ce.detach()
                    stats[1] += (logits.detach().argmax(-1) == batch.mlm_targets).sum()
                    if contrastive:
                        # NT-Xent over the pairs of ALL ranks (gathered inside; every rank gets the same
                        # value, and its gradient convention needs no rescaling, see musicbert/contrastive.py).
                        # Micro-batches are weighted by their share of the step's pairs.
                        bars = out.bar_states[-1].float()
                        nce, nce_acc = nt_xent(bars[batch.pair_anchor], bars[batch.pair_positive], cfg.objective.temperature)
                        loss = loss + cfg.objective.nce_weight * nce * (pairs[i] / n_pairs)
                        share = batch.pair_anchor.numel()  # summed over ranks by the all_reduce below
                        stats[2] += nce.detach() * share
                        stats[3] += torch.nan_to_num(nce_acc) * share
                        stats[4] += share
                    stats[5] += (~torch.isfinite(loss.detach())).double()
                    scaler.scale(loss).backward()

            # (4) clip, then agree on everything in one all_reduce.
            if use_scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            stats[6] = float(_stop_signal is not None)
            stats[7] = (~torch.isfinite(grad_norm)).double()  # identical on all ranks (gradients are)
            stats[8] = float(monitor.error is not None)
            dist_utils.dist.all_reduce(stats)
            ce_sum, mlm_ok, nce_sum, nce_ok, nce_n, bad, stop, bad_grad, log_failed = stats.tolist()
            if log_failed:  # rank 0 could not write log.jsonl at the previous step: stop here, on every rank
                raise RunStopped(EXIT_ERROR, io_error_line(monitor.error) if monitor.error else "")
            step += 1

            # (5) update, or skip a non-finite step. With fp16 an inf gradient norm is the
            # GradScaler's ordinary overflow: it backs off its scale, and that is not a bad step.
            if bad > 0 or (bad_grad > 0 and not use_scaler):
                bad_in_a_row += 1
                extra["skipped_steps"] += 1
                opt.zero_grad(set_to_none=True)
                if use_scaler:
                    scaler.update()  # clears the unscale_ record; NaN gradients also back the scale off
                if info.is_main:
                    log.warning("step %d: non-finite %s; update skipped (%d in a row)", step, "loss" if bad else "gradient norm", bad_in_a_row)
                lr = schedule.lr
            elif bad_grad > 0:
                scaler.update()  # fp16 overflow: found_inf was recorded by unscale_
                opt.zero_grad(set_to_none=True)
                lr = schedule.lr
            else:
                bad_in_a_row = 0
                lr = schedule.step()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

            # Bookkeeping and logging (values of this step; rates over the interval).
            tokens_since += step_tokens
            bars_since += step_bars
            flops_since += training_flops(cfg.model, step_tokens, attn_sq, n_mlm)
            extra["tokens"] += int(step_tokens)
            extra["seconds"] += time.time() - t_step
            if step % cfg.train.log_every == 0 or step == max_steps:
                dt = max(time.time() - t_log, 1e-9)
                metrics = {
                    "loss": cfg.objective.mlm_weight * ce_sum / n_mlm + (cfg.objective.nce_weight * nce_sum / nce_n if nce_n else 0.0),
                    "mlm_loss": ce_sum / n_mlm,
                    "nce_loss": nce_sum / nce_n if nce_n else 0.0,
                    "mlm_acc": mlm_ok / n_mlm,
                    "nce_acc": nce_ok / nce_n if nce_n else 0.0,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "skipped_steps": extra["skipped_steps"],
                    "tokens_per_s": tokens_since / dt,
                    "samples_per_s": bars_since / dt,
                }
                if peak is not None:
                    metrics["mfu"] = flops_since / dt / (peak * W)
                if device.type == "cuda":
                    metrics["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
                monitor.log(step, metrics)
                log.info(
                    "step %d/%d loss %.4f mlm %.4f nce %.4f mlm_acc %.3f lr %.3g gnorm %.3g %.0f tok/s",
                    step, max_steps, metrics["loss"], metrics["mlm_loss"], metrics["nce_loss"], metrics["mlm_acc"],
                    lr, metrics["grad_norm"], metrics["tokens_per_s"],
                )
                t_log, tokens_since, bars_since, flops_since = time.time(), 0, 0, 0.0
            if bad_in_a_row > cfg.train.max_bad_steps:
                log.error(
                    "stopping at step %d: %d consecutive steps with a non-finite loss or gradient (train.max_bad_steps = %d); "
                    "lower train.lr or check the data", step, bad_in_a_row, cfg.train.max_bad_steps,
                )
                exit_code = 1
                break

            # Validation and probes leave the training RNG where it was: a resumed run that
            # validates at other steps still sees the same dropout masks.
            if step % cfg.train.val_every == 0 or step == max_steps:
                with ckpt.preserved_rng():
                    t0 = time.time()
                    val = validate(model, cfg, info, amp)
                if val:
                    monitor.log(step, val | {"seconds": time.time() - t0}, kind="val")
                    log.info("step %d validation: %s", step, " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                elif not val_is_empty and info.is_main:
                    log.warning("the val split of %s has no data: validation is skipped and nothing is logged for it", cfg.data.shards)
                val_is_empty = not val
            if cfg.probe.every and step % cfg.probe.every == 0:
                with ckpt.preserved_rng():
                    run_probes(model, cfg, step, monitor, info)

            if step % cfg.train.ckpt_every == 0 or step == max_steps or stop:
                save(step, model, opt, schedule, scaler, stream, cfg, info, extra)
                monitor.flush()
            if stop:
                log.info("step %d: stop signal received; checkpoint written, exiting", step)
                break
    finally:
        stream.close()
        monitor.close()

    on_rank0(info, monitor.raise_error)  # a log line of the last step that could not be written
    if exit_code == 0 and step >= max_steps:
        on_rank0(info, lambda: write_complete(run_dir, step))
        if info.is_main:
            log.info("run complete at step %d (%.0f s of training)", step, extra["seconds"])
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"train_ddp.py: {exc}", file=sys.stderr)
        return 2
    install_signal_handlers()
    info = dist_utils.setup()
    setup_logging(info.rank)
    try:
        return train(cfg, info, start_over=args.start_over)
    except RunStopped as exc:
        if info.is_main and exc.message:
            log.error("%s", exc.message)
        return exc.exit_code
    except (ConfigError, ShardFormatError) as exc:  # the message names the key or file
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
