"""Linear probes of bar embeddings: the seven metrics of SPEC §6, per layer.

One code path serves the evaluation CLI (:mod:`musicbert.evaluate`, several repeats, train
split -> test split) and the quick probe the training loop runs (:func:`run_probes`, one
repeat on a few songs, train split -> val split).

Features
    The bar embedding of layer ``i`` (1-based) is the hidden state of the bar's first token
    (``Bar_0``) after block ``i``, for the unmasked bar, with the model in eval mode
    (:func:`encode_bars`; bars are packed several to a row, which the model keeps apart, so a
    bar's embedding does not depend, beyond float rounding, on what it is batched with). A bar
    longer than the model's ``max_len`` is cut to its first ``max_len - 1`` tokens plus ``<eob>``.
    :func:`probe_model` writes them to a :class:`~musicbert.feature_store.FeatureStore` (a
    temporary file) and fits the probes one layer at a time, so memory does not grow with
    the number of layers; one repeat is sampled and encoded at a time.

Sampling (:func:`sample_split`)
    ``per_song`` bars drawn without replacement from each song of a split (all of them when
    the song has fewer): 5 per train-split song to fit the probes, 10 per test-split song to
    score them. Each repeat draws afresh; the draw for a song depends only on
    ``(seed, repeat, song id)``, so it does not change when other songs are added or removed.

Metrics (names as in ``metrics.json``; ``HIGHER_IS_BETTER`` gives the direction)
    ``instruments``, ``chords``, ``groove``
        ridge classifier (alpha 100), one target per label (one-vs-rest); bars with no
        positive label are dropped from the training and the test set; metric: ROC-AUC of
        each label on the test set, averaged with the label's number of positive test bars
        as weight ("weighted"). Labels whose test column is all 0 (weight 0) or all 1 (AUC
        undefined) are left out of the average; a label absent from the training bars gets a
        constant score (AUC 0.5 where it occurs in the test set).
    ``tempo``
        ridge classifier (alpha 100) over the tempo bins; metric: accuracy.
    ``mean_velocity``, ``mean_duration``
        ridge regression (alpha 100); metric: RMSE (lower is better).
    ``song_clustering``
        k-means (:class:`sklearn.cluster.MiniBatchKMeans`, 3 initialisations, batches of 1024,
        as the reference ran it) fitted on the training features;
        each test song's bars give a distribution over the clusters; metric: the mean over
        test songs of its entropy / log k (lower is better: a song's bars fall together).
        k is 1000 (``clusters``), capped at one cluster per :data:`BARS_PER_CLUSTER` (10)
        training bars, at least 2, so that small samples get a meaningful clustering (the
        reference's 1000 clusters had ~700 training bars each); the k used is reported.
    Features are standardised with the mean and standard deviation of the training rows the
    probe is fitted on (a constant feature is left unscaled instead of divided by 0).
    Annotated labels (``evaluate --labels``) add one metric each after these, probed with
    the same helpers: :mod:`musicbert.custom_labels`.

Protocols
    ``standard`` (default)
        AUC from the classifiers' decision scores (a ranking metric needs scores, not 0/1
        predictions); tempo: a multi-class ridge classifier over the bins seen in training,
        accuracy of its argmax; entropy with ``0 log 0 = 0``.
    ``reference``
        the reference implementation's scoring, reproduced exactly: AUC computed on hard 0/1
        predictions (decision score > 0; for chords > -0.8), which makes each label's "AUC"
        the mean of its true-positive and true-negative rates; tempo fitted as a multi-output
        ridge classifier on one-hot bins and scored by exact-match accuracy of the thresholded
        outputs (a bar whose 32 scores are all <= 0, or several > 0, counts as wrong); entropy
        of the cluster distribution plus 1e-6 in every one of the k bins.
    Both protocols use the same features, samples, probes and standardisation; only the
    scoring differs. Where the reference would fail (a label column constant in the test set
    raises in the scikit-learn of its time; a constant feature divides by zero), this code
    does what is described above for both protocols.

A metric that is undefined on a sample (for example no test bar has a chord) is NaN, with
a note saying why.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from musicbert.feature_store import FeatureRows, FeatureStore, as_rows
from musicbert.model import unwrap
from musicbert.packing import pack_bars
from musicbert.shards import N_CHORDS, N_INSTRUMENTS, read_manifest
from musicbert.vocab import GM_PROGRAM_NAMES, TEMPO_BINS, VOCAB

if TYPE_CHECKING:
    from musicbert.custom_labels import LabelTable

METRICS = ("chords", "groove", "instruments", "tempo", "mean_velocity", "mean_duration", "song_clustering")
HIGHER_IS_BETTER = {
    "chords": True,
    "groove": True,
    "instruments": True,
    "tempo": True,
    "mean_velocity": False,
    "mean_duration": False,
    "song_clustering": False,
}
METRIC_KIND = {
    "chords": "weighted ROC-AUC",
    "groove": "weighted ROC-AUC",
    "instruments": "weighted ROC-AUC",
    "tempo": "accuracy",
    "mean_velocity": "RMSE",
    "mean_duration": "RMSE",
    "song_clustering": "normalised entropy",
}
PROTOCOLS = ("standard", "reference")
ALPHA = 100.0  # ridge penalty of every probe
REFERENCE_CHORD_THRESHOLD = -0.8  # the reference's decision threshold for chords (0 for the others)
REFERENCE_ENTROPY_EPS = 1e-6
DEFAULT_CLUSTERS = 1000
BARS_PER_CLUSTER = 10  # k is capped at n_train_bars // BARS_PER_CLUSTER
TRAIN_BARS_PER_SONG = 5
TEST_BARS_PER_SONG = 10
N_TEMPO = len(TEMPO_BINS)
SMALL_PROBLEM = 2_000_000  # feature values (train + test) below which scoring runs on one thread
_MULTILABEL = {"chords": "chords", "groove": "groove", "instruments": "instruments"}


class ProbeError(ValueError):
    """The probes cannot run as asked (empty split, bad layer list); the message says why."""


# ----------------------------------------------------------------------------- sampling


@dataclass
class BarSample:
    """Bars drawn from one split, with their labels (row ``i`` of every array is bar ``i``)."""

    bars: list[np.ndarray]  # token ids of each bar
    song: np.ndarray  # int64 [n]: index into song_ids of the bar's song
    song_ids: list[str]
    bar_index: np.ndarray  # int32 [n]: index of the bar among its song's bars
    instruments: np.ndarray  # uint8 [n, 129]
    chords: np.ndarray  # uint8 [n, 84]
    groove: np.ndarray  # uint8 [n, 48]
    tempo: np.ndarray  # uint8 [n]: tempo bin
    velocity: np.ndarray  # float32 [n]
    duration: np.ndarray  # float32 [n]

    def __len__(self) -> int:
        return len(self.bars)

    @property
    def n_songs(self) -> int:
        return len(np.unique(self.song)) if len(self.song) else 0

    @classmethod
    def empty(cls) -> "BarSample":
        return cls([], np.zeros(0, np.int64), [], np.zeros(0, np.int32), np.zeros((0, N_INSTRUMENTS), np.uint8),
                   np.zeros((0, N_CHORDS), np.uint8), np.zeros((0, 48), np.uint8), np.zeros(0, np.uint8),
                   np.zeros(0, np.float32), np.zeros(0, np.float32))


class _SampleBuilder:
    def __init__(self) -> None:
        self.bars: list[np.ndarray] = []
        self.song: list[int] = []
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in ("bar_index", "instruments", "chords", "groove", "tempo", "velocity", "duration")}

    def add(self, song, song_no: int, chosen: np.ndarray) -> None:
        for b in chosen:
            self.bars.append(song.bar(int(b)).copy())  # a copy: a view would keep the song's whole token array alive
        self.song.extend([song_no] * len(chosen))
        for k, rows in self.rows.items():
            rows.append(getattr(song, k)[chosen])

    def build(self, song_ids: list[str]) -> BarSample:
        if not self.bars:
            out = BarSample.empty()
            out.song_ids = song_ids
            return out
        cat = {k: np.concatenate(v) for k, v in self.rows.items()}
        return BarSample(self.bars, np.asarray(self.song, np.int64), song_ids, **cat)


def _song_key(song_id: str) -> int:
    return zlib.crc32(song_id.encode())


def iter_split_songs(shards_dir: str | Path, split: str, max_songs: int | None = None) -> Iterable:
    """Songs of a split in manifest order (the first ``max_songs`` of them)."""
    from musicbert.data import read_songs  # the shard reader of the training pipeline

    manifest = read_manifest(shards_dir)
    n = 0
    for url in manifest.shard_paths(split):
        for song in read_songs(url):
            if max_songs is not None and n >= max_songs:
                return
            n += 1
            yield song


def sample_split(
    shards_dir: str | Path,
    split: str,
    per_song: int,
    repeats: int = 1,
    max_songs: int | None = None,
    max_bars: int | None = None,
    seed: int = 0,
    first_repeat: int = 0,
    progress: bool = False,
    desc: str = "sampling",
) -> list[BarSample]:
    """One :class:`BarSample` for each of the repeats ``first_repeat .. first_repeat + repeats - 1``,
    reading the split once (see the module docstring). Bars are copied out of their songs."""
    if per_song < 1 or repeats < 1 or first_repeat < 0:
        raise ProbeError(f"per_song ({per_song}) and repeats ({repeats}) must be >= 1, first_repeat ({first_repeat}) >= 0")
    builders = [_SampleBuilder() for _ in range(repeats)]
    song_ids: list[str] = []
    songs = iter_split_songs(shards_dir, split, max_songs)
    if progress:
        total = read_manifest(shards_dir).splits.get(split)
        total = total.songs if total else None
        songs = stage_progress(songs, desc, "song", None if total is None else min(total, max_songs or total))
    for song in songs:
        if song.n_bars == 0:
            continue
        song_no = len(song_ids)
        song_ids.append(song.id)
        for r, builder in enumerate(builders, start=first_repeat):
            rng = np.random.default_rng([seed, r, _song_key(song.id)])
            k = min(per_song, song.n_bars)
            chosen = np.sort(rng.choice(song.n_bars, size=k, replace=False))
            if max_bars is not None:
                chosen = chosen[: max(0, max_bars - len(builder.bars))]
            builder.add(song, song_no, chosen)
        if max_bars is not None and all(len(b.bars) >= max_bars for b in builders):
            break
    return [b.build(list(song_ids)) for b in builders]


def stage_progress(items: Iterable, desc: str, unit: str, total: int | None) -> Iterable:
    """``items`` behind a tqdm progress bar on stderr (stage name, rate and ETA)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True)


# ----------------------------------------------------------------------------- features


def parse_layers(spec: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """``"all"`` / ``None`` -> 1..n_layers; ``"last"``; ``"1,6,12"``; an int or a list of ints (1-based)."""
    if spec is None or spec == "all":
        return list(range(1, n_layers + 1))
    if spec == "last":
        return [n_layers]
    if isinstance(spec, str):
        try:
            layers = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise ProbeError(f"layers {spec!r}: expected 'all', 'last' or comma-separated layer numbers like 1,6,12") from None
    elif isinstance(spec, int):
        layers = [spec]
    else:
        layers = [int(x) for x in spec]
    if not layers:
        raise ProbeError("no layers chosen")
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if bad:
        raise ProbeError(f"layer(s) {bad} out of range: this model has layers 1..{n_layers}")
    return sorted(set(layers))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProbeError("device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    return device


PRECISIONS = ("auto", "fp32", "bf16")
CPU_BATCH_TOKENS = 16384  # tokens per forward on CPU: larger batches are no faster there
MAX_GPU_BATCH_TOKENS = 262144  # GPU throughput is saturated well before this
GPU_MEMORY_SHARE = 0.5  # share of the free GPU memory a batch's activations may take


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on a CUDA device that has bf16, fp32 elsewhere (always fp32 on CPU)."""
    if precision not in PRECISIONS:
        raise ProbeError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def auto_batch_tokens(model: torch.nn.Module, device: torch.device, precision: str) -> int:
    """Tokens per forward for inference: :data:`CPU_BATCH_TOKENS` on CPU; on CUDA as many as
    :data:`GPU_MEMORY_SHARE` of the free memory holds, from an upper bound of the activations
    one token needs at once (feed-forward hidden, a few ``dim``-wide tensors, a row of
    attention scores per head, its bar state after every layer were it a bar's first token),
    capped at :data:`MAX_GPU_BATCH_TOKENS`."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    cfg = unwrap(model).cfg
    element = 2 if precision == "bf16" else 4
    per_token = element * (cfg.ff_dim + 8 * cfg.dim + cfg.n_heads * cfg.max_len + cfg.n_layers * cfg.dim)
    free, _ = torch.cuda.mem_get_info(device)
    tokens = int(free * GPU_MEMORY_SHARE // per_token)
    return max(CPU_BATCH_TOKENS, min(MAX_GPU_BATCH_TOKENS, tokens))


def _fit_bar(bar: np.ndarray, max_len: int) -> np.ndarray:
    bar = np.asarray(bar, dtype=np.int64)
    if len(bar) > max_len:
        bar = np.concatenate([bar[: max_len - 1], [VOCAB.eob_id]])
    return bar


@torch.no_grad()
def encode_bars(
    model: torch.nn.Module,
    bars: Sequence[np.ndarray],
    layers: Sequence[int],
    device: str | torch.device | None = None,
    batch_tokens: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "features",
    out: FeatureStore | None = None,
) -> np.ndarray | FeatureStore:
    """Bar embeddings ``float32 [len(layers), len(bars), dim]`` of the given (1-based) layers,
    as an array, or written into ``out`` (a :class:`FeatureStore` of that shape, returned).

    Bars are packed into rows of ``model.cfg.max_len`` tokens, ``batch_tokens`` tokens per
    forward (None: :func:`auto_batch_tokens`). ``precision`` is ``fp32``, ``bf16`` (autocast)
    or ``auto`` (:func:`resolve_precision`). The model is put in eval mode for the call and
    given back in its previous mode (and on its previous device).
    """
    model = unwrap(model)
    device = resolve_device(device)
    cfg = model.cfg
    precision = resolve_precision(precision, device)
    if batch_tokens is None:
        batch_tokens = auto_batch_tokens(model, device, precision)
    layer_idx = torch.tensor([l - 1 for l in layers], dtype=torch.long)
    if out is None:
        features = np.zeros((len(layers), len(bars), cfg.dim), dtype=np.float32)
    elif (out.n_layers, out.n_bars, out.dim) != (len(layers), len(bars), cfg.dim):
        raise ProbeError(f"feature store of shape {(out.n_layers, out.n_bars, out.dim)} for {(len(layers), len(bars), cfg.dim)}")
    if not bars:
        return features if out is None else out
    lengths = [min(len(b), cfg.max_len) for b in bars]  # _fit_bar's length; bars are fitted batch by batch
    row_len = max(lengths)
    batches = pack_bars(lengths, row_len, max(1, batch_tokens // row_len))
    was_training = model.training
    old_device = next(model.parameters()).device
    model.eval()
    model.to(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    bar_progress = None
    if progress:
        from tqdm import tqdm

        bar_progress = tqdm(total=len(bars), desc=desc, unit="bar", dynamic_ncols=True)
    try:
        for rows in batches:
            tokens = np.full((len(rows), row_len), VOCAB.pad_id, dtype=np.int64)
            segments = np.zeros((len(rows), row_len), dtype=np.int64)
            order: list[int] = []
            for r, members in enumerate(rows):
                col = 0
                for s, i in enumerate(members, start=1):
                    n = lengths[i]
                    tokens[r, col : col + n] = _fit_bar(bars[i], cfg.max_len)
                    segments[r, col : col + n] = s
                    col += n
                order.extend(members)
            with autocast:
                states = model(torch.from_numpy(tokens).to(device), torch.from_numpy(segments).to(device)).bar_states
            chosen = states.index_select(0, layer_idx.to(states.device)).float().cpu().numpy()
            if out is None:
                features[:, order] = chosen
            else:
                out.write(order, chosen)
            if bar_progress is not None:
                bar_progress.update(len(order))
    finally:
        if bar_progress is not None:
            bar_progress.close()
        model.to(old_device)
        model.train(was_training)
    return features if out is None else out


# ----------------------------------------------------------------------------- scoring


STD_CHUNK_ROWS = 4096  # rows per step of the column variance (bounds its temporary)


def column_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x.mean(axis=0), x.std(axis=0))``, bit for bit, without ``std``'s temporary copy of ``x``.

    numpy sums along axis 0 row after row; continuing each chunk's sum from the previous
    chunks' keeps that order, so the result is the same to the last bit.
    """
    mean = x.mean(axis=0)
    total = None
    for start in range(0, len(x), STD_CHUNK_ROWS):
        sq = x[start : start + STD_CHUNK_ROWS] - mean
        sq *= sq
        total = np.add.reduce(sq if total is None else np.concatenate([total[None], sq]), axis=0)
    if total is None:
        return mean, np.full_like(mean, np.nan)
    return mean, np.sqrt(total / len(x))


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both, in place, with the training rows' mean and (population) std, and return
    them; a constant feature is only centred."""
    mean, std = column_mean_std(train)
    std = np.where(std > 0, std, 1.0)
    for x in (train, test):
        x -= mean
        x /= std
    return train, test


def column_auc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column (each must hold both classes), by the rank-sum (Mann-Whitney)
    formula with average ranks for ties: the same number as ``sklearn.metrics.roc_auc_score``
    on the column, without its per-call overhead."""
    from scipy.stats import rankdata

    y = np.asarray(y_true, dtype=bool)
    ranks = rankdata(np.asarray(scores, dtype=np.float64), axis=0)
    n_pos = y.sum(axis=0).astype(np.float64)
    n_neg = y.shape[0] - n_pos
    rank_sum = np.where(y, ranks, 0.0).sum(axis=0)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def weighted_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC per label column, averaged with the column's number of positives as weight.

    Columns whose ``y_true`` is constant (AUC undefined) are left out; NaN when none is left.
    Equal to ``sklearn.metrics.roc_auc_score(y_true, scores, average="weighted")`` whenever
    that is defined.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    positives = y_true.sum(axis=0)
    usable = np.flatnonzero((positives > 0) & (positives < y_true.shape[0]))
    if usable.size == 0:
        return float("nan")
    aucs = column_auc(y_true[:, usable], scores[:, usable])
    w = positives[usable].astype(np.float64)
    return float(np.sum(aucs * w) / np.sum(w))


def multilabel_scores(decision: np.ndarray, protocol: str, threshold: float = 0.0) -> np.ndarray:
    """What the AUC is computed on: decision scores (standard) or 0/1 predictions ``decision > threshold`` (reference)."""
    if protocol == "standard":
        return decision
    if protocol == "reference":
        return (decision > threshold).astype(np.int64)
    raise ProbeError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")


def tempo_accuracy_reference(decision: np.ndarray, y_true: np.ndarray) -> float:
    """Exact-match accuracy of thresholded one-vs-rest outputs ``decision > 0`` against one-hot ``y_true``."""
    onehot = np.eye(decision.shape[1], dtype=bool)[np.asarray(y_true, dtype=np.int64)]
    return float(np.mean(np.all((decision > 0) == onehot, axis=1)))


def cluster_entropy(assignments: np.ndarray, songs: np.ndarray, k: int, protocol: str) -> float:
    """Mean over songs of the normalised entropy (entropy / log k) of the song's bars over k clusters."""
    if k < 2:
        return float("nan")
    values = []
    for s in np.unique(songs):
        counts = np.bincount(assignments[songs == s], minlength=k).astype(np.float64)
        p = counts / counts.sum()
        if protocol == "reference":
            p = p + REFERENCE_ENTROPY_EPS
            h = -np.sum(p * np.log(p))
        else:
            nz = p[p > 0]
            h = -np.sum(nz * np.log(nz))
        values.append(h / math.log(k))
    return float(np.mean(values)) if values else float("nan")


def clusters_for(n_train: int, clusters: int = DEFAULT_CLUSTERS) -> int:
    """k actually used: ``clusters`` capped at one per BARS_PER_CLUSTER training bars, at least 2."""
    return int(min(clusters, max(2, n_train // BARS_PER_CLUSTER)))


@dataclass
class LayerScores:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    clusters: int = 0


# Every probe reads its own rows (FeatureRows.take: a fresh copy, from disk when the features
# are stored), standardises them in place and lets the ridge centre them in place
# (copy_X=False): one copy of a layer's training rows at a time.


def _probe_multilabel(name, train_x: FeatureRows, ytr, test_x: FeatureRows, yte, protocol) -> tuple[float, str | None]:
    from sklearn.linear_model import Ridge

    keep_tr = ytr.sum(axis=1) > 0
    keep_te = yte.sum(axis=1) > 0
    if keep_tr.sum() < 2:
        return float("nan"), f"{name}: fewer than 2 training bars with a positive label"
    if keep_te.sum() == 0:
        return float("nan"), f"{name}: no test bar with a positive label"
    xtr, xte = standardise(train_x.take(keep_tr), test_x.take(keep_te))
    ytr, yte = ytr[keep_tr], yte[keep_te]
    # RidgeClassifier fits a ridge to +-1 targets; fitting them directly gives the same
    # decision scores to the bit without its int64 label copies (5 kB a bar for 129 labels).
    targets = ytr.astype(np.float32)
    targets *= 2
    targets -= 1
    decision = Ridge(alpha=ALPHA, copy_X=False).fit(xtr, targets).predict(xte)
    threshold = REFERENCE_CHORD_THRESHOLD if name == "chords" else 0.0
    value = weighted_auc(yte, multilabel_scores(decision, protocol, threshold))
    if math.isnan(value):
        return value, f"{name}: no label has both positive and negative test bars"
    return value, None


def _probe_accuracy(name, train_x: FeatureRows, ytr, test_x: FeatureRows, yte) -> tuple[float, str | None]:
    """Multi-class ridge classifier over the classes seen in training; accuracy of its argmax."""
    from sklearn.linear_model import RidgeClassifier

    if len(ytr) < 2 or len(yte) == 0:
        return float("nan"), f"{name}: too few bars"
    xtr, xte = standardise(train_x.take(), test_x.take())
    clf = RidgeClassifier(alpha=ALPHA, copy_X=False).fit(xtr, np.asarray(ytr, dtype=np.int64))
    return float(np.mean(clf.predict(xte) == np.asarray(yte, dtype=np.int64))), None


def _probe_tempo(train_x: FeatureRows, ttr, test_x: FeatureRows, tte, protocol) -> tuple[float, str | None]:
    from sklearn.linear_model import RidgeClassifier

    if protocol == "standard":
        return _probe_accuracy("tempo", train_x, ttr, test_x, tte)
    if len(ttr) < 2 or len(tte) == 0:
        return float("nan"), "tempo: too few bars"
    xtr, xte = standardise(train_x.take(), test_x.take())
    onehot = np.eye(N_TEMPO, dtype=np.int64)[np.asarray(ttr, dtype=np.int64)]
    clf = RidgeClassifier(alpha=ALPHA, copy_X=False).fit(xtr, onehot)
    return tempo_accuracy_reference(clf.decision_function(xte), np.asarray(tte, dtype=np.int64)), None


def _probe_regression(name, train_x: FeatureRows, ytr, test_x: FeatureRows, yte) -> tuple[float, str | None]:
    from sklearn.linear_model import Ridge

    if len(ytr) < 2 or len(yte) == 0:
        return float("nan"), f"{name}: too few bars"
    xtr, xte = standardise(train_x.take(), test_x.take())
    pred = Ridge(alpha=ALPHA, copy_X=False).fit(xtr, ytr.astype(np.float64)).predict(xte)
    return float(np.sqrt(np.mean((pred - yte.astype(np.float64)) ** 2))), None


def _clustering(train_x: FeatureRows, test_x: FeatureRows, test_songs, clusters, protocol, seed) -> tuple[float, int, str | None]:
    from sklearn.cluster import MiniBatchKMeans

    n_train, n_test = train_x.shape[0], test_x.shape[0]
    k = clusters_for(n_train, clusters)
    if n_train < k or n_test == 0:
        return float("nan"), k, "song_clustering: too few bars"
    xtr, xte = standardise(train_x.take(), test_x.take())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on small samples
        # n_init and batch_size as the defaults of scikit-learn 1.1.3, the version the reference pinned
        km = MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=1024, random_state=seed).fit(xtr)
        assignments = km.predict(xte)
    return cluster_entropy(assignments, test_songs, k, protocol), k, None


def score_layer(
    train_x: np.ndarray | FeatureRows,
    train: BarSample,
    test_x: np.ndarray | FeatureRows,
    test: BarSample,
    protocol: str = "standard",
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    labels: Sequence["LabelTable"] = (),
) -> LayerScores:
    """The seven metrics for one layer's features (rows aligned with the samples), then one
    per annotated label table (:mod:`musicbert.custom_labels`), in the tables' order.

    The features are arrays (made float32) or :class:`~musicbert.feature_store.FeatureRows`
    (for example a layer of a :class:`~musicbert.feature_store.FeatureStore`); each probe
    takes its own copy of the rows it needs, so the inputs are not changed.
    """
    if protocol not in PROTOCOLS:
        raise ProbeError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    out = LayerScores()

    def put(name: str, result: tuple[float, str | None]) -> None:
        out.values[name] = result[0]
        if result[1]:
            out.notes.append(result[1])

    from threadpoolctl import threadpool_limits

    # Small problems run faster on one thread (OpenMP/BLAS start-up costs dominate, badly so
    # on a busy machine); large ones use the machine.
    threads = 1 if (train_x.shape[0] + test_x.shape[0]) * train_x.shape[1] < SMALL_PROBLEM else None
    with warnings.catch_warnings(), threadpool_limits(threads):
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for name, attr in _MULTILABEL.items():
            put(name, _probe_multilabel(name, train_x, getattr(train, attr), test_x, getattr(test, attr), protocol))
        put("tempo", _probe_tempo(train_x, train.tempo, test_x, test.tempo, protocol))
        put("mean_velocity", _probe_regression("mean_velocity", train_x, train.velocity, test_x, test.velocity))
        put("mean_duration", _probe_regression("mean_duration", train_x, train.duration, test_x, test.duration))
        value, k, note = _clustering(train_x, test_x, test.song, clusters, protocol, seed)
        for table in labels:  # annotated labels (--labels)
            put(table.name, table.score(train_x, train, test_x, test))
    out.clusters = k
    put("song_clustering", (value, note))
    out.values = {m: out.values[m] for m in (*METRICS, *(t.name for t in labels))}
    return out


# ----------------------------------------------------------------------------- the whole evaluation


@dataclass
class ProbeResult:
    """Per layer and metric, one value per repeat; plus what was sampled."""

    layers: list[int]
    values: dict[int, dict[str, list[float]]]
    notes: list[str]
    clusters_used: list[int]
    train_songs: int
    test_songs: int
    train_bars: list[int]
    test_bars: list[int]


def _draw_repeat(shards_dir, split: str, per_song: int, repeat: int, max_songs, seed: int, progress: bool, desc: str) -> BarSample:
    (sample,) = sample_split(shards_dir, split, per_song, 1, max_songs, seed=seed, first_repeat=repeat, progress=progress, desc=desc)
    if len(sample) == 0:
        raise ProbeError(f"split {split!r} of {shards_dir} has no bars to probe with")
    return sample


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
) -> ProbeResult:
    """Sample, extract features and score every chosen layer, ``repeats`` times (the seven
    metrics, then one per table of ``labels``).

    Memory stays bounded as the corpus grows: one repeat is sampled at a time (each split is
    read once per repeat; the bars are copied out of their songs), its features go to a
    :class:`~musicbert.feature_store.FeatureStore` (a temporary file in ``work_dir``, the
    system's temporary folder when None, deleted afterwards), and the probes read them back
    one layer at a time. ``progress`` shows each stage (sampling, features, probes) with its
    ETA on stderr.
    """
    if protocol not in PROTOCOLS:
        raise ProbeError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    if repeats < 1:
        raise ProbeError(f"repeats ({repeats}) must be >= 1")
    bare = unwrap(model)
    layer_list = parse_layers(layers, bare.cfg.n_layers)
    names = (*METRICS, *(t.name for t in labels))
    values: dict[int, dict[str, list[float]]] = {l: {m: [] for m in names} for l in layer_list}
    notes: list[str] = []
    clusters_used: list[int] = []
    sizes: dict[str, list[int]] = {"train_songs": [], "test_songs": [], "train_bars": [], "test_bars": []}
    for r in range(repeats):
        stage = f"repeat {r + 1}/{repeats}: " if repeats > 1 else ""
        train, test = (
            _draw_repeat(shards_dir, split, per_song, r, max_songs, seed, progress, f"{stage}sampling {split}")
            for split, per_song in ((train_split, train_per_song), (test_split, test_per_song))
        )
        for name, sample in (("train", train), ("test", test)):
            sizes[f"{name}_songs"].append(sample.n_songs)
            sizes[f"{name}_bars"].append(len(sample))
        n_train, n_all = len(train), len(train) + len(test)
        with FeatureStore(len(layer_list), n_all, bare.cfg.dim, work_dir) as store:
            encode_bars(bare, train.bars + test.bars, layer_list, device, batch_tokens, precision, progress,
                        f"{stage}features", out=store)
            train.bars, test.bars = [], []  # the tokens are no longer needed
            per_layer = list(enumerate(layer_list))
            for li, layer in stage_progress(per_layer, f"{stage}probes", "layer", len(per_layer)) if progress else per_layer:
                scores = score_layer(store.layer(li, np.arange(n_train)), train, store.layer(li, np.arange(n_train, n_all)), test,
                                     protocol, clusters, seed + r, labels)
                for m, v in scores.values.items():
                    values[layer][m].append(v)
                notes += [f"layer {layer} repeat {r + 1}: {n}" for n in scores.notes]
                clusters_used.append(scores.clusters)
    return ProbeResult(
        layers=layer_list,
        values=values,
        notes=notes,
        clusters_used=sorted(set(clusters_used)),
        train_songs=sizes["train_songs"][0],
        test_songs=sizes["test_songs"][0],
        train_bars=sizes["train_bars"],
        test_bars=sizes["test_bars"],
    )


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


# ----------------------------------------------------------------------------- TensorBoard projector

GM_FAMILIES = (
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Ensemble", "Brass",
    "Reed", "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Ethnic", "Percussive", "Sound Effects",
)
PROJECTOR_COLUMNS = ("song", "tempo_bpm", "instruments", "n_instruments", "drums", "main_instrument", "mean_velocity", "mean_duration")


def instrument_summary(multi_hot: np.ndarray) -> tuple[str, int, str]:
    """``(families joined with '+', number of programs, first program's name)`` of a bar's instrument labels."""
    programs = np.flatnonzero(multi_hot)
    families = sorted({"Drums" if p == 128 else GM_FAMILIES[p // 8] for p in programs})
    pitched = [p for p in programs if p < 128]
    main = GM_PROGRAM_NAMES[pitched[0]] if pitched else ("Drums" if len(programs) else "none")
    return "+".join(families) or "none", int(len(programs)), main


def projector_metadata(sample: BarSample) -> list[list[str]]:
    rows = []
    for i in range(len(sample)):
        fam, n, main = instrument_summary(sample.instruments[i])
        rows.append([
            sample.song_ids[sample.song[i]][:12],
            str(int(TEMPO_BINS[int(sample.tempo[i])])),
            fam,
            str(n),
            "yes" if sample.instruments[i][128] else "no",
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
