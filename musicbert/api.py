"""Python API for bar embeddings of MIDI files.

::

    import musicbert.api
    enc = musicbert.api.load("runs/demo")            # a run folder (newest checkpoint) or a .pt file
    e = enc.embed_midi("song.mid")                   # last layer; layer=6, layer=[1, 12] or layer="all"
    e.embeddings.shape                               # (n_bars, dim), or (n_layers, n_bars, dim) for several layers
    e.bar_index                                      # index of each embedded bar among the song's bars

A file is tokenised exactly as the preprocessor does it (``musicbert.tokenizer.encode.song_from_midi``),
so only its usable bars are embedded (4/4, at least 30 tokens): ``bar_index`` says which.
A file that cannot be used raises ``musicbert.tokenizer.errors.MidiRejected`` with a message naming the
file and the reason. :meth:`Encoder.embed_midis` embeds many files in shared batches and
collects the rejected ones instead of raising; a bar's embedding is the same (up to float
rounding) whether its file is embedded alone or with others, because the model keeps each
bar's attention inside the bar.

Embedding = hidden state of the bar's first token (``Bar_0``) after layer ``i`` (1-based), of
the unmasked bar, model in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musicbert.checkpoint import CheckpointError, check_vocabulary, resolve
from musicbert.config import config_from_dict
from musicbert.inference import encode_bars, parse_layers, resolve_device
from musicbert.model import MusicBERT
from musicbert.tokenizer.encode import song_from_midi
from musicbert.tokenizer.errors import MidiRejected


class ModelLoadError(RuntimeError):
    """The checkpoint cannot give a model; the message names the file and why."""


def build_model(model_cfg, seed: int | None = None) -> torch.nn.Module:
    """A fresh :class:`~musicbert.model.MusicBERT`; with ``seed``, initialised from that seed
    without touching the global random state."""
    if seed is None:
        return MusicBERT(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MusicBERT(model_cfg)


def _strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_model(checkpoint: str | Path, random_init: bool = False, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """``(model on CPU in eval mode, info)`` from a checkpoint file or run folder.

    With ``random_init`` the weights are not loaded: the model is an untrained one of the
    checkpoint's configuration, initialised from ``seed`` (the baseline to beat).
    ``info`` has ``checkpoint`` (the file used), ``step``, ``config`` and ``random_init``.
    """
    try:
        path, state = resolve(checkpoint, map_location="cpu")
        check_vocabulary(state, path)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    try:
        cfg = config_from_dict(state["config"])
    except Exception as exc:  # noqa: BLE001 - ConfigError or a malformed dict
        raise ModelLoadError(f"{path}: its config cannot be read: {exc}") from exc
    model = build_model(cfg.model, seed if random_init else None)
    if not random_init:
        try:
            model.load_state_dict(_strip_prefixes(state["model"]))
        except RuntimeError as exc:
            raise ModelLoadError(f"{path}: weights do not fit the model of its config: {str(exc).splitlines()[0]}") from exc
    model.eval()
    info = {
        "checkpoint": str(path),
        "step": int(state.get("step", 0)),
        "config": cfg.to_dict(),
        "random_init": bool(random_init),
        "seed": seed if random_init else None,
    }
    return model, info


@dataclass
class BarEmbeddings:
    """Embeddings of one file's usable bars."""

    path: str
    bar_index: np.ndarray  # int64 [n_bars]: index of each embedded bar among the song's bars
    layers: tuple[int, ...]  # 1-based layer numbers
    embeddings: np.ndarray  # float32 [n_bars, dim] for one layer, [n_layers, n_bars, dim] for several

    @property
    def n_bars(self) -> int:
        return int(self.bar_index.shape[0])


@dataclass
class Rejection:
    """A file that could not be embedded."""

    path: str
    reason: str  # short machine-readable reason (MidiRejected.reason, or the exception type)
    message: str  # what went wrong, naming the file


class Encoder:
    """A loaded model that turns MIDI files (or token bars) into per-bar embeddings."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = "auto", info: dict | None = None,
                 batch_tokens: int = 16384, precision: str = "fp32"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.info = info or {}
        self.batch_tokens = batch_tokens
        self.precision = precision

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    def resolve_layers(self, layer) -> tuple[list[int], bool]:
        """(layer list, squeeze): a single int / None gives 2-D embeddings."""
        if layer is None:
            return [self.n_layers], True
        if isinstance(layer, (int, np.integer)):
            return parse_layers(int(layer), self.n_layers), True
        return parse_layers(layer, self.n_layers), False

    def embed_bars(self, bars: Sequence[np.ndarray], layer=None) -> np.ndarray:
        """Embeddings of token bars (vocabulary ids, each starting with ``Bar_0``)."""
        layers, squeeze = self.resolve_layers(layer)
        out = encode_bars(self.model, bars, layers, self.device, self.batch_tokens, self.precision)
        return out[0] if squeeze else out

    def embed_song(self, song, layer=None) -> BarEmbeddings:
        """Embeddings of a :class:`musicbert.shards.Song` (a preprocessed song)."""
        layers, squeeze = self.resolve_layers(layer)
        emb = self.embed_bars([song.bar(b) for b in range(song.n_bars)], layers)
        return BarEmbeddings(song.path, np.asarray(song.bar_index, dtype=np.int64), tuple(layers), emb[0] if squeeze else emb)

    def embed_midi(self, path: str | Path, layer=None) -> BarEmbeddings:
        """Embeddings of one MIDI file's usable bars; raises ``MidiRejected`` if it has none or cannot be read."""
        try:
            song = song_from_midi(str(path))
        except MidiRejected as exc:
            raise MidiRejected(exc.reason, _message(path, exc)) from exc
        emb = self.embed_song(song, layer)
        emb.path = str(path)
        return emb

    def embed_midis(self, paths: Sequence[str | Path], layer=None, progress: bool = False) -> tuple[list[BarEmbeddings], list[Rejection]]:
        """Embed many files in shared batches; files that cannot be used are returned as :class:`Rejection`."""
        layers, squeeze = self.resolve_layers(layer)
        songs, rejected = [], []
        for path in paths:
            try:
                songs.append((str(path), song_from_midi(str(path))))
            except MidiRejected as exc:
                rejected.append(Rejection(str(path), str(getattr(exc, "reason", "rejected")), _message(path, exc)))
            except Exception as exc:  # noqa: BLE001 - one unusable file must not stop the others
                rejected.append(Rejection(str(path), type(exc).__name__, _message(path, exc)))
        bars = [song.bar(b) for _, song in songs for b in range(song.n_bars)]
        feats = encode_bars(self.model, bars, layers, self.device, self.batch_tokens, self.precision, progress, "embedding")
        results, start = [], 0
        for path, song in songs:
            emb = feats[:, start : start + song.n_bars]
            start += song.n_bars
            results.append(BarEmbeddings(path, np.asarray(song.bar_index, dtype=np.int64), tuple(layers), emb[0] if squeeze else emb))
        return results, rejected


def _message(path, exc: Exception) -> str:
    """``"PATH: what went wrong"`` (MidiRejected's own message, without its reason prefix)."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text if text.startswith(str(path)) else f"{path}: {text}"


def load(checkpoint: str | Path, device: str | torch.device | None = "auto", random_init: bool = False, seed: int = 0) -> Encoder:
    """An :class:`Encoder` for a checkpoint file or run folder (its newest valid checkpoint)."""
    model, info = load_model(checkpoint, random_init=random_init, seed=seed)
    return Encoder(model, device, info)
