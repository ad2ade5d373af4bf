"""What the training loop reports, written on rank 0 only.

- ``RUN_DIR/log.jsonl``: one JSON object per logged step (``{"step": 10, "loss": ..., "mlm_loss": ...,
  "nce_loss": ..., "lr": ..., ...}``) and one per validation (``"kind": "val"``) or probe
  (``"kind": "probe"``). Floats are written with ``repr`` precision, so a reader gets back
  exactly the float the loop computed (tests compare losses step by step).
  History is append-only: on resume, the lines of steps after the checkpoint's step (written
  by an attempt that died before its next checkpoint, and replayed now) and any line cut by a
  crash are moved to ``RUN_DIR/log.rewound.jsonl``, after a header line
  ``{"kind": "rewound", "resume_step": S, "moved_at": ISO time, "lines": n}``. So
  ``log.jsonl`` holds each step once, and no line ever written is lost.
- ``RUN_DIR/tb``: TensorBoard scalars (``train/*``, ``val/*``, ``probe_<metric>/layer_NN``) and,
  through :attr:`Monitor.tb`, bar embeddings for the projector. Event files are never
  rewritten: a resumed run opens a new one with ``purge_step``, which tells TensorBoard to
  hide the earlier events after the checkpoint; they stay on disk.
- A write that fails (disk full, quota, permission) does not raise inside the training step:
  :attr:`Monitor.error` keeps the :class:`OSError` (naming the file) and the loop stops the
  run on all ranks at its next step boundary.
- human-readable lines go to the ``logging`` module (stderr), configured by
  :func:`setup_logging`.
"""

from __future__ import annotations

import datetime
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
        self.error: OSError | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "log.jsonl"
        if self.path.exists():
            set_aside_after(self.path, resume_step)
        self._jsonl = open(self.path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events after the checkpoint left by a run that went further before it died.
        self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """One JSON line and one TensorBoard scalar per metric (``kind/name``)."""
        if not self.enabled or self.error is not None:
            return
        record = {"step": step, **({"kind": kind} if kind != "train" else {}), **{k: _clean(v) for k, v in metrics.items()}}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as exc:
            self.error = OSError(exc.errno, exc.strerror, str(self.path))
            return
        for name, value in metrics.items():
            value = _clean(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = name if "/" in name else f"{kind}/{name}"
                self._tb.add_scalar(tag, value, step)

    def raise_error(self) -> None:
        """Raise the :class:`OSError` of a failed write, if there was one."""
        if self.error is not None:
            raise self.error

    @property
    def tb(self):
        """The TensorBoard ``SummaryWriter`` (rank 0 only), for writers such as ``probes.write_projector``."""
        return self._tb

    def flush(self) -> None:
        if self.enabled and self.error is None:
            try:
                self._jsonl.flush()
            except OSError as exc:
                self.error = OSError(exc.errno, exc.strerror, str(self.path))
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            try:
                self._jsonl.close()
            except OSError as exc:  # a line that could not be written; the loop has already stopped
                self.error = self.error or OSError(exc.errno, exc.strerror, str(self.path))
            self._tb.close()
            self.enabled = False


def set_aside_after(path: Path, step: int) -> None:
    """Move the lines of ``path`` for steps after ``step`` (and lines cut by a crash) to
    ``log.rewound.jsonl`` beside it, after a header line; keep the others in place, in order.

    The moved lines are appended and fsynced before ``path`` is replaced (atomically), so a
    crash in between can at worst leave a line in both files, never in neither.
    """
    kept, moved = [], []
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line).get("step", 0) <= step
        except (ValueError, AttributeError):
            ok = False  # a line cut by a crash
        (kept if ok else moved).append(line)
    if not moved:
        return
    header = {"kind": "rewound", "resume_step": step, "moved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "lines": len(moved)}
    aside = path.with_name("log.rewound.jsonl")
    with open(aside, "a") as f:
        f.write("".join(line + "\n" for line in [json.dumps(header), *moved]))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    log.info("%s: %d lines after step %d (from an attempt that did not reach its next checkpoint) moved to %s", path, len(moved), step, aside.name)
