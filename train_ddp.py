#!/usr/bin/env python3
"""Pre-train MusicBERT with DistributedDataParallel. Read top to bottom: :func:`train` is the run.

Usage (one node, 4 GPUs; CPU: the same with gloo, one rank per core you give it)::

    torchrun --standalone --nproc_per_node=4 train_ddp.py --config configs/neighbor.yaml \\
        run_dir=runs/neighbor train.max_steps=1000        # dotted overrides, parsed as YAML

What one step does, on every rank (``musicbert/train_step.py``)
    take ``train.accum_steps`` packed batches from this rank's :class:`~musicbert.data.TrainStream`;
    normalise the MLM (and NT-Xent) loss (``musicbert/objectives.py``) by the GLOBAL number of
    terms; forward + backward under autocast, DDP's gradient all_reduce on the last micro-batch
    only; clip; agree on all ranks whether to apply the update, skip it (NaN/inf) or stop after
    it (SIGTERM/SIGUSR1 seen by any rank); Noam learning rate (``musicbert/schedule.py``), AdamW.
    Then, at their intervals: log (rank 0: ``RUN_DIR/log.jsonl``, ``RUN_DIR/tb``; figures:
    ``musicbert/meter.py``), validate (all ranks, ``musicbert/validation.py``), probe (rank 0,
    others wait at a barrier), checkpoint (``musicbert/checkpoint.py``'s :class:`Checkpointer`:
    every rank's RNG and data position gathered to rank 0, which writes).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from musicbert import checkpoint as ckpt
from musicbert import distributed as dist_utils
from musicbert import run_lock
from musicbert.attention import varlen_usable
from musicbert.config import Config, ConfigError, load_config
from musicbert.data import TrainStream
from musicbert.meter import Meter
from musicbert.model import MusicBERT
from musicbert.monitor import Monitor, setup_logging
from musicbert.objectives import PretrainingLoss
from musicbert.schedule import NoamSchedule
from musicbert.shards import ShardFormatError
from musicbert.train_step import StepReport, TrainStep
from musicbert.validation import validate
from musicbert.vocab import VOCAB

log = logging.getLogger("musicbert.train")

COMPLETE = "COMPLETE"
EXIT_ERROR, EXIT_BAD_INPUT, EXIT_BUSY = 1, 2, 3

# ----------------------------------------------------------------------------- signals


class StopSignals:
    """SIGTERM and SIGUSR1 only set :attr:`received`; the loop agrees on it at the next step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> None:
        """Installed before the data workers fork, so they inherit this harmless handler instead
        of dying mid-checkpoint when the process group is signalled."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum


stop_signals = StopSignals()


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
            # including_emulation=False: pre-Ampere GPUs (V100, T4) only emulate bf16, slowly; they get fp16.
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a GPU (use fp32 or bf16 on CPU)")
    return precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], precision == "fp16"


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, not on biases and LayerNorm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=device.type == "cuda")


def check_resumable(state: dict, path: Path, cfg: Config, world_size: int) -> None:
    """Refuse checkpoints that cannot continue this run exactly; say why and what to do."""
    try:
        ckpt.check_vocabulary(state, path)
    except ckpt.CheckpointError as exc:
        raise SystemExit(f"{exc}; it cannot be resumed with this code") from None
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


# ----------------------------------------------------------------------------- set-up and resume


@dataclass
class Training:
    """The stateful objects of a run, built the same on every rank."""

    model: MusicBERT
    opt: torch.optim.AdamW
    schedule: NoamSchedule
    scaler: torch.amp.GradScaler
    amp: Callable[[], contextlib.AbstractContextManager]
    precision: str


def build_training(cfg: Config, info: dist_utils.DistInfo) -> Training:
    """Precision, model, optimiser, schedule. The same seed on every rank gives the same initial
    weights (DDP also broadcasts rank 0's); the RNG is then re-seeded per rank for dropout."""
    device = info.device
    precision, amp_dtype, use_scaler = autocast_settings(cfg.train.precision, device)
    if cfg.train.attention == "varlen" and not varlen_usable(device, amp_dtype or torch.float32):
        raise ConfigError(f"train.attention varlen needs a CUDA GPU with flash attention (sm80+) and train.precision bf16 or fp16, "
                          f"not {device.type} with {precision}; use train.attention auto (varlen where it runs, bars elsewhere)")  # fmt: skip
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
    return Training(model, opt, schedule, scaler, amp, precision + (" + GradScaler" if use_scaler else ""))


def run_is_complete(run_dir: Path, max_steps: int) -> bool:
    """A finished run stays finished (a requeued job must not train again)."""
    done = run_dir / COMPLETE
    if not done.is_file():
        return False
    finished_at = json.loads(done.read_text()).get("step", 0)
    if finished_at >= max_steps:
        log.info("%s: run is complete (step %d, max_steps %d); nothing to do", run_dir, finished_at, max_steps)
        return True
    log.info("run completed at step %d but max_steps is now %d: continuing", finished_at, max_steps)
    return False


def read_resume_state(cfg: Config, info: dist_utils.DistInfo, start_over: bool) -> tuple[str | None, dict | None]:
    """Rank 0 picks the newest valid checkpoint (moving unreadable ones aside) and tells the
    others which file to read; every rank loads it (run_dir is on a shared file system)."""
    found = on_rank0(info, lambda: find_resume_point(Path(cfg.run_dir), start_over))
    path = dist_utils.broadcast_object(str(found[0]) if found else None)
    if path is None:
        return None, None
    state = found[1] if info.is_main else ckpt.load_checkpoint(path)
    check_resumable(state, Path(path), cfg, info.world_size)
    return path, state


def write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))


def save(checkpointer: ckpt.Checkpointer, step: int, info: dist_utils.DistInfo) -> None:
    """Gather every rank's share (RNG state, data position); rank 0 writes the file, and nobody
    runs ahead (or exits) before it is on disk. A failed write stops every rank."""
    rank_states = dist_utils.all_gather_objects(checkpointer.rank_state())

    def write() -> None:
        t0 = time.time()
        path = checkpointer.save(step, rank_states)
        log.info("step %d: saved %s (%.1f s)", step, path, time.time() - t0)

    on_rank0(info, write)


# ----------------------------------------------------------------------------- between steps


def next_micro_batches(stream: TrainStream, n: int) -> list:
    """This step's micro-batches. (Starting DataLoader workers draws their base seed from the
    global torch RNG; keep that out of the RNG that dropout uses, so that a resumed run, which
    restarts the workers, draws the same dropout masks as an uninterrupted one.)"""
    rng = torch.get_rng_state()
    micro = [next(stream) for _ in range(n)]
    torch.set_rng_state(rng)
    return micro


def log_step(monitor: Monitor, meter: Meter, report: StepReport, step: int, max_steps: int) -> None:
    metrics = meter.metrics(report)
    monitor.log(step, metrics)
    log.info(
        "step %d/%d loss %.4f mlm %.4f nce %.4f mlm_acc %.3f lr %.3g gnorm %.3g %.0f tok/s",
        step, max_steps, metrics["loss"], metrics["mlm_loss"], metrics["nce_loss"], metrics["mlm_acc"],
        report.lr, metrics["grad_norm"], metrics["tokens_per_s"],
    )


def run_validation(training: Training, cfg: Config, info: dist_utils.DistInfo, step: int, monitor: Monitor, was_empty: bool) -> bool:
    """Validate (leaving the training RNG where it was, so that a resumed run that validates at
    other steps sees the same dropout masks); returns whether the val split was empty."""
    with ckpt.preserved_rng():
        t0 = time.time()
        val = validate(training.model, cfg, info.rank, info.world_size, info.device, training.amp)
    if val:
        monitor.log(step, val | {"seconds": time.time() - t0}, kind="val")
        log.info("step %d validation: %s", step, " ".join(f"{k} {v:.4f}" for k, v in val.items()))
    elif not was_empty and info.is_main:
        log.warning("the val split of %s has no data: validation is skipped and nothing is logged for it", cfg.data.shards)
    return not val


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, info: dist_utils.DistInfo, start_over: bool = False) -> int:
    """The run, on every rank; rank 0 holds the run folder's lock throughout."""
    run_dir, max_steps, tc = Path(cfg.run_dir), cfg.train.max_steps, cfg.train
    lock = on_rank0(info, lambda: run_lock.acquire(run_dir))
    try:
        if run_is_complete(run_dir, max_steps):
            return 0
        t = build_training(cfg, info)
        path, state = read_resume_state(cfg, info, start_over)
        step = int(state["step"]) if state else 0
        on_rank0(info, lambda: write_config(run_dir, cfg))
        if info.is_main:
            log.info("model %.1fM parameters; %d ranks (%s, %s); precision %s; mode %s", t.model.num_parameters() / 1e6,
                     info.world_size, info.backend, info.device, t.precision, cfg.objective.mode)  # fmt: skip
        if step >= max_steps:  # finished, but died before writing COMPLETE
            on_rank0(info, lambda: write_complete(run_dir, step))
            return 0

        ddp = DDP(t.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        monitor = on_rank0(info, lambda: Monitor(run_dir, enabled=True, resume_step=step))
        monitor = monitor or Monitor(run_dir, enabled=False)  # does nothing, on the other ranks
        stream = TrainStream(cfg, info.rank, info.world_size)
        meter = Meter(cfg.model, cfg.objective, info.device, info.world_size)
        checkpointer = ckpt.Checkpointer(
            run_dir, tc.keep_checkpoints, meta={"config": cfg.to_dict(), "vocab_sha256": VOCAB.sha256},
            shared={"model": t.model, "optimizer": t.opt, "schedule": t.schedule, "scaler": t.scaler, "meter": meter},
            per_rank={"data": stream, "rng": ckpt.RNGState()},  # the RNG last: after all that draws at start-up
        )
        if state is not None:
            checkpointer.load(state, info.rank)
            log.info("resumed from %s at step %d", path, step)
            del state
        take_step = TrainStep(ddp, t.opt, t.schedule, t.scaler, PretrainingLoss(cfg.objective), t.amp,
                              tc.grad_clip, info.device, info.world_size)  # fmt: skip

        exit_code, val_is_empty = 0, False
        try:
            while step < max_steps:
                t_step = time.time()
                micro = next_micro_batches(stream, tc.accum_steps)
                report = take_step(micro, step + 1, stop_signals.received is not None, monitor.error is not None)
                if report.log_failed:  # rank 0 could not write log.jsonl at the previous step: stop, on every rank
                    raise RunStopped(EXIT_ERROR, io_error_line(monitor.error) if monitor.error else "")
                step += 1
                meter.add(report, time.time() - t_step)
                if step % tc.log_every == 0 or step == max_steps:
                    log_step(monitor, meter, report, step, max_steps)
                if take_step.bad_in_a_row > tc.max_bad_steps:
                    log.error("stopping at step %d: %d consecutive steps with a non-finite loss or gradient (train.max_bad_steps = %d); "
                              "lower train.lr or check the data", step, take_step.bad_in_a_row, tc.max_bad_steps)  # fmt: skip
                    exit_code = EXIT_ERROR
                    break
                if step % tc.val_every == 0 or step == max_steps:
                    val_is_empty = run_validation(t, cfg, info, step, monitor, val_is_empty)
                if cfg.probe.every and step % cfg.probe.every == 0:
                    with ckpt.preserved_rng():
                        run_probes(t.model, cfg, step, monitor, info)
                if step % tc.ckpt_every == 0 or step == max_steps or report.stop:
                    save(checkpointer, step, info)
                    monitor.flush()
                if report.stop:
                    log.info("step %d: stop signal received; checkpoint written, exiting", step)
                    break
        finally:
            stream.close()
            monitor.close()

        on_rank0(info, monitor.raise_error)  # a log line of the last step that could not be written
        if exit_code == 0 and step >= max_steps:
            on_rank0(info, lambda: write_complete(run_dir, step))
            if info.is_main:
                log.info("run complete at step %d (%.0f s of training)", step, meter.seconds)
        return exit_code
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"train_ddp.py: {exc}", file=sys.stderr)
        return 2
    stop_signals.install()
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
