"""The Noam schedule of SPEC §5: linear warm-up, then lr * sqrt(warmup / step)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from musicbert.schedule import NoamSchedule, noam_lr


def test_noam_values():
    assert noam_lr(1, 1e-4, 10_000) == pytest.approx(1e-8)
    assert noam_lr(5_000, 1e-4, 10_000) == pytest.approx(5e-5)
    assert noam_lr(10_000, 1e-4, 10_000) == pytest.approx(1e-4)  # peak: both branches meet
    assert noam_lr(40_000, 1e-4, 10_000) == pytest.approx(5e-5)  # sqrt(10k / 40k) = 1/2
    assert noam_lr(90_000, 1e-4, 10_000) == pytest.approx(1e-4 / 3)
    # continuous at the peak, increasing before it, decreasing after it
    lrs = [noam_lr(s, 1.0, 100) for s in range(1, 1000)]
    assert max(lrs) == lrs[99] == 1.0
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100]))
    assert all(a > b for a, b in zip(lrs[99:], lrs[100:]))
    with pytest.raises(ValueError):
        noam_lr(0, 1.0, 10)


def test_schedule_sets_optimizer_lr_and_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=123.0)
    sched = NoamSchedule(opt, 1e-3, 4)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    used = []
    for _ in range(8):
        used.append(sched.lr)
        assert opt.param_groups[0]["lr"] == used[-1]  # the rate the coming update uses
        opt.step()
        sched.step()
    assert used == [noam_lr(s, 1e-3, 4) for s in range(1, 9)]
    # a fresh schedule restored from the state (after a weights_only round trip) continues where the first one is
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.AdamW([p], lr=123.0)
    sched2 = NoamSchedule(opt2, 1e-3, 4)
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    assert sched2.lr == sched.lr == opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * math.sqrt(4 / 9))
    # the base rate is the config's, not the checkpoint's: only the position is restored
    sched3 = NoamSchedule(torch.optim.AdamW([p], lr=1.0), 2e-3, 4)
    sched3.load_state_dict(sched.state_dict())
    assert sched3.lr == pytest.approx(2e-3 * math.sqrt(4 / 9))
