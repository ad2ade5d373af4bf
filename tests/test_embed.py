"""Embeddings of MIDI files: API and CLI; alone or batched gives the same vectors; rejected files are named."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLES_MIDI
from eval_helpers import tiny_checkpoint
from musicbert import api, embed
from musicbert.tokenizer.errors import MidiRejected

GOOD = [EXAMPLES_MIDI / "d_dm15.mid", EXAMPLES_MIDI / "d_dm30.mid", EXAMPLES_MIDI / "d_fdmttl.mid"]
NOT_4_4 = EXAMPLES_MIDI / "d_dm06.mid"  # 7/8: the preprocessor refuses it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run"), seed=2, step=3)


@pytest.fixture(scope="module")
def encoder(ckpt):
    return api.load(ckpt, device="cpu")


def test_embed_midi_returns_bars_with_indices(encoder):
    e = encoder.embed_midi(GOOD[0])
    assert e.embeddings.shape == (e.n_bars, 32) and e.embeddings.dtype == np.float32
    assert e.layers == (2,)
    assert e.n_bars > 10 and np.all(np.diff(e.bar_index) > 0)
    all_layers = encoder.embed_midi(GOOD[0], layer="all")
    assert all_layers.embeddings.shape == (2, e.n_bars, 32)
    np.testing.assert_allclose(all_layers.embeddings[1], e.embeddings, atol=1e-6)
    np.testing.assert_allclose(encoder.embed_midi(GOOD[0], layer=1).embeddings, all_layers.embeddings[0], atol=1e-6)
    assert not np.allclose(all_layers.embeddings[0], all_layers.embeddings[1])


def test_alone_or_in_a_batch_gives_the_same_vectors(encoder):
    alone = [encoder.embed_midi(p, layer="all") for p in GOOD]
    batch, rejected = encoder.embed_midis(list(reversed(GOOD)), layer="all")
    assert rejected == []
    for a, b in zip(alone, reversed(batch)):
        assert a.path == b.path
        np.testing.assert_array_equal(a.bar_index, b.bar_index)
        np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5, rtol=0)


def test_a_rejected_file_gets_a_clear_message(encoder, tmp_path):
    with pytest.raises(MidiRejected) as info:
        encoder.embed_midi(NOT_4_4)
    assert info.value.reason == "not_4_4" and "7/8" in str(info.value) and str(NOT_4_4) in str(info.value)
    garbage = tmp_path / "garbage.mid"
    garbage.write_bytes(b"this is not a MIDI file")
    results, rejected = encoder.embed_midis([GOOD[1], NOT_4_4, garbage, tmp_path / "missing.mid"])
    assert [r.path for r in results] == [str(GOOD[1])]
    assert [r.path for r in rejected] == [str(NOT_4_4), str(garbage), str(tmp_path / "missing.mid")]
    assert rejected[0].reason == "not_4_4" and rejected[1].reason == "not_midi"
    for r in rejected:
        assert r.path in r.message, r.message


def test_cli_writes_npz_and_reports_rejected_files(ckpt, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    rc = embed.main(["--checkpoint", str(ckpt.parent.parent), "--out", str(out), "--device", "cpu",
                     str(GOOD[0]), str(NOT_4_4), str(GOOD[2])])
    assert rc == 0
    captured = capsys.readouterr()
    assert str(NOT_4_4) in captured.err and "not_4_4" in captured.err
    assert "embedded 2 of 3 files" in captured.out
    with np.load(out, allow_pickle=False) as z:
        assert list(z["files"]) == [str(GOOD[0]), str(GOOD[2])]
        assert list(z["rejected_files"]) == [str(NOT_4_4)]
        assert list(z["rejected_reasons"]) == ["not_4_4"] and "7/8" in z["rejected_messages"][0]
        assert z["embeddings"].shape == (1, len(z["bar_index"]), 32) and list(z["layers"]) == [2]
        n0 = int(np.sum(z["file_index"] == 0))
        alone = api.load(ckpt, device="cpu").embed_midi(GOOD[0])
        np.testing.assert_allclose(z["embeddings"][0, :n0], alone.embeddings, atol=1e-5)
        np.testing.assert_array_equal(z["bar_index"][:n0], alone.bar_index)

    rc = embed.main(["--checkpoint", str(ckpt), "--layer", "all", "--out", str(tmp_path / "all.npz"), "--device", "cpu", str(GOOD[2])])
    assert rc == 0
    with np.load(tmp_path / "all.npz") as z:
        assert z["embeddings"].shape == (2, len(z["bar_index"]), 32) and list(z["layers"]) == [1, 2]


def test_cli_writes_nothing_when_every_file_is_rejected(ckpt, tmp_path, capsys):
    out = tmp_path / "none.npz"
    assert embed.main(["--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", str(NOT_4_4)]) == 1
    assert "none of the 1 files could be embedded" in capsys.readouterr().err
    assert not out.exists()


def test_cli_names_a_text_file_given_as_checkpoint(tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_text("hello, I am not a checkpoint\n")
    assert embed.main(["--checkpoint", str(fake), "--out", str(tmp_path / "e.npz"), "--device", "cpu", str(GOOD[0])]) == 2
    err = capsys.readouterr().err
    assert str(fake) in err and "not a checkpoint" in err and "KeyError" not in err


def test_random_init_encoder_is_seeded(ckpt):
    a = api.load(ckpt, device="cpu", random_init=True, seed=5).embed_midi(GOOD[2]).embeddings
    b = api.load(ckpt, device="cpu", random_init=True, seed=5).embed_midi(GOOD[2]).embeddings
    c = api.load(ckpt, device="cpu").embed_midi(GOOD[2]).embeddings
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
