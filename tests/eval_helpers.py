"""Fixtures for the evaluation / embedding tests: a tiny model saved by the project's own checkpoint code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from musicbert.checkpoint import save_checkpoint
from musicbert.config import load_config
from musicbert.model import MusicBERT
from musicbert.vocab import VOCAB

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ff_dim=64", "model.rotary_dims=8", "model.dropout=0.1"]


def tiny_model(seed: int = 0) -> MusicBERT:
    cfg = load_config(None, TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MusicBERT(cfg.model)


def tiny_checkpoint(run_dir: Path, seed: int = 0, step: int = 0, overrides: Sequence[str] = ()) -> Path:
    """A run folder holding one checkpoint of a tiny, untrained model (``overrides``: more
    config overrides, e.g. a wider ``model.dim``); returns the .pt path."""
    cfg = load_config(None, TINY + list(overrides) + [f"run_dir={run_dir}"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicBERT(cfg.model)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "vocab_sha256": VOCAB.sha256}
    return save_checkpoint(run_dir, step, state, keep=2)
