"""The Noam learning-rate schedule of the reference (SPEC §5).

Linear warm-up to the base rate over ``warmup_steps`` optimizer updates, then decay as the
inverse square root of the update number::

    lr(s) = base_lr * s / warmup             for 1 <= s <= warmup
    lr(s) = base_lr * sqrt(warmup / s)       for s >= warmup

``s`` counts optimizer updates from 1 (the first update uses ``base_lr / warmup``, never 0);
both branches give ``base_lr`` at ``s = warmup``. Skipped (non-finite) steps do not advance
the schedule: it follows the number of updates actually applied.
"""

from __future__ import annotations

import math

import torch


def noam_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of the ``step``-th optimizer update (1-based)."""
    if step < 1:
        raise ValueError(f"step counts updates from 1, got {step}")
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
    if step <= warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr * math.sqrt(warmup_steps / step)


class NoamSchedule:
    """Sets the optimizer's learning rate before each update; checkpointable.

    Usage: ``lr = schedule.step()`` right before ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int):
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.updates = 0  # updates applied so far
        self._set(noam_lr(1, self.base_lr, self.warmup_steps))

    @property
    def lr(self) -> float:
        """The rate the next update will use."""
        return noam_lr(self.updates + 1, self.base_lr, self.warmup_steps)

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """Set the rate for the coming update, count it, and return the rate."""
        lr = self.lr
        self._set(lr)
        self.updates += 1
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        # base_lr and warmup_steps come from the (possibly overridden) config; only the position is restored.
        self.updates = int(state["updates"])
        self._set(self.lr)
