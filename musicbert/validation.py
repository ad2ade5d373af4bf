"""Losses on the val split during training, on every rank."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from musicbert import distributed as dist_utils
from musicbert.config import Config
from musicbert.data import val_batches
from musicbert.model import MusicBERT
from musicbert.objectives import PretrainingLoss


@torch.no_grad()
def validate(model: MusicBERT, cfg: Config, rank: int, world_size: int, device: torch.device,
             amp: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:  # fmt: skip
    """Losses on the val split. Every rank sums over its own share (no collective per batch in
    here: the forward runs on the unwrapped model and NT-Xent uses this rank's negatives only),
    then one all_reduce adds the sums. Empty batches (a rank whose share ran out) are skipped.
    NT-Xent here uses the negatives of the batch only, so it is not comparable with the training
    value (negatives from all ranks); its trend is what matters. Returns {} when the val split
    gave no masked token at all."""
    model.eval()
    loss = PretrainingLoss(cfg.objective, across_ranks=False)
    sums = torch.zeros(6, dtype=torch.float64)  # ce, mlm correct, mlm n, nce x pairs, nce acc x pairs, pairs
    for batch in val_batches(cfg, rank, world_size, max_batches=cfg.train.val_batches):
        if batch.n_bars == 0:
            continue
        batch = batch.to(device, non_blocking=True)
        with amp():
            out = model(batch.tokens, batch.segments, batch.mlm_mask)
        terms = loss.terms(out, batch)
        sums[0] += float(terms["mlm_sum"])
        sums[1] += float(terms["mlm_correct"])
        sums[2] += terms["mlm_count"]
        if "nce" in terms:
            sums[3:6] += torch.tensor([float(terms["nce"]), float(terms["nce_acc"]), 1.0], dtype=torch.float64) * terms["pairs"]
    sums = dist_utils.all_reduce_sum(sums, device).cpu()
    model.train()
    if sums[2] == 0:
        return {}  # no val data: nothing to report (a 0 loss would read as a perfect model)
    metrics = {"mlm_loss": sums[0].item() / sums[2].item(), "mlm_acc": sums[1].item() / sums[2].item()}
    if sums[5] > 0:
        metrics |= {"nce_loss": sums[3].item() / sums[5].item(), "nce_acc": sums[4].item() / sums[5].item()}
    return metrics
