"""One optimiser step of the training loop, on every rank (see ``train_ddp.py``'s docstring).

:class:`TrainStep` takes the step's micro-batches and

1. sums the masked-token and pair counts over ranks (one all_reduce), so that the MLM (and
   NT-Xent) loss is normalised by the GLOBAL number of terms: each rank back-propagates
   ``world_size x (its sum) / (global count)``, and DDP's gradient averaging turns that into
   the gradient of the global mean, whatever the ranks' shares;
2. runs forward + backward of each micro-batch under autocast (GradScaler with fp16), DDP's
   gradient all_reduce only on the last one (``no_sync`` on the others);
3. unscales, clips the gradient norm, then one all_reduce of the step's statistics, a
   non-finite-loss flag, the stop flag and the log-failure flag: all ranks agree whether to
   apply the update, skip it (NaN/inf) or stop after it;
4. steps the schedule and AdamW (or skips a non-finite step).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from musicbert import distributed as dist_utils
from musicbert.batch import Batch, bar_lengths
from musicbert.objectives import PretrainingLoss

log = logging.getLogger("musicbert.train")


@dataclass
class StepReport:
    """What one step did, summed over ranks (identical on every rank)."""

    ce_sum: float  # MLM cross-entropy summed over the predicted tokens
    mlm_ok: float  # predicted tokens whose argmax is the target
    n_mlm: float  # predicted tokens (at least 1)
    nce_sum: float  # NT-Xent x pairs, summed over micro-batches
    nce_ok: float  # NT-Xent accuracy x pairs
    nce_n: float  # pairs
    tokens: float  # real (non-padding) tokens
    bars: float
    attention_pairs: float  # sum over bars of (bar length)^2: the attention work (for MFU)
    grad_norm: float
    lr: float  # the rate of this update (or of the next one, when skipped)
    skipped: bool  # non-finite loss or gradient: the update was not applied
    stop: bool  # some rank received SIGTERM/SIGUSR1
    log_failed: bool  # rank 0 could not write the previous log line


class TrainStep:
    """Forward, backward and update of one step; counts the consecutive skipped steps."""

    def __init__(self, ddp: DDP, opt: torch.optim.Optimizer, schedule, scaler: torch.amp.GradScaler,
                 loss: PretrainingLoss, amp: Callable[[], contextlib.AbstractContextManager], grad_clip: float,
                 device: torch.device, world_size: int):  # fmt: skip
        self.ddp, self.opt, self.schedule, self.scaler, self.loss = ddp, opt, schedule, scaler, loss
        self.amp, self.grad_clip, self.device, self.world_size = amp, grad_clip, device, world_size
        self.bad_in_a_row = 0

    def __call__(self, micro: Sequence[Batch], step: int, stop_requested: bool, log_failed: bool) -> StepReport:
        """Step number ``step`` (1-based) on ``micro``; the flags are this rank's, agreed on here."""
        counts = self._global_counts(micro)
        n_mlm, n_pairs, pairs = counts["n_mlm"], counts["n_pairs"], counts["pairs"]
        # ce, mlm ok, nce, nce acc, pairs, bad loss, stop, bad grad, log write failed
        stats = torch.zeros(9, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro):
            batch = batch.to(self.device, non_blocking=True)
            sync = i == len(micro) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.amp():
                    out = self.ddp(batch.tokens, batch.segments, batch.mlm_mask)
                # NT-Xent over the pairs of ALL ranks (gathered inside; every rank gets the same value,
                # and its gradient convention needs no rescaling, see musicbert/contrastive.py).
                # Micro-batches are weighted by their share of the step's pairs.
                terms = self.loss.terms(out, batch)
                loss = self.loss.weighted(terms, self.world_size / n_mlm, pairs[i] / n_pairs)
                stats[0] += terms["mlm_sum"].detach()
                stats[1] += terms["mlm_correct"]
                if "nce" in terms:
                    share = terms["pairs"]  # summed over ranks by the all_reduce below
                    stats[2] += terms["nce"].detach() * share
                    stats[3] += torch.nan_to_num(terms["nce_acc"]) * share
                    stats[4] += share
                stats[5] += (~torch.isfinite(loss.detach())).double()
                self.scaler.scale(loss).backward()

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ddp.module.parameters(), self.grad_clip)
        stats[6] = float(stop_requested)
        stats[7] = (~torch.isfinite(grad_norm)).double()  # identical on all ranks (gradients are)
        stats[8] = float(log_failed)
        dist.all_reduce(stats)
        ce_sum, mlm_ok, nce_sum, nce_ok, nce_n, bad_loss, stop, bad_grad, failed = stats.tolist()
        report = StepReport(ce_sum, mlm_ok, n_mlm, nce_sum, nce_ok, nce_n, counts["tokens"], counts["bars"],
                            counts["attention_pairs"], float(grad_norm), 0.0, False, stop > 0, failed > 0)  # fmt: skip
        if not failed:
            self._update(report, step, bad_loss > 0, bad_grad > 0)
        return report

    def _global_counts(self, micro: Sequence[Batch]) -> dict:
        """The step's term counts and throughput, summed over ranks (one all_reduce)."""
        local = [
            sum(b.mlm_targets.numel() for b in micro),
            sum(b.n_real_tokens for b in micro),
            sum(b.n_bars for b in micro),
            sum(int((bar_lengths(b.segments).double() ** 2).sum()) for b in micro),
            *(b.pair_anchor.numel() for b in micro),
        ]
        n_mlm, tokens, bars, attention_pairs, *pairs = dist_utils.all_reduce_sum(local, self.device).tolist()
        return {"n_mlm": max(n_mlm, 1.0), "n_pairs": max(sum(pairs), 1.0), "pairs": pairs,
                "tokens": tokens, "bars": bars, "attention_pairs": attention_pairs}  # fmt: skip

    def _update(self, report: StepReport, step: int, bad_loss: bool, bad_grad: bool) -> None:
        """Apply the update, or skip a non-finite step. With fp16 an inf gradient norm is the
        GradScaler's ordinary overflow: it backs off its scale, and that is not a bad step."""
        use_scaler = self.scaler.is_enabled()
        if bad_loss or (bad_grad and not use_scaler):
            self.bad_in_a_row += 1
            report.skipped = True
            self.opt.zero_grad(set_to_none=True)
            if use_scaler:
                self.scaler.update()  # clears the unscale_ record; NaN gradients also back the scale off
            if dist.get_rank() == 0:
                log.warning("step %d: non-finite %s; update skipped (%d in a row)", step, "loss" if bad_loss else "gradient norm", self.bad_in_a_row)
            report.lr = self.schedule.lr
        elif bad_grad:
            self.scaler.update()  # fp16 overflow: found_inf was recorded by unscale_
            self.opt.zero_grad(set_to_none=True)
            report.lr = self.schedule.lr
        else:
            self.bad_in_a_row = 0
            report.lr = self.schedule.lr
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.schedule.step()
