"""The fp16 + GradScaler path of :class:`musicbert.train_step.TrainStep`, on CPU.

On a GPU, ``train.precision=fp16`` (GradScaler) is what pre-Ampere GPUs train in, and the path
``bench/gpu.py`` checks for exact resume; ``train_ddp.py`` refuses fp16 on CPU. CPU autocast
does run float16 and ``GradScaler("cpu")`` works the same, so the step's logic (an overflow
backs the scale off and is not a bad step) and the scaler's place in the checkpoint are tested
here, in one process (gloo, world size 1). A large initial scale forces the overflows.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from musicbert import checkpoint as ckpt
from musicbert.batch import Batch
from musicbert.config import ModelConfig, ObjectiveConfig
from musicbert.model import MusicBERT
from musicbert.objectives import PretrainingLoss
from musicbert.schedule import NoamSchedule
from musicbert.train_step import TrainStep
from musicbert.vocab import VOCAB

INIT_SCALE = 2.0**40  # fp16 gradients overflow at this scale: the first steps are skipped and back it off


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    segments = torch.tensor([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])
    tokens = torch.randint(len(VOCAB.special_ids), len(VOCAB), segments.shape, generator=g)
    mlm_mask = (torch.rand(segments.shape, generator=g) < 0.3) & (segments > 0)
    mlm_mask[0, 0] = True
    targets = tokens[mlm_mask]
    tokens = tokens.masked_fill(mlm_mask, VOCAB.mask_id).masked_fill(segments == 0, VOCAB.pad_id)
    none = torch.zeros(0, dtype=torch.long)
    return Batch(tokens, segments, mlm_mask, targets, none, none)


def make_training() -> tuple[TrainStep, dict]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(VOCAB), max_len=32, dim=32, n_layers=1, n_heads=2, ff_dim=64, dropout=0.1, rotary_dims=16)
    model = MusicBERT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as on GPU: the scaler hands it found_inf
    schedule = NoamSchedule(opt, 1e-3, warmup_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    step = TrainStep(DDP(model), opt, schedule, scaler, PretrainingLoss(ObjectiveConfig(mode="BERT")),
                     lambda: torch.autocast("cpu", dtype=torch.float16), 1.0, torch.device("cpu"), 1)  # fmt: skip
    return step, {"model": model, "optimizer": opt, "schedule": schedule, "scaler": scaler}


def run_steps(step: TrainStep, first: int, last: int) -> list[float]:
    return [step([make_batch(i)], i, False, False).ce_sum for i in range(first, last + 1)]


def test_fp16_overflow_backs_off_the_scale_and_is_not_a_bad_step(one_rank):
    step, state = make_training()
    before = [p.detach().clone() for p in state["model"].parameters()]
    report = step([make_batch(1)], 1, False, False)
    assert report.grad_norm != report.grad_norm or report.grad_norm == float("inf")  # overflowed
    assert not report.skipped and step.bad_in_a_row == 0
    assert state["scaler"].get_scale() == INIT_SCALE / 2
    assert state["schedule"].last_epoch == 0  # the schedule waits for a real update
    assert all(torch.equal(a, p) for a, p in zip(before, state["model"].parameters()))
    run_steps(step, 2, 40)
    assert state["scaler"].get_scale() < 2.0**20 and state["schedule"].last_epoch > 0  # updates happen once the scale fits
    assert not all(torch.equal(a, p) for a, p in zip(before, state["model"].parameters()))


def test_fp16_resume_restores_the_scaler_exactly(one_rank, tmp_path):
    step, state = make_training()
    reference = run_steps(step, 1, 36)

    step, state = make_training()
    run_steps(step, 1, 30)
    saver = ckpt.Checkpointer(tmp_path, 2, shared=state, per_rank={"rng": ckpt.RNGState()}, meta={"config": {}, "vocab_sha256": VOCAB.sha256})
    saver.save(30, [saver.rank_state()])
    scale = state["scaler"].get_scale()

    step, state = make_training()  # a fresh process: initial scale again, until the checkpoint is loaded
    loader = ckpt.Checkpointer(tmp_path, 2, shared=state, per_rank={"rng": ckpt.RNGState()}, meta={})
    loader.load(ckpt.find_latest(tmp_path)[1], rank=0)
    assert state["scaler"].get_scale() == scale < INIT_SCALE
    assert run_steps(step, 31, 36) == reference[30:]
