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
            self.bars.append(np.asarray(song.bar(int(b))))
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
) -> list[BarSample]:
    """One :class:`BarSample` per repeat, reading the split once (see the module docstring)."""
    if per_song < 1 or repeats < 1:
        raise ProbeError(f"per_song ({per_song}) and repeats ({repeats}) must be >= 1")
    builders = [_SampleBuilder() for _ in range(repeats)]
    song_ids: list[str] = []
    for song in iter_split_songs(shards_dir, split, max_songs):
        if song.n_bars == 0:
            continue
        song_no = len(song_ids)
        song_ids.append(song.id)
        for r, builder in enumerate(builders):
            rng = np.random.default_rng([seed, r, _song_key(song.id)])
            k = min(per_song, song.n_bars)
            chosen = np.sort(rng.choice(song.n_bars, size=k, replace=False))
            if max_bars is not None:
                chosen = chosen[: max(0, max_bars - len(builder.bars))]
            builder.add(song, song_no, chosen)
        if max_bars is not None and all(len(b.bars) >= max_bars for b in builders):
            break
    return [b.build(list(song_ids)) for b in builders]


# ----------------------------------------------------------------------------- features


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


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
    batch_tokens: int = 16384,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "features",
) -> np.ndarray:
    """Bar embeddings ``float32 [len(layers), len(bars), dim]`` of the given (1-based) layers.

    Bars are packed into rows of ``model.cfg.max_len`` tokens, ``batch_tokens`` tokens per
    forward. The model is put in eval mode for the call and given back in its previous mode
    (and on its previous device).
    """
    model = unwrap(model)
    device = resolve_device(device)
    cfg = model.cfg
    if precision not in ("fp32", "bf16"):
        raise ProbeError(f"precision {precision!r} is not one of ['fp32', 'bf16']")
    layer_idx = torch.tensor([l - 1 for l in layers], dtype=torch.long)
    out = np.zeros((len(layers), len(bars), cfg.dim), dtype=np.float32)
    if not bars:
        return out
    fitted = [_fit_bar(b, cfg.max_len) for b in bars]
    row_len = min(cfg.max_len, max(len(b) for b in fitted))
    batches = pack_bars([len(b) for b in fitted], row_len, max(1, batch_tokens // row_len))
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
                    n = len(fitted[i])
                    tokens[r, col : col + n] = fitted[i]
                    segments[r, col : col + n] = s
                    col += n
                order.extend(members)
            with autocast:
                states = model(torch.from_numpy(tokens).to(device), torch.from_numpy(segments).to(device)).bar_states
            chosen = states.index_select(0, layer_idx.to(states.device)).float().cpu().numpy()
            out[:, order] = chosen
            if bar_progress is not None:
                bar_progress.update(len(order))
    finally:
        if bar_progress is not None:
            bar_progress.close()
        model.to(old_device)
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- scoring


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both with the training rows' mean and (population) std; a constant feature is only centred."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


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


def _probe_multilabel(name, xtr, ytr, xte, yte, protocol) -> tuple[float, str | None]:
    from sklearn.linear_model import RidgeClassifier

    keep_tr = ytr.sum(axis=1) > 0
    keep_te = yte.sum(axis=1) > 0
    if keep_tr.sum() < 2:
        return float("nan"), f"{name}: fewer than 2 training bars with a positive label"
    if keep_te.sum() == 0:
        return float("nan"), f"{name}: no test bar with a positive label"
    xtr, xte = standardise(xtr[keep_tr], xte[keep_te])
    ytr, yte = ytr[keep_tr], yte[keep_te]
    clf = RidgeClassifier(alpha=ALPHA).fit(xtr, ytr.astype(np.int64))
    decision = clf.decision_function(xte)
    threshold = REFERENCE_CHORD_THRESHOLD if name == "chords" else 0.0
    value = weighted_auc(yte, multilabel_scores(decision, protocol, threshold))
    if math.isnan(value):
        return value, f"{name}: no label has both positive and negative test bars"
    return value, None


def _probe_accuracy(name, xtr, ytr, xte, yte) -> tuple[float, str | None]:
    """Multi-class ridge classifier over the classes seen in training; accuracy of its argmax."""
    from sklearn.linear_model import RidgeClassifier

    if len(ytr) < 2 or len(yte) == 0:
        return float("nan"), f"{name}: too few bars"
    xtr, xte = standardise(xtr, xte)
    clf = RidgeClassifier(alpha=ALPHA).fit(xtr, np.asarray(ytr, dtype=np.int64))
    return float(np.mean(clf.predict(xte) == np.asarray(yte, dtype=np.int64))), None


def _probe_tempo(xtr, ttr, xte, tte, protocol) -> tuple[float, str | None]:
    from sklearn.linear_model import RidgeClassifier

    if protocol == "standard":
        return _probe_accuracy("tempo", xtr, ttr, xte, tte)
    if len(ttr) < 2 or len(tte) == 0:
        return float("nan"), "tempo: too few bars"
    xtr, xte = standardise(xtr, xte)
    onehot = np.eye(N_TEMPO, dtype=np.int64)[np.asarray(ttr, dtype=np.int64)]
    clf = RidgeClassifier(alpha=ALPHA).fit(xtr, onehot)
    return tempo_accuracy_reference(clf.decision_function(xte), np.asarray(tte, dtype=np.int64)), None


def _probe_regression(name, xtr, ytr, xte, yte) -> tuple[float, str | None]:
    from sklearn.linear_model import Ridge

    if len(ytr) < 2 or len(yte) == 0:
        return float("nan"), f"{name}: too few bars"
    xtr, xte = standardise(xtr, xte)
    pred = Ridge(alpha=ALPHA).fit(xtr, ytr.astype(np.float64)).predict(xte)
    return float(np.sqrt(np.mean((pred - yte.astype(np.float64)) ** 2))), None


def _clustering(xtr, xte, test_songs, clusters, protocol, seed) -> tuple[float, int, str | None]:
    from sklearn.cluster import MiniBatchKMeans

    k = clusters_for(len(xtr), clusters)
    if len(xtr) < k or len(xte) == 0:
        return float("nan"), k, "song_clustering: too few bars"
    xtr, xte = standardise(xtr, xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on small samples
        # n_init and batch_size as the defaults of scikit-learn 1.1.3, the version the reference pinned
        km = MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=1024, random_state=seed).fit(xtr)
        assignments = km.predict(xte)
    return cluster_entropy(assignments, test_songs, k, protocol), k, None


def score_layer(
    train_x: np.ndarray,
    train: BarSample,
    test_x: np.ndarray,
    test: BarSample,
    protocol: str = "standard",
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    labels: Sequence["LabelTable"] = (),
) -> LayerScores:
    """The seven metrics for one layer's features (rows aligned with the samples), then one
    per annotated label table (:mod:`musicbert.custom_labels`), in the tables' order."""
    if protocol not in PROTOCOLS:
        raise ProbeError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    train_x = np.asarray(train_x, dtype=np.float32)
    test_x = np.asarray(test_x, dtype=np.float32)
    out = LayerScores()

    def put(name: str, result: tuple[float, str | None]) -> None:
        out.values[name] = result[0]
        if result[1]:
            out.notes.append(result[1])

    from threadpoolctl import threadpool_limits

    # Small problems run faster on one thread (OpenMP/BLAS start-up costs dominate, badly so
    # on a busy machine); large ones use the machine.
    threads = 1 if train_x.size + test_x.size < SMALL_PROBLEM else None
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
    batch_tokens: int = 16384,
    precision: str = "fp32",
    progress: bool = False,
    labels: Sequence["LabelTable"] = (),
) -> ProbeResult:
    """Sample, extract features and score every chosen layer, ``repeats`` times (the seven
    metrics, then one per table of ``labels``)."""
    if protocol not in PROTOCOLS:
        raise ProbeError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    bare = unwrap(model)
    layer_list = parse_layers(layers, bare.cfg.n_layers)
    train_sets = sample_split(shards_dir, train_split, train_per_song, repeats, max_songs, seed=seed)
    test_sets = sample_split(shards_dir, test_split, test_per_song, repeats, max_songs, seed=seed)
    for split, sets in ((train_split, train_sets), (test_split, test_sets)):
        if len(sets[0]) == 0:
            raise ProbeError(f"split {split!r} of {shards_dir} has no bars to probe with")
    names = (*METRICS, *(t.name for t in labels))
    values: dict[int, dict[str, list[float]]] = {l: {m: [] for m in names} for l in layer_list}
    notes: list[str] = []
    clusters_used: list[int] = []
    for r, (train, test) in enumerate(zip(train_sets, test_sets)):
        desc = f"features (repeat {r + 1}/{repeats})" if repeats > 1 else "features"
        feats = encode_bars(bare, train.bars + test.bars, layer_list, device, batch_tokens, precision, progress, desc)
        for li, layer in enumerate(layer_list):
            scores = score_layer(feats[li, : len(train)], train, feats[li, len(train) :], test, protocol, clusters, seed + r, labels)
            for m, v in scores.values.items():
                values[layer][m].append(v)
            notes += [f"layer {layer} repeat {r + 1}: {n}" for n in scores.notes]
            clusters_used.append(scores.clusters)
    return ProbeResult(
        layers=layer_list,
        values=values,
        notes=notes,
        clusters_used=sorted(set(clusters_used)),
        train_songs=train_sets[0].n_songs,
        test_songs=test_sets[0].n_songs,
        train_bars=[len(s) for s in train_sets],
        test_bars=[len(s) for s in test_sets],
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
