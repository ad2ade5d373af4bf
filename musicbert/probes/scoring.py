"""Scoring one layer's features: the probes and the metrics' arithmetic (see :mod:`musicbert.probes`).

The probe helpers (:func:`probe_multilabel`, :func:`probe_accuracy`, :func:`probe_regression`)
serve the seven metrics and the annotated labels (:mod:`musicbert.custom_labels`) alike.
scikit-learn is imported inside the functions that fit a probe, and scipy inside
:func:`column_auc`: together they take about a second to import, which tools that only
read :data:`~musicbert.probes.metrics.METRIC_TABLE` or encode bars should not pay.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from musicbert.feature_store import FeatureRows, as_rows
from musicbert.probes.metrics import METRICS, PROTOCOLS, ProbeError, check_protocol
from musicbert.probes.sampling import BarSample
from musicbert.vocab import TEMPO_BINS

if TYPE_CHECKING:
    from musicbert.custom_labels import LabelTable

ALPHA = 100.0  # ridge penalty of every probe
REFERENCE_CHORD_THRESHOLD = -0.8  # the reference's decision threshold for chords (0 for the others)
REFERENCE_ENTROPY_EPS = 1e-6
DEFAULT_CLUSTERS = 1000
BARS_PER_CLUSTER = 10  # k is capped at n_train_bars // BARS_PER_CLUSTER
N_TEMPO = len(TEMPO_BINS)
SMALL_PROBLEM = 2_000_000  # feature values (train + test) below which scoring runs on one thread
MULTILABEL = ("chords", "groove", "instruments")  # the multi-hot labels, probed one-vs-rest
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


@dataclass(frozen=True)
class Scaling:
    """Standardisation with the training rows' mean and (population) std; a constant feature is only centred."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, train: np.ndarray) -> "Scaling":
        mean, std = column_mean_std(train)
        return cls(mean, np.where(std > 0, std, 1.0))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale ``x`` in place and return it."""
        x -= self.mean
        x /= self.std
        return x


M = TypeVar("M")


def fit_then_apply(
    train_x: FeatureRows,
    test_x: FeatureRows,
    fit: Callable[[np.ndarray], M],
    apply: Callable[[M, np.ndarray], np.ndarray],
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
) -> np.ndarray:
    """``apply(fit(train), test)`` on standardised rows (all, or those a boolean mask picks).

    The training rows are read (a fresh copy), scaled in place and fitted, and let go before
    the test rows are read: a probe holds at most one layer's training features, never
    together with the test features or with what ``apply``'s result is scored by.
    """
    train = train_x.take(train_rows)
    scaling = Scaling.of(train)
    model = fit(scaling.apply(train))
    del train
    return apply(model, scaling.apply(test_x.take(test_rows)))


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


def plus_minus(indicator: np.ndarray) -> np.ndarray:
    """0/1 labels ``[bars, labels]`` as the +-1 float32 targets of a ridge classifier."""
    targets = np.asarray(indicator, dtype=np.float32)
    targets *= 2
    targets -= 1
    return targets


def fit_ridge(x: np.ndarray, targets: np.ndarray):
    """``Ridge(alpha=ALPHA)`` fitted to ``x``, which it centres in place (``copy_X=False``).

    Fitting +-1 targets (:func:`plus_minus`) is what ``RidgeClassifier`` does; doing it here
    gives the same scores without RidgeClassifier's copies: its int64 labels (5 kB a bar
    for 129 labels) and, because it always passes sample weights (all 1), a rescaled copy
    of ``x``.
    """
    from sklearn.linear_model import Ridge

    return Ridge(alpha=ALPHA, copy_X=False).fit(x, targets)


def ridge_scores(model, x: np.ndarray) -> np.ndarray:
    """The fitted ridge's outputs on ``x``, ``[rows, targets]`` (a column even for one target)."""
    return model.predict(x).reshape(len(x), -1)


def ridge_decision(train_x: FeatureRows, indicator: np.ndarray, test_x: FeatureRows, train_rows=None, test_rows=None) -> np.ndarray:
    """``RidgeClassifier(alpha=ALPHA).decision_function`` on the standardised test rows, fitted
    to the standardised training rows and their 0/1 ``indicator [bars, labels]`` (a column
    per label, one-vs-rest); see :func:`fit_then_apply` for ``train_rows``/``test_rows``."""
    targets = plus_minus(indicator)
    return fit_then_apply(train_x, test_x, lambda x: fit_ridge(x, targets), ridge_scores, train_rows, test_rows)


def ridge_predict(train_x: FeatureRows, labels: np.ndarray, test_x: FeatureRows) -> np.ndarray:
    """``RidgeClassifier(alpha=ALPHA).predict`` on the standardised test rows, over the classes
    seen in training (one decision column for two classes, as RidgeClassifier)."""
    classes, index = np.unique(labels, return_inverse=True)
    if len(classes) == 1:
        return np.full(test_x.shape[0], classes[0])
    onehot = np.zeros((len(labels), len(classes)), dtype=bool)
    onehot[np.arange(len(labels)), index] = True
    if len(classes) == 2:  # one column: the second class against the first
        return classes[(ridge_decision(train_x, onehot[:, 1:], test_x)[:, 0] > 0).astype(np.int64)]
    return classes[np.argmax(ridge_decision(train_x, onehot, test_x), axis=1)]


# Every probe goes through fit_then_apply: it reads its own rows (FeatureRows.take: a fresh
# copy, from disk when the features are stored), standardises them in place and lets the
# ridge centre them in place (copy_X=False): one copy of a layer's training rows at a time.


def probe_multilabel(name, train_x: FeatureRows, ytr, test_x: FeatureRows, yte, protocol) -> tuple[float, str | None]:
    keep_tr = ytr.sum(axis=1) > 0
    keep_te = yte.sum(axis=1) > 0
    if keep_tr.sum() < 2:
        return float("nan"), f"{name}: fewer than 2 training bars with a positive label"
    if keep_te.sum() == 0:
        return float("nan"), f"{name}: no test bar with a positive label"
    decision = ridge_decision(train_x, ytr[keep_tr], test_x, keep_tr, keep_te)
    threshold = REFERENCE_CHORD_THRESHOLD if name == "chords" else 0.0
    value = weighted_auc(yte[keep_te], multilabel_scores(decision, protocol, threshold))
    if math.isnan(value):
        return value, f"{name}: no label has both positive and negative test bars"
    return value, None


def probe_accuracy(name, train_x: FeatureRows, ytr, test_x: FeatureRows, yte) -> tuple[float, str | None]:
    """Multi-class ridge classifier over the classes seen in training; accuracy of its argmax."""
    if len(ytr) < 2 or len(yte) == 0:
        return float("nan"), f"{name}: too few bars"
    predicted = ridge_predict(train_x, np.asarray(ytr, dtype=np.int64), test_x)
    return float(np.mean(predicted == np.asarray(yte, dtype=np.int64))), None


def probe_tempo(train_x: FeatureRows, ttr, test_x: FeatureRows, tte, protocol) -> tuple[float, str | None]:
    if protocol == "standard":
        return probe_accuracy("tempo", train_x, ttr, test_x, tte)
    if len(ttr) < 2 or len(tte) == 0:
        return float("nan"), "tempo: too few bars"
    onehot = np.eye(N_TEMPO, dtype=bool)[np.asarray(ttr, dtype=np.int64)]  # the reference: a column per tempo bin
    return tempo_accuracy_reference(ridge_decision(train_x, onehot, test_x), np.asarray(tte, dtype=np.int64)), None


def probe_regression(name, train_x: FeatureRows, ytr, test_x: FeatureRows, yte) -> tuple[float, str | None]:
    if len(ytr) < 2 or len(yte) == 0:
        return float("nan"), f"{name}: too few bars"
    pred = fit_then_apply(train_x, test_x, lambda x: fit_ridge(x, ytr.astype(np.float64)), lambda m, x: m.predict(x))
    return float(np.sqrt(np.mean((pred - yte.astype(np.float64)) ** 2))), None


def probe_clustering(train_x: FeatureRows, test_x: FeatureRows, test_songs, clusters, protocol, seed) -> tuple[float, int, str | None]:
    from sklearn.cluster import MiniBatchKMeans

    n_train, n_test = train_x.shape[0], test_x.shape[0]
    k = clusters_for(n_train, clusters)
    if n_train < k or n_test == 0:
        return float("nan"), k, "song_clustering: too few bars"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on small samples
        # n_init and batch_size as the defaults of scikit-learn 1.1.3, the version the reference pinned
        km = MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=1024, random_state=seed)
        assignments = fit_then_apply(train_x, test_x, km.fit, lambda model, x: model.predict(x))
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
    check_protocol(protocol)
    train_x, test_x = as_rows(train_x), as_rows(test_x)
    out = LayerScores()

    def put(name: str, result: tuple[float, str | None]) -> None:
        out.values[name] = result[0]
        if result[1]:
            out.notes.append(result[1])

    # Small problems run faster on one thread (OpenMP/BLAS start-up costs dominate, badly so
    # on a busy machine); large ones use the machine.
    threads = 1 if (train_x.shape[0] + test_x.shape[0]) * train_x.shape[1] < SMALL_PROBLEM else None
    with warnings.catch_warnings(), threadpool_limits(threads):
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for name in MULTILABEL:
            put(name, probe_multilabel(name, train_x, getattr(train, name), test_x, getattr(test, name), protocol))
        put("tempo", probe_tempo(train_x, train.tempo, test_x, test.tempo, protocol))
        put("mean_velocity", probe_regression("mean_velocity", train_x, train.velocity, test_x, test.velocity))
        put("mean_duration", probe_regression("mean_duration", train_x, train.duration, test_x, test.duration))
        value, k, note = probe_clustering(train_x, test_x, test.song, clusters, protocol, seed)
        for table in labels:  # annotated labels (--labels)
            put(table.name, table.score(train_x, train, test_x, test))
    out.clusters = k
    put("song_clustering", (value, note))
    out.values = {m: out.values[m] for m in (*METRICS, *(t.name for t in labels))}
    return out

