"""musicbert/objectives.py: the loss terms and their weighting; bar lengths of a packed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musicbert.batch import Batch, bar_lengths
from musicbert.config import ObjectiveConfig
from musicbert.contrastive import nt_xent_local
from musicbert.model import EncoderOutput
from musicbert.objectives import PretrainingLoss, pair_view


def _batch_and_output(pairs: int) -> tuple[Batch, EncoderOutput]:
    g = torch.Generator().manual_seed(0)
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 2]])
    mlm_mask = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    targets = torch.randint(0, 10, (4,), generator=g)
    anchor, positive = torch.arange(pairs), torch.arange(pairs) + 2
    batch = Batch(torch.zeros(2, 6, dtype=torch.long), segments, mlm_mask, targets, anchor, positive)
    out = EncoderOutput(torch.randn(4, 10, generator=g), torch.randn(2, 4, 8, generator=g), torch.zeros(2, 6, 8))
    return batch, out


def test_terms_are_sums_and_weighting_follows_the_config():
    batch, out = _batch_and_output(pairs=2)
    obj = ObjectiveConfig(mode="BERT-neighbor", mlm_weight=0.5, nce_weight=0.25, temperature=0.2)
    terms = PretrainingLoss(obj, across_ranks=False).terms(out, batch)
    ce = F.cross_entropy(out.mlm_logits, batch.mlm_targets, reduction="sum")
    nce, acc = nt_xent_local(out.bar_states[-1][:2], out.bar_states[-1][2:], 0.2)
    assert torch.allclose(terms["mlm_sum"], ce) and terms["mlm_count"] == 4 and terms["pairs"] == 2
    assert int(terms["mlm_correct"]) == int((out.mlm_logits.argmax(-1) == batch.mlm_targets).sum())
    assert torch.allclose(terms["nce"], nce) and torch.allclose(terms["nce_acc"], acc)
    loss = PretrainingLoss(obj).weighted(terms, mlm_scale=1 / 4, nce_scale=0.5)
    assert torch.allclose(loss, 0.5 * ce / 4 + 0.25 * nce * 0.5)


def test_mode_bert_and_pairless_validation_batches_have_no_contrastive_term():
    batch, out = _batch_and_output(pairs=0)
    assert "nce" not in PretrainingLoss(ObjectiveConfig(mode="BERT"), across_ranks=False).terms(out, batch)
    assert "nce" not in PretrainingLoss(ObjectiveConfig(mode="BERT-aug"), across_ranks=False).terms(out, batch)
    terms = PretrainingLoss(ObjectiveConfig(mode="BERT")).terms(out, batch)
    assert torch.allclose(PretrainingLoss(ObjectiveConfig(mode="BERT", mlm_weight=2.0)).weighted(terms, 1.0), 2 * terms["mlm_sum"])


@pytest.mark.parametrize("mode", ["BERT", "BERT-aug", "BERT-neighbor", "BERT-dropout"])
def test_pair_view_per_mode(mode):
    song = [np.arange(10) + 100 * k for k in range(3)]
    bar, masked = song[1], song[1].copy()
    masked[0] = -1
    view = pair_view(ObjectiveConfig(mode=mode), bar, masked, 3, 1, song.__getitem__, np.random.default_rng(0))
    if mode == "BERT":
        assert view is None
    elif mode == "BERT-neighbor":
        assert any(np.array_equal(view, song[c]) for c in (0, 2))
    elif mode == "BERT-dropout":
        assert view is masked
    else:
        assert view.shape == bar.shape
    one_bar = pair_view(ObjectiveConfig(mode="BERT-neighbor"), bar, masked, 1, 0, song.__getitem__, np.random.default_rng(0))
    assert one_bar is None  # a one-bar song has no neighbour (not itself)


def test_bar_lengths_in_bar_order():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 3, 0], [0, 0, 0, 0, 0, 0, 0]])
    assert bar_lengths(segments).tolist() == [3, 2, 1, 4, 1]
    assert bar_lengths(torch.zeros(2, 4, dtype=torch.long)).tolist() == []
