"""Linear probes of bar embeddings: the seven metrics of SPEC §6, per layer.

One code path serves the evaluation CLI (:mod:`musicbert.evaluate`, several repeats, train
split -> test split) and the quick probe the training loop runs (:func:`run_probes`, one
repeat on a few songs, train split -> val split).

=================== ===================================================================
module              job
=================== ===================================================================
``metrics``         the metric table (name, direction, kind), the protocols, ProbeError
``sampling``        :class:`BarSample`, :func:`sample_split`: bars and labels of a split
``scoring``         the probes and :func:`score_layer`: the metrics of one layer
``runner``          :func:`probe_model`, :func:`run_probes`: sample, encode, score
``journal``         :class:`ScoreJournal`: finished layers on disk, so that a rerun resumes
``projector``       :func:`write_projector`: embeddings for TensorBoard's projector
=================== ===================================================================

Bars are encoded by :mod:`musicbert.inference` (device, layers, batches), the same path as
the Python API.

Features
    The bar embedding of layer ``i`` (1-based) is the hidden state of the bar's first token
    (``Bar_0``) after block ``i``, for the unmasked bar, with the model in eval mode
    (:func:`musicbert.inference.encode_bars`; bars are packed several to a row, which the model keeps apart, so a
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

Metrics (names as in ``metrics.json``; :data:`~.metrics.METRIC_TABLE` gives the direction)
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

from musicbert.probes.metrics import HIGHER_IS_BETTER, METRIC_KIND, METRIC_TABLE, METRICS, PROTOCOLS, Metric, ProbeError
from musicbert.probes.projector import write_projector
from musicbert.probes.runner import ProbeResult, probe_model, run_probes
from musicbert.probes.sampling import TEST_BARS_PER_SONG, TRAIN_BARS_PER_SONG, BarSample, iter_split_songs, sample_split
from musicbert.probes.scoring import (
    DEFAULT_CLUSTERS,
    LayerScores,
    probe_accuracy,
    probe_multilabel,
    probe_regression,
    score_layer,
    weighted_auc,
)

__all__ = [
    "DEFAULT_CLUSTERS", "HIGHER_IS_BETTER", "METRICS", "METRIC_KIND", "METRIC_TABLE", "PROTOCOLS",
    "TEST_BARS_PER_SONG", "TRAIN_BARS_PER_SONG", "BarSample", "LayerScores", "Metric", "ProbeError", "ProbeResult",
    "iter_split_songs", "probe_accuracy", "probe_model", "probe_multilabel", "probe_regression", "run_probes",
    "sample_split", "score_layer", "weighted_auc", "write_projector",
]  # fmt: skip
