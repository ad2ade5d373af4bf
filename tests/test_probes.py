"""Probe scoring (hand-computed examples for both protocols), feature extraction, run_probes, projector."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch

from eval_helpers import tiny_model
from musicbert.feature_store import ArrayRows, FeatureStore
from musicbert.inference import InferenceError, encode_bars, parse_layers, resolve_device, resolve_precision
from musicbert.packing import pack_bars
from musicbert.probes import (
    METRICS,
    BarSample,
    probe_model,
    probe_multilabel,
    run_probes,
    sample_split,
    score_layer,
    weighted_auc,
    write_projector,
)
from musicbert.probes import scoring
from musicbert.probes.scoring import (
    cluster_entropy,
    clusters_for,
    Scaling,
    column_mean_std,
    fit_then_apply,
    multilabel_scores,
    ridge_decision,
    ridge_predict,
    tempo_accuracy_reference,
)
from musicbert.vocab import VOCAB

# Two labels, four test bars. Label 0: positives are bars 0 and 2; label 1: bars 1, 2, 3.
Y = np.array([[1, 0], [0, 1], [1, 1], [0, 1]])
D = np.array([[0.5, 0.3], [-0.2, 0.2], [-0.1, -0.5], [-0.9, 0.4]])  # decision scores


def test_auc_standard_uses_scores_by_hand():
    # label 0: both positive scores (0.5, -0.1) above both negatives (-0.2, -0.9) -> 1.
    # label 1: positives 0.2, -0.5, 0.4 vs the negative 0.3: 1 of 3 pairs ordered -> 1/3.
    # weighted by positives (2 and 3): (2 * 1 + 3 * 1/3) / 5 = 0.6
    assert weighted_auc(Y, multilabel_scores(D, "standard")) == pytest.approx(0.6)


def test_auc_reference_uses_hard_predictions_by_hand():
    # threshold 0: label 0 predicted [1,0,0,0]: TPR 1/2, FPR 0 -> AUC (1 + 1/2 - 0) / 2 = 0.75
    #              label 1 predicted [1,1,0,1]: TPR 2/3, FPR 1 -> AUC (1 + 2/3 - 1) / 2 = 1/3
    #              weighted: (2 * 0.75 + 3 * 1/3) / 5 = 0.5
    assert weighted_auc(Y, multilabel_scores(D, "reference")) == pytest.approx(0.5)
    # the chord threshold -0.8: label 0 predicted [1,1,1,0]: TPR 1, FPR 1/2 -> 0.75
    #                           label 1 predicted [1,1,1,1]: TPR 1, FPR 1 -> 0.5
    #                           weighted: (2 * 0.75 + 3 * 0.5) / 5 = 0.6
    assert weighted_auc(Y, multilabel_scores(D, "reference", threshold=-0.8)) == pytest.approx(0.6)


def test_auc_leaves_out_constant_labels():
    y = np.hstack([Y, np.zeros((4, 1), int), np.ones((4, 1), int)])  # a label never present, one always present
    d = np.hstack([D, np.zeros((4, 2))])
    assert weighted_auc(y, d) == pytest.approx(0.6)
    assert math.isnan(weighted_auc(np.ones((4, 2), int), d[:, :2]))


def test_auc_equals_sklearn_where_defined():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random((60, 12)) < 0.3).astype(int)
    y[0], y[1] = 1, 0  # every column has both classes
    s = np.round(rng.normal(size=(60, 12)), 1)  # ties included
    assert weighted_auc(y, s) == pytest.approx(roc_auc_score(y, s, average="weighted"), abs=1e-12)
    h = (s > 0).astype(int)
    assert weighted_auc(y, h) == pytest.approx(roc_auc_score(y, h, average="weighted"), abs=1e-12)


def test_tempo_reference_exact_match_by_hand():
    decision = np.array([
        [0.5, -0.1, -0.2],  # true 0: thresholded [1,0,0] == one-hot -> right
        [0.2, 0.3, -1.0],  # true 1: [1,1,0] has two positives -> wrong (argmax would be right)
        [-0.1, -0.2, -0.3],  # true 0: nothing > 0 -> wrong (argmax would be right)
    ])
    truth = np.array([0, 1, 0])
    assert tempo_accuracy_reference(decision, truth) == pytest.approx(1 / 3)
    assert np.mean(decision.argmax(1) == truth) == 1.0  # what the standard protocol's argmax gives


def test_cluster_entropy_by_hand():
    assignments = np.array([0, 0, 0, 1])
    songs = np.array([7, 7, 9, 9])  # song 7 in one cluster (entropy 0); song 9 split in two (ln 2)
    assert cluster_entropy(assignments, songs, 4, "standard") == pytest.approx((0 + math.log(2) / math.log(4)) / 2)
    eps = 1e-6
    p7 = np.array([1, 0, 0, 0]) + eps
    p9 = np.array([0.5, 0.5, 0, 0]) + eps
    h = lambda p: -np.sum(p * np.log(p)) / math.log(4)  # noqa: E731
    assert cluster_entropy(assignments, songs, 4, "reference") == pytest.approx((h(p7) + h(p9)) / 2)


def test_clusters_capped_by_training_bars():
    assert clusters_for(712_000) == 1000
    assert clusters_for(135) == 13
    assert clusters_for(5) == 2


def test_scaling_uses_training_statistics_and_survives_constant_features():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    test = np.array([[2.0, 6.0]])
    scaling = Scaling.of(train)
    a, b = scaling.apply(train), scaling.apply(test)
    np.testing.assert_allclose(a, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(b, [[0, 1]])
    assert a is train and b is test, "in place: no copies of a layer's features"


def test_fit_then_apply_lets_the_training_rows_go_before_reading_the_test_rows():
    """A probe holds one layer's training rows at most, never with the test rows."""
    rng = np.random.default_rng(0)
    alive = []

    class Watched(ArrayRows):
        def take(self, mask=None):
            assert not [r for r in alive if r() is not None], "training rows still held when the test rows are read"
            return super().take(mask)

    def fit(x):
        alive.append(weakref.ref(x))
        return x.mean(axis=0)

    xtr, xte = rng.normal(size=(50, 4)) * 3 + 1, rng.normal(size=(20, 4))
    out = fit_then_apply(ArrayRows(xtr), Watched(xte), fit, lambda mean, x: x - mean)
    np.testing.assert_allclose(out, (xte - xtr.mean(0)) / xtr.std(0), atol=1e-12)


def test_column_std_in_chunks_is_numpys_to_the_bit(monkeypatch):
    monkeypatch.setattr(scoring, "STD_CHUNK_ROWS", 7)  # many chunks, the last one short
    x = (np.random.default_rng(0).normal(size=(100, 33)) * 3 + 5).astype(np.float32)
    mean, std = column_mean_std(x)
    assert np.array_equal(mean, x.mean(axis=0)) and np.array_equal(std, x.std(axis=0))


def test_reference_multilabel_matches_a_plain_sklearn_pipeline():
    """The reference scored RidgeClassifier(alpha=100).predict (or decision > -0.8 for chords)
    with roc_auc_score(average="weighted") on standardised features: same number here."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(80, 6)), rng.normal(size=(40, 6))
    w = rng.normal(size=(6, 5))
    ytr = (xtr @ w + rng.normal(size=(80, 5)) > 0.5).astype(np.uint8)
    yte = (xte @ w + rng.normal(size=(40, 5)) > 0.5).astype(np.uint8)
    ytr[0], yte[:2] = 1, [[1] * 5, [0] * 5]
    ktr, kte = ytr.sum(1) > 0, yte.sum(1) > 0
    mean, std = xtr[ktr].mean(0), xtr[ktr].std(0)
    clf = RidgeClassifier(alpha=100).fit((xtr[ktr] - mean) / std, ytr[ktr].astype(float))  # the reference had float labels
    ztest = (xte[kte] - mean) / std
    expected = roc_auc_score(yte[kte], clf.predict(ztest), average="weighted")
    assert probe_multilabel("groove", ArrayRows(xtr), ytr, ArrayRows(xte), yte, "reference")[0] == pytest.approx(expected, abs=1e-12)
    expected_chords = roc_auc_score(yte[kte], (clf.decision_function(ztest) > -0.8).astype(int), average="weighted")
    assert probe_multilabel("chords", ArrayRows(xtr), ytr, ArrayRows(xte), yte, "reference")[0] == pytest.approx(expected_chords, abs=1e-12)


@pytest.mark.parametrize("n_classes", [1, 2, 5])
def test_ridge_predict_and_decision_equal_ridge_classifier(n_classes):
    """The probes fit RidgeClassifier's ridge themselves (without its copy of the features): same predictions and scores."""
    from sklearn.linear_model import RidgeClassifier

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 120) * 3 + 1  # class values that are not 0..n-1
    xtr = rng.normal(size=(120, 8)) + labels[:, None] * 0.2
    xte = rng.normal(size=(50, 8))
    clf = RidgeClassifier(alpha=scoring.ALPHA).fit(Scaling.of(xtr).apply(xtr.copy()), labels)
    np.testing.assert_array_equal(ridge_predict(ArrayRows(xtr), labels, ArrayRows(xte)), clf.predict(Scaling.of(xtr).apply(xte.copy())))
    onehot = (rng.random((120, 6)) < 0.3).astype(np.uint8)
    multi = RidgeClassifier(alpha=scoring.ALPHA).fit(Scaling.of(xtr).apply(xtr.copy()), onehot.astype(float))
    expected = multi.decision_function(Scaling.of(xtr).apply(xte.copy()))
    np.testing.assert_allclose(ridge_decision(ArrayRows(xtr), onehot, ArrayRows(xte)), expected, rtol=1e-5, atol=1e-6)


def synthetic_sample(rng, n, n_songs):
    return BarSample(
        bars=[np.array([VOCAB.bar_id, VOCAB.eob_id])] * n,
        song=rng.integers(0, n_songs, n),
        song_ids=[f"{i:016x}" for i in range(n_songs)],
        bar_index=np.zeros(n, np.int32),
        instruments=(rng.random((n, 129)) < 0.05).astype(np.uint8),
        chords=(rng.random((n, 84)) < 0.05).astype(np.uint8),
        groove=(rng.random((n, 48)) < 0.2).astype(np.uint8),
        tempo=rng.integers(0, 32, n).astype(np.uint8),
        velocity=rng.uniform(40, 100, n).astype(np.float32),
        duration=rng.uniform(0, 20, n).astype(np.float32),
    )


@pytest.mark.parametrize("protocol", ["standard", "reference"])
def test_score_layer_metrics_in_range(protocol):
    rng = np.random.default_rng(0)
    train, test = synthetic_sample(rng, 200, 40), synthetic_sample(rng, 60, 6)
    s = score_layer(rng.normal(size=(200, 16)), train, rng.normal(size=(60, 16)), test, protocol, clusters=1000)
    assert list(s.values) == list(METRICS)
    for m in ("chords", "groove", "instruments", "tempo", "song_clustering"):
        assert 0.0 <= s.values[m] <= 1.0, m
    assert s.values["mean_velocity"] >= 0 and s.values["mean_duration"] >= 0
    assert s.clusters == 20


def test_labels_absent_from_training_or_test_are_handled():
    rng = np.random.default_rng(3)
    train, test = synthetic_sample(rng, 100, 20), synthetic_sample(rng, 30, 3)
    train.chords[:] = 0
    train.chords[:5, 3] = 1  # one chord label only in training
    test.chords[:] = 0  # no test bar has a chord
    train.tempo[:] = 4  # one tempo class only
    s = score_layer(rng.normal(size=(100, 8)), train, rng.normal(size=(30, 8)), test)
    assert math.isnan(s.values["chords"]) and any("chords" in n for n in s.notes)
    assert s.values["tempo"] == pytest.approx(np.mean(test.tempo == 4))
    assert 0 <= s.values["instruments"] <= 1


def test_parse_layers():
    assert parse_layers("all", 3) == [1, 2, 3]
    assert parse_layers("3,1", 3) == [1, 3]
    assert parse_layers("last", 12) == [12]
    with pytest.raises(InferenceError, match="1..3"):
        parse_layers("4", 3)
    with pytest.raises(InferenceError):
        parse_layers("x", 3)


def test_pack_bars_keeps_every_bar_once_and_within_rows():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(30, 512, 300))
    batches = pack_bars(lengths, 512, 8)
    seen = [i for rows in batches for row in rows for i in row]
    assert sorted(seen) == list(range(300))
    for rows in batches:
        assert len(rows) <= 8
        assert all(sum(lengths[i] for i in row) <= 512 for row in rows)


def test_features_do_not_depend_on_batching(example_shards):
    model = tiny_model(0).train()  # dropout on: encode_bars must switch to eval mode
    (sample,) = sample_split(example_shards, "test", 4)
    bars = sample.bars
    together = encode_bars(model, bars, [1, 2], "cpu", batch_tokens=4096)
    small = encode_bars(model, bars, [1, 2], "cpu", batch_tokens=512)  # one row per forward
    alone = np.stack([encode_bars(model, [b], [1, 2], "cpu")[:, 0] for b in bars[:5]], axis=1)
    assert model.training, "the model's mode is given back"
    np.testing.assert_allclose(together, small, atol=1e-5)
    np.testing.assert_allclose(together[:, :5], alone, atol=1e-5)
    # the same as a plain forward of the bar alone (first token after each layer)
    with torch.no_grad():
        direct = model.eval()(torch.from_numpy(bars[0].astype(np.int64))[None]).bar_states[:, 0].numpy()
    np.testing.assert_allclose(together[:, 0], direct, atol=1e-5)


def test_sampling_is_per_song_and_reproducible(example_shards):
    a = sample_split(example_shards, "train", 5, repeats=2, seed=0)
    b = sample_split(example_shards, "train", 5, repeats=2, seed=0, max_songs=3)
    assert len(a) == 2 and len(a[0]) == len(a[1])
    counts = np.bincount(a[0].song)
    assert counts.max() <= 5
    # a song's draw does not depend on which other songs are read
    n3 = int(np.sum(a[0].song < 3))
    assert [x.tolist() for x in a[0].bars[:n3]] == [x.tolist() for x in b[0].bars]
    assert not all(np.array_equal(x, y) for x, y in zip(a[0].bars, a[1].bars)), "repeats draw afresh"


def test_run_probes_on_a_tiny_model(example_shards):
    model = tiny_model(1).train()
    out = run_probes(model, example_shards, layers="all", max_songs=8, device="cpu", seed=0)
    assert sorted(out) == [1, 2]
    for layer, metrics in out.items():
        assert list(metrics) == list(METRICS)
        for m in ("chords", "groove", "instruments", "tempo", "song_clustering"):
            assert 0.0 <= metrics[m] <= 1.0, (layer, m)
        assert metrics["mean_velocity"] >= 0 and metrics["mean_duration"] >= 0
    assert model.training
    again = run_probes(model, example_shards, layers=[2], max_songs=8, device="cpu", seed=0)
    assert again[2] == out[2], "same seed, same numbers"


def test_write_projector(example_shards, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    n = write_projector(writer, tiny_model(0), example_shards, step=7, max_bars=25, device="cpu")
    writer.close()
    assert n == 25
    meta = list(tmp_path.rglob("metadata.tsv"))
    assert len(meta) == 1
    lines = meta[0].read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["song", "tempo_bpm", "instruments"] and len(lines) == 26
    assert (tmp_path / "projector_config.pbtxt").is_file()


def test_features_that_hold_the_labels_beat_random_features(example_shards):
    """Alignment check of sampling, labels and scoring: features made of the labels themselves
    score far better than random features. (Not perfectly: with ~120 training bars, alpha 100
    shrinks the ridge weights hard, and the test songs' instruments are not the training songs'.)"""
    (train,) = sample_split(example_shards, "train", 5)
    (test,) = sample_split(example_shards, "test", 10)
    rng = np.random.default_rng(0)

    def feats(s):
        cols = [s.instruments, s.chords, s.groove, np.eye(32)[s.tempo], s.velocity[:, None] / 10, s.duration[:, None]]
        x = np.hstack(cols).astype(np.float32)
        return x + rng.normal(scale=0.1, size=x.shape)  # not near-constant: standardising would blow tiny noise up

    good = score_layer(feats(train), train, feats(test), test).values
    noise = score_layer(rng.normal(size=(len(train), 342)), train, rng.normal(size=(len(test), 342)), test).values
    for m in ("instruments", "chords", "groove"):
        assert good[m] > 0.65 and good[m] > noise[m] + 0.1, (m, good[m], noise[m])
    assert good["tempo"] > noise["tempo"] + 0.05  # test songs often have a tempo no training song has
    assert good["mean_velocity"] < 0.9 * noise["mean_velocity"]


def test_sampled_bars_are_copied_out_of_their_songs(example_shards):
    (sample,) = sample_split(example_shards, "test", 3)
    assert all(bar.base is None for bar in sample.bars), "a view would keep the song's token array alive"


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(InferenceError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_a_cuda_device_that_is_not_there_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InferenceError, match=r"cuda:1 asked for, but this machine has 1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_on_cuda_needs_native_bf16(monkeypatch, native):
    """torch.cuda.is_bf16_supported() is also True on GPUs that only emulate bf16 (V100, T4): auto must not pick it there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp32")


def test_features_written_to_a_store_equal_those_in_memory(example_shards, tmp_path):
    model = tiny_model(0)
    (sample,) = sample_split(example_shards, "test", 4)
    in_memory = encode_bars(model, sample.bars, [1, 2], "cpu", batch_tokens=1024)
    with FeatureStore(2, len(sample), model.cfg.dim, tmp_path) as store:
        assert encode_bars(model, sample.bars, [1, 2], "cpu", batch_tokens=1024, out=store) is store
        picked = np.random.default_rng(0).permutation(len(sample))[: len(sample) // 2]
        for li in (0, 1):
            assert np.array_equal(store.read(li, np.arange(len(sample))), in_memory[li])
            assert np.array_equal(store.layer(li, picked).take(picked % 2 == 0), in_memory[li][picked[picked % 2 == 0]])
    assert list(tmp_path.iterdir()) == [], "the feature file is removed"


def test_probe_model_equals_the_in_memory_evaluation(example_shards, tmp_path):
    """probe_model (a repeat at a time, features on disk, probes layer by layer) gives the
    numbers of the in-memory method it replaced: every repeat sampled in one pass, all
    layers' features in one array, score_layer on slices of it."""
    model, repeats, seed = tiny_model(2), 2, 5
    got = probe_model(model, example_shards, "all", repeats=repeats, seed=seed, device="cpu", max_songs=8, work_dir=tmp_path)
    trains = sample_split(example_shards, "train", 5, repeats, max_songs=8, seed=seed)
    tests = sample_split(example_shards, "test", 10, repeats, max_songs=8, seed=seed)
    for r, (train, test) in enumerate(zip(trains, tests)):
        feats = encode_bars(model, train.bars + test.bars, [1, 2], "cpu")
        for li, layer in enumerate((1, 2)):
            want = score_layer(feats[li, : len(train)], train, feats[li, len(train) :], test, seed=seed + r)
            for m in METRICS:
                assert got.values[layer][m][r] == pytest.approx(want.values[m], rel=1e-6, abs=1e-9, nan_ok=True), (r, layer, m)
    assert got.train_bars == [len(s) for s in trains] and got.test_bars == [len(s) for s in tests]
    assert list(tmp_path.iterdir()) == []


def test_feature_store_reads_any_rows_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50, 4)).astype(np.float32)
    order = rng.permutation(50)
    with FeatureStore(3, 50, 4, tmp_path) as store:
        for batch in np.array_split(order, 6):  # batches of bars in a shuffled order, as packing gives them
            store.write(batch, x[:, batch])
        with pytest.raises(ValueError, match="twice"):
            store.write(order[:1], x[:, order[:1]])
        wanted = np.array([49, 0, 7, 7, 31])
        for layer in range(3):
            np.testing.assert_array_equal(store.read(layer, wanted), x[layer, wanted])
        assert store.layer(1, np.arange(50)).shape == (50, 4)


def test_score_layer_reads_stored_rows_like_arrays_and_leaves_them_unchanged(tmp_path):
    rng = np.random.default_rng(4)
    train, test = synthetic_sample(rng, 120, 30), synthetic_sample(rng, 40, 5)
    xtr, xte = rng.normal(size=(120, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    before = xtr.copy()
    from_arrays = score_layer(xtr, train, xte, test, clusters=5)
    assert np.array_equal(xtr, before)
    with FeatureStore(1, 160, 8, tmp_path) as store:
        store.write(np.arange(160)[::-1], np.concatenate([xtr, xte])[::-1][None])
        stored = score_layer(store.layer(0, np.arange(120)), train, store.layer(0, np.arange(120, 160)), test, clusters=5)
    assert stored.values == pytest.approx(from_arrays.values, nan_ok=True)
