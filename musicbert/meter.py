"""The training loop's figures: what a step logs, the rates of the log interval, and the run's counters."""

from __future__ import annotations

import time

import torch

from musicbert.config import ModelConfig, ObjectiveConfig
from musicbert.model import training_flops
from musicbert.monitor import peak_flops
from musicbert.train_step import StepReport


class Meter:
    """Counters kept across resumes (``state_dict``: skipped steps, tokens seen, seconds of
    training) and the throughput of the current log interval: tokens/s, bars/s and MFU
    (:func:`musicbert.model.training_flops` per second over the peak of all ranks' devices)."""

    def __init__(self, model_cfg: ModelConfig, objective: ObjectiveConfig, device: torch.device, world_size: int):
        self.model_cfg, self.objective, self.device, self.world_size = model_cfg, objective, device, world_size
        self.peak = peak_flops(device)
        self.skipped_steps, self.tokens, self.seconds = 0, 0, 0.0
        self._start_interval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _start_interval(self) -> None:
        self.t_log, self.tokens_since, self.bars_since, self.flops_since = time.time(), 0, 0, 0.0

    def add(self, report: StepReport, seconds: float) -> None:
        """Count one step that took ``seconds``."""
        self.skipped_steps += int(report.skipped)
        self.tokens_since += report.tokens
        self.bars_since += report.bars
        self.flops_since += training_flops(self.model_cfg, report.tokens, report.attention_pairs, report.n_mlm)
        self.tokens += int(report.tokens)
        self.seconds += seconds

    def metrics(self, report: StepReport) -> dict[str, float]:
        """The log line of this step (losses of the step, rates since the last one); starts a new interval."""
        r, obj = report, self.objective
        dt = max(time.time() - self.t_log, 1e-9)
        metrics = {
            "loss": obj.mlm_weight * r.ce_sum / r.n_mlm + (obj.nce_weight * r.nce_sum / r.nce_n if r.nce_n else 0.0),
            "mlm_loss": r.ce_sum / r.n_mlm,
            "nce_loss": r.nce_sum / r.nce_n if r.nce_n else 0.0,
            "mlm_acc": r.mlm_ok / r.n_mlm,
            "nce_acc": r.nce_ok / r.nce_n if r.nce_n else 0.0,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": self.tokens_since / dt,
            "samples_per_s": self.bars_since / dt,
        }
        if self.peak is not None:
            metrics["mfu"] = self.flops_since / dt / (self.peak * self.world_size)
        if self.device.type == "cuda":
            metrics["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_interval()
        return metrics

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps, self.tokens, self.seconds = int(state["skipped_steps"]), int(state["tokens"]), float(state["seconds"])
