import dataclasses
import json

import numpy as np
import pytest
import torch

from musicbert.batch import Batch
from musicbert.label_schema import BAR_LABELS, LABEL_NAMES, BarLabels
from musicbert.probes import BarSample
from musicbert.shards import (
    FORMAT_VERSION,
    Manifest,
    ShardFormatError,
    SplitInfo,
    Song,
    read_manifest,
)
from musicbert.tokenizer.chords import chord_index, chord_name
from musicbert.vocab import VOCAB


def make_song(n_bars: int = 3, bar_len: int = 31) -> Song:
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, len(VOCAB), size=n_bars * bar_len).astype(np.uint16)
    return Song(
        id="00ff00ff00ff00ff",
        path="a/b.mid",
        tokens=tokens,
        offsets=np.arange(0, n_bars * bar_len + 1, bar_len, dtype=np.int64),
        bar_index=np.arange(n_bars, dtype=np.int32),
        instruments=np.zeros((n_bars, 129), np.uint8),
        chords=np.zeros((n_bars, 84), np.uint8),
        groove=np.ones((n_bars, 48), np.uint8),
        tempo=np.full(n_bars, 7, np.uint8),
        velocity=np.linspace(60, 90, n_bars).astype(np.float32),
        duration=np.full(n_bars, 4.5, np.float32),
    )


def test_sample_round_trip_is_exact():
    song = make_song()
    sample = song.to_sample()
    assert sample["__key__"] == song.id
    assert all(isinstance(v, bytes) for k, v in sample.items() if k != "__key__")
    back = Song.from_sample(sample, source="x.tar")
    assert back.n_bars == 3 and back.path == "a/b.mid"
    for name in ("tokens", "offsets", "bar_index", "instruments", "chords", "groove", "tempo", "velocity", "duration"):
        np.testing.assert_array_equal(getattr(back, name), getattr(song, name))
        assert getattr(back, name).dtype == getattr(song, name).dtype
    np.testing.assert_array_equal(back.bar(1), song.tokens[31:62])


def test_pickled_member_is_refused():
    sample = make_song().to_sample()
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    sample["tempo.npy"] = buf.getvalue()
    with pytest.raises(ShardFormatError, match=r"x\.tar: sample 00ff00ff00ff00ff member tempo\.npy"):
        Song.from_sample(sample, source="x.tar")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("tokens", np.zeros(93, np.int32), "tokens must be 1-D uint16"),
        ("offsets", np.array([0, 40, 31, 93]), "offsets must be increasing"),
        ("chords", np.zeros((3, 12), np.uint8), "chords must be uint8 of shape"),
        ("tempo", np.zeros(2, np.uint8), "tempo must be uint8 of shape"),
    ],
)
def test_invalid_song_names_the_member(field, value, message):
    song = make_song()
    setattr(song, field, value)
    with pytest.raises(ShardFormatError, match=message):
        song.validate()


def test_missing_member_is_named():
    sample = make_song().to_sample()
    del sample["groove.npy"]
    with pytest.raises(ShardFormatError, match="has no member groove.npy"):
        Song.from_sample(sample, source="s.tar")


def test_chord_columns():
    assert chord_index(0, "maj") == 0 and chord_index(11, "min7") == 83
    assert chord_name(chord_index(9, "min")) == "A:min"


def test_one_label_schema_for_shards_labeller_and_probes():
    """BarLabels (the labeller's result; Song and BarSample extend it) has the schema's labels, in order."""
    def label_fields(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.name in LABEL_NAMES)

    for cls in (Song, BarLabels, BarSample):
        assert label_fields(cls) == LABEL_NAMES, cls.__name__
    assert issubclass(Song, BarLabels) and issubclass(BarSample, BarLabels)
    assert {f.name: f.width for f in BAR_LABELS if f.width} == {"instruments": 129, "chords": 84, "groove": 48}
    song = make_song()
    for f in BAR_LABELS:
        assert getattr(song, f.name).shape[1:] == f.tail and getattr(song, f.name).dtype == f.dtype


def write_manifest(root, **overrides):
    manifest = Manifest(root, {"train": SplitInfo(2, 10, 400, ("train-000000.tar",))}, len(VOCAB), VOCAB.sha256, {"seed": 1})
    data = manifest.to_json() | overrides
    (root / "manifest.json").write_text(json.dumps(data))


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path)
    m = read_manifest(tmp_path)
    assert m.splits["train"].songs == 2 and m.options == {"seed": 1}
    assert m.shard_paths("train") == [str(tmp_path / "train-000000.tar")]
    with pytest.raises(ShardFormatError, match="no split 'val'"):
        m.shard_paths("val")


@pytest.mark.parametrize(
    "overrides,message",
    [({"format_version": FORMAT_VERSION + 1}, "preprocess the corpus again"), ({"vocab_sha256": "0" * 64}, "another vocabulary")],
)
def test_manifest_refuses_other_versions(tmp_path, overrides, message):
    write_manifest(tmp_path, **overrides)
    with pytest.raises(ShardFormatError, match=message):
        read_manifest(tmp_path)


def test_manifest_missing_names_the_folder(tmp_path):
    with pytest.raises(ShardFormatError, match="manifest.json: not found"):
        read_manifest(tmp_path)


def test_batch_bar_starts_and_efficiency():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    batch = Batch(
        tokens=torch.zeros(2, 6, dtype=torch.long),
        segments=segments,
        mlm_mask=torch.zeros(2, 6, dtype=torch.bool),
        mlm_targets=torch.zeros(0, dtype=torch.long),
        pair_anchor=torch.tensor([0]),
        pair_positive=torch.tensor([1]),
    )
    assert batch.bar_starts().tolist() == [[0, 0], [0, 2], [1, 0]]
    assert batch.n_bars == 3 and batch.n_real_tokens == 11
    assert batch.padding_efficiency == pytest.approx(11 / 12)
    assert batch.to("cpu").segments.equal(segments)
