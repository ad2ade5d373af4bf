"""The Noam learning-rate schedule of the reference (SPEC §5), as a ``torch.optim.lr_scheduler.LambdaLR``.

Linear warm-up to the base rate over ``warmup_steps`` optimizer updates, then decay as the
inverse square root of the update number::

    lr(s) = base_lr * s / warmup             for 1 <= s <= warmup
    lr(s) = base_lr * sqrt(warmup / s)       for s >= warmup

``s`` counts optimizer updates from 1 (the first update uses ``base_lr / warmup``, never 0);
both branches give ``base_lr`` at ``s = warmup``. Skipped (non-finite) steps do not advance
the schedule: it follows the number of updates actually applied.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def noam_factor(step: int, warmup_steps: int) -> float:
    """The base rate's multiplier for the ``step``-th optimizer update (1-based)."""
    if step < 1:
        raise ValueError(f"step counts updates from 1, got {step}")
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
    return step / warmup_steps if step <= warmup_steps else math.sqrt(warmup_steps / step)


def noam_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of the ``step``-th optimizer update (1-based)."""
    return base_lr * noam_factor(step, warmup_steps)


def _factor_after(updates: int, warmup_steps: int) -> float:
    return noam_factor(updates + 1, warmup_steps)


class NoamSchedule(LambdaLR):
    """``LambdaLR`` whose ``last_epoch`` counts the updates applied so far.

    Usage: ``lr = schedule.lr`` is the rate of the coming update; after ``optimizer.step()``,
    ``schedule.step()`` moves on to the next one. On resume only the position is restored:
    the base rate and warm-up come from the (possibly overridden) config.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int):
        for group in optimizer.param_groups:
            group["lr"] = float(base_lr)
            group.pop("initial_lr", None)
        super().__init__(optimizer, functools.partial(_factor_after, warmup_steps=int(warmup_steps)))

    @property
    def lr(self) -> float:
        """The rate the next update will use (already set in the optimizer)."""
        return self.get_last_lr()[0]

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._step_count = self.last_epoch + 1
        values = [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas)]  # this run's base rates
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = list(values)
