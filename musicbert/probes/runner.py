"""The whole probing run: sample, encode, score, for every chosen layer and repeat."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from musicbert.feature_store import FeatureStore
from musicbert.inference import encode_bars, parse_layers
from musicbert.model import unwrap
from musicbert.probes.journal import SampleSizes, ScoreJournal
from musicbert.probes.metrics import METRICS, ProbeError, check_protocol
from musicbert.probes.sampling import TEST_BARS_PER_SONG, TRAIN_BARS_PER_SONG, BarSample, sample_split, stage_progress
from musicbert.probes.scoring import DEFAULT_CLUSTERS, LayerScores, score_layer

if TYPE_CHECKING:
    from musicbert.custom_labels import LabelTable


@dataclass
class ProbeResult:
    """Per layer and metric, one value per repeat; plus what was sampled."""

    layers: list[int]
    values: dict[int, dict[str, list[float]]]
    notes: list[str] = field(default_factory=list)
    clusters_used: list[int] = field(default_factory=list)
    train_songs: int = 0  # of the first repeat
    test_songs: int = 0
    train_bars: list[int] = field(default_factory=list)  # per repeat
    test_bars: list[int] = field(default_factory=list)

    def add_sample(self, sizes: SampleSizes) -> None:
        """Record a repeat's sample sizes."""
        if not self.train_bars:
            self.train_songs, self.test_songs = sizes.train_songs, sizes.test_songs
        self.train_bars.append(sizes.train_bars)
        self.test_bars.append(sizes.test_bars)

    def add_scores(self, scored: list[tuple[int, LayerScores]]) -> None:
        """Record the scores of the repeat last sampled (:meth:`add_sample`), every layer."""
        repeat = len(self.train_bars)
        for layer, scores in scored:
            for m, v in scores.values.items():
                self.values[layer][m].append(v)
            self.notes += [f"layer {layer} repeat {repeat}: {n}" for n in scores.notes]
            self.clusters_used = sorted({*self.clusters_used, scores.clusters})


def _draw_repeat(shards_dir, split: str, per_song: int, repeat: int, max_songs, seed: int, progress: bool, desc: str) -> BarSample:
    (sample,) = sample_split(shards_dir, split, per_song, 1, max_songs, seed=seed, first_repeat=repeat, progress=progress, desc=desc)
    if len(sample) == 0:
        raise ProbeError(f"split {split!r} of {shards_dir} has no bars to probe with")
    return sample


@dataclass(frozen=True)
class ProbeSettings:
    """How one repeat's features are scored (arguments of :func:`score_layer`)."""

    protocol: str
    clusters: int
    seed: int
    labels: Sequence["LabelTable"]


@dataclass(frozen=True)
class EncodeSettings:
    """How features are computed and where they are kept (arguments of :func:`encode_bars`)."""

    device: str | torch.device | None
    batch_tokens: int | None
    precision: str
    work_dir: str | Path | None


def _score_repeat(
    bare: torch.nn.Module, train: BarSample, test: BarSample, layer_list: list[int], probe: ProbeSettings,
    encode: EncodeSettings, progress: bool, stage: str, on_scored: Callable[[int, LayerScores], None],
) -> None:
    """Encode one repeat's bars (the layers of ``layer_list``) into a temporary
    :class:`FeatureStore`, then score it layer by layer, handing each layer's scores to ``on_scored``."""
    n_train, n_all = len(train), len(train) + len(test)
    with FeatureStore(len(layer_list), n_all, bare.cfg.dim, encode.work_dir) as store:
        encode_bars(bare, train.bars + test.bars, layer_list, encode.device, encode.batch_tokens, encode.precision,
                    progress, f"{stage}features", out=store)
        train.bars, test.bars = [], []  # the tokens are no longer needed
        per_layer = list(enumerate(layer_list))
        for li, layer in stage_progress(per_layer, f"{stage}probes", "layer", len(per_layer)) if progress else per_layer:
            on_scored(layer, score_layer(store.layer(li, np.arange(n_train)), train, store.layer(li, np.arange(n_train, n_all)),
                                         test, probe.protocol, probe.clusters, probe.seed, probe.labels))


def probe_model(
    model: torch.nn.Module,
    shards_dir: str | Path,
    layers: str | Sequence[int] | None = "all",
    repeats: int = 5,
    protocol: str = "standard",
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    device: str | torch.device | None = None,
    max_songs: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
    train_per_song: int = TRAIN_BARS_PER_SONG,
    test_per_song: int = TEST_BARS_PER_SONG,
    batch_tokens: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
    work_dir: str | Path | None = None,
    labels: Sequence["LabelTable"] = (),
    journal: ScoreJournal | None = None,
) -> ProbeResult:
    """Sample, extract features and score every chosen layer, ``repeats`` times (the seven
    metrics, then one per table of ``labels``).

    Memory stays bounded as the corpus grows: one repeat is sampled at a time (each split is
    read once per repeat; the bars are copied out of their songs), its features go to a
    :class:`~musicbert.feature_store.FeatureStore` (a temporary file in ``work_dir``, the
    system's temporary folder when None, deleted afterwards), and the probes read them back
    one layer at a time. ``progress`` shows each stage (sampling, features, probes) with its
    ETA on stderr. With a ``journal``, each layer's scores are recorded as they come, and
    those it already holds are not computed again (:mod:`musicbert.probes.journal`).
    """
    check_protocol(protocol)
    if repeats < 1:
        raise ProbeError(f"repeats ({repeats}) must be >= 1")
    bare = unwrap(model)
    layer_list = parse_layers(layers, bare.cfg.n_layers)
    names = (*METRICS, *(t.name for t in labels))
    result = ProbeResult(layer_list, {layer: {m: [] for m in names} for layer in layer_list})
    for r in range(repeats):
        stage = f"repeat {r + 1}/{repeats}: " if repeats > 1 else ""
        done = journal.scores(r) if journal else {}
        todo = [layer for layer in layer_list if layer not in done]
        if not todo:  # the whole repeat is in the journal
            result.add_sample(journal.sizes(r))
            result.add_scores([(layer, done[layer]) for layer in layer_list])
            continue
        train, test = (
            _draw_repeat(shards_dir, split, per_song, r, max_songs, seed, progress, f"{stage}sampling {split}")
            for split, per_song in ((train_split, train_per_song), (test_split, test_per_song))
        )
        sizes = SampleSizes(train.n_songs, test.n_songs, len(train), len(test))
        result.add_sample(sizes)

        def scored(layer: int, scores: LayerScores, r: int = r, sizes: SampleSizes = sizes) -> None:
            done[layer] = scores
            if journal:
                journal.record(r, sizes, layer, scores)

        _score_repeat(bare, train, test, todo, ProbeSettings(protocol, clusters, seed + r, labels),
                      EncodeSettings(device, batch_tokens, precision, work_dir), progress, stage, scored)
        result.add_scores([(layer, done[layer]) for layer in layer_list])
    return result


def run_probes(
    model: torch.nn.Module,
    shards_dir: str | Path,
    layers: str | Sequence[int] | None = "all",
    max_songs: int | None = 200,
    device: str | torch.device | None = None,
    seed: int = 0,
    *,
    test_split: str = "val",
    protocol: str = "standard",
    clusters: int = DEFAULT_CLUSTERS,
) -> dict[int, dict[str, float]]:
    """The quick probe for the training loop: one repeat on the first ``max_songs`` songs of
    the train split (fit) and of ``test_split`` (score; val by default, so the test split stays
    held out). Returns ``{layer: {metric: value}}`` (NaN where undefined). The model is
    given back in its previous mode; no global random state is used.
    """
    result = probe_model(
        model, shards_dir, layers, repeats=1, protocol=protocol, clusters=clusters, seed=seed,
        device=device, max_songs=max_songs, test_split=test_split,
    )
    return {layer: {m: v[0] for m, v in per.items()} for layer, per in result.values.items()}

