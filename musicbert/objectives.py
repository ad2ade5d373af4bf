"""The pre-training objectives (SPEC §5): what each mode pairs a masked bar with, and the loss.

Modes (``objective.mode``, declared in :data:`musicbert.config.MODES`)
    ``BERT``           masked-token prediction (MLM) only: no pair view.
    ``BERT-aug``       MLM + NT-Xent between the masked bar and an augmented copy of it
                       (pitch and velocity shifted, :func:`musicbert.masking.augment_bar`).
    ``BERT-neighbor``  MLM + NT-Xent between the masked bar and another bar of the same song,
                       drawn uniformly; a one-bar song's bar is an MLM anchor without a pair
                       (pairing it with itself would be a trivially easy positive).
    ``BERT-dropout``   MLM + NT-Xent between the masked bar and itself: the two forward
                       passes differ by their dropout masks only.
    Positive views are unmasked (except in ``BERT-dropout``) and carry no MLM targets.

:func:`pair_view` makes the positive view on the data side; :class:`PretrainingLoss` turns the
encoder's output on a batch into the loss terms, for the training step, validation and the
benchmarks alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from musicbert.batch import Batch
from musicbert.config import ObjectiveConfig
from musicbert.contrastive import nt_xent, nt_xent_local
from musicbert.masking import augment_bar
from musicbert.model import EncoderOutput


def pair_view(
    obj: ObjectiveConfig, bar: np.ndarray, masked: np.ndarray, n_bars: int, b: int, song_bar: Callable[[int], np.ndarray], rng: np.random.Generator
) -> np.ndarray | None:
    """The positive view of bar ``b`` (tokens ``bar``, masked view ``masked``) of a song of
    ``n_bars`` bars read by ``song_bar``, for ``obj.mode``; None when the mode (or a one-bar
    song in ``BERT-neighbor``) has none. Draws from ``rng`` after the masking did."""
    if obj.mode == "BERT-aug":
        return augment_bar(bar, rng, obj.aug_pitch_shift, obj.aug_velocity_shift)
    if obj.mode == "BERT-neighbor":
        if n_bars < 2:
            return None
        c = int(rng.integers(n_bars - 1))
        return song_bar(c + (c >= b)).astype(np.int64)
    if obj.mode == "BERT-dropout":
        return masked
    return None


class PretrainingLoss:
    """MLM cross-entropy + weighted NT-Xent on one batch, as a dict of terms.

    :meth:`terms` returns sums (so that callers can normalise by global counts):
    ``mlm_sum`` (cross-entropy summed over the predicted positions), ``mlm_correct``,
    ``mlm_count``, and in the contrastive modes ``nce`` (NT-Xent, a mean over pairs),
    ``nce_acc`` (top-1 retrieval of the partner; NaN without pairs) and ``pairs`` (this batch's).
    ``across_ranks`` (training): NT-Xent takes its negatives from every rank's pairs (a
    collective: every rank calls it, with or without pairs; see :mod:`musicbert.contrastive`);
    otherwise (validation) from this batch's pairs only, and batches without pairs have no
    ``nce`` term. :meth:`weighted` combines the terms with the config's weights.
    """

    def __init__(self, obj: ObjectiveConfig, across_ranks: bool = True):
        self.mlm_weight = obj.mlm_weight
        self.nce_weight = obj.nce_weight
        self.temperature = obj.temperature
        self.contrastive = obj.mode != "BERT"
        self.across_ranks = across_ranks

    def terms(self, out: EncoderOutput, batch: Batch) -> dict[str, torch.Tensor | int]:
        logits = out.mlm_logits.float()
        terms: dict[str, torch.Tensor | int] = {
            "mlm_sum": F.cross_entropy(logits, batch.mlm_targets, reduction="sum"),
            "mlm_correct": (logits.detach().argmax(-1) == batch.mlm_targets).sum(),
            "mlm_count": batch.mlm_targets.numel(),
        }
        pairs = batch.pair_anchor.numel()
        if self.contrastive and (self.across_ranks or pairs):
            bars = out.bar_states[-1].float()
            contrast = nt_xent if self.across_ranks else nt_xent_local
            terms["nce"], terms["nce_acc"] = contrast(bars[batch.pair_anchor], bars[batch.pair_positive], self.temperature)
            terms["pairs"] = pairs
        return terms

    def weighted(self, terms: dict, mlm_scale: float, nce_scale: float = 1.0) -> torch.Tensor:
        """``mlm_weight x mlm_sum x mlm_scale + nce_weight x nce x nce_scale`` (the NT-Xent part
        only where there is an ``nce`` term); ``mlm_scale`` turns the sum into a mean, e.g.
        ``1 / mlm_count``."""
        loss = self.mlm_weight * terms["mlm_sum"] * mlm_scale
        if "nce" in terms:
            loss = loss + self.nce_weight * terms["nce"] * nce_scale
        return loss
