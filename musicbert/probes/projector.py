"""Bar embeddings with their labels for TensorBoard's projector (:func:`write_projector`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from musicbert.inference import encode_bars, parse_layers
from musicbert.model import unwrap
from musicbert.probes.sampling import TEST_BARS_PER_SONG, BarSample, sample_split
from musicbert.shards import read_manifest
from musicbert.vocab import DRUM_PROGRAM, GM_PROGRAM_NAMES, TEMPO_BINS

GM_FAMILIES = (
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Ensemble", "Brass",
    "Reed", "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Ethnic", "Percussive", "Sound Effects",
)
PROJECTOR_COLUMNS = ("song", "tempo_bpm", "instruments", "n_instruments", "drums", "main_instrument", "mean_velocity", "mean_duration")


def instrument_summary(multi_hot: np.ndarray) -> tuple[str, int, str]:
    """``(families joined with '+', number of programs, first program's name)`` of a bar's instrument labels."""
    programs = np.flatnonzero(multi_hot)
    families = sorted({"Drums" if p == DRUM_PROGRAM else GM_FAMILIES[p // 8] for p in programs})
    pitched = [p for p in programs if p < DRUM_PROGRAM]
    main = GM_PROGRAM_NAMES[pitched[0]] if pitched else ("Drums" if len(programs) else "none")
    return "+".join(families) or "none", int(len(programs)), main


def projector_metadata(sample: BarSample) -> list[list[str]]:
    """One row of :data:`PROJECTOR_COLUMNS` per bar of the sample."""
    rows = []
    for i in range(len(sample)):
        fam, n, main = instrument_summary(sample.instruments[i])
        rows.append([
            sample.song_ids[sample.song[i]][:12],
            str(int(TEMPO_BINS[int(sample.tempo[i])])),
            fam,
            str(n),
            "yes" if sample.instruments[i][DRUM_PROGRAM] else "no",
            main,
            f"{float(sample.velocity[i]):.0f}",
            f"{float(sample.duration[i]):.1f}",
        ])
    return rows


def write_projector(
    writer,
    model: torch.nn.Module,
    shards_dir: str | Path,
    step: int,
    max_bars: int = 500,
    layer: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    split: str = "val",
    per_song: int | None = None,
) -> int:
    """Write up to ``max_bars`` bar embeddings of ``split`` (layer ``layer``, default the last) with
    their labels to TensorBoard's projector via ``writer.add_embedding``. Returns the number of bars.

    Bars are drawn ``per_song`` per song (default: enough to reach ``max_bars`` over the
    split's songs, at least 10), from the split's songs in order.
    """
    bare = unwrap(model)
    layer = bare.cfg.n_layers if layer is None else parse_layers(int(layer), bare.cfg.n_layers)[0]
    if per_song is None:
        n_songs = read_manifest(shards_dir).splits.get(split)
        per_song = max(TEST_BARS_PER_SONG, math.ceil(max_bars / max(1, n_songs.songs if n_songs else 1)))
    (sample,) = sample_split(shards_dir, split, per_song, 1, max_bars=max_bars, seed=seed)
    if len(sample) == 0:
        return 0
    feats = encode_bars(bare, sample.bars, [layer], device)[0]
    writer.add_embedding(
        torch.from_numpy(feats),
        metadata=projector_metadata(sample),
        metadata_header=list(PROJECTOR_COLUMNS),
        global_step=step,
        tag=f"bar_embeddings/layer_{layer}",
    )
    return len(sample)
