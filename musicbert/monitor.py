"""What the training loop reports, written on rank 0 only.

- ``RUN_DIR/log.jsonl``: one JSON object per logged step (``{"step": 10, "loss": ..., "mlm_loss": ...,
  "nce_loss": ..., "lr": ..., ...}``) and one per validation (``"kind": "val"``) or probe
  (``"kind": "probe"``). Floats are written with ``repr`` precision, so a reader gets back
  exactly the float the loop computed (tests compare losses step by step).
  On resume, lines for steps after the checkpoint's step are dropped first, so each step
  appears once even after a crash between a checkpoint and the next.
- ``RUN_DIR/tb``: TensorBoard scalars (``train/*``, ``val/*``, ``probe_<metric>/layer_NN``) and,
  through :attr:`Monitor.tb`, bar embeddings for the projector.
- human-readable lines go to the ``logging`` module (stderr), configured by
  :func:`setup_logging`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger("musicbert.train")

# Dense bf16/fp16 tensor-core peak of common training GPUs, for MFU (FLOP/s).
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A6000", 155e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A40", 150e12),
    ("V100", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
)


def setup_logging(rank: int) -> None:
    """Human-readable log lines on stderr; ranks other than 0 only say warnings and errors."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def peak_flops(device: torch.device) -> float | None:
    """Peak dense half-precision FLOP/s of ``device``, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return None


def _clean(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class Monitor:
    """Rank 0's log.jsonl + TensorBoard writer; on other ranks every method does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "log.jsonl"
        if path.exists():
            self._truncate_after(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events after the checkpoint left by a run that went further before it died.
        self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a crash
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """One JSON line and one TensorBoard scalar per metric (``kind/name``)."""
        if not self.enabled:
            return
        record = {"step": step, **({"kind": kind} if kind != "train" else {}), **{k: _clean(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            value = _clean(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = name if "/" in name else f"{kind}/{name}"
                self._tb.add_scalar(tag, value, step)

    @property
    def tb(self):
        """The TensorBoard ``SummaryWriter`` (rank 0 only), for writers such as ``probes.write_projector``."""
        return self._tb

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False
