"""python -m musicbert.evaluate on a tiny model: every metric for every layer, in range; files written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval_helpers import tiny_checkpoint
from musicbert import evaluate, report
from musicbert.probes import HIGHER_IS_BETTER, METRICS
from musicbert.shards import read_manifest

IN_UNIT_RANGE = ("chords", "groove", "instruments", "tempo", "song_clustering")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_checkpoint(run, seed=0, step=5)
    return run


def check_metrics(metrics: dict, layers: list[int], repeats: int) -> None:
    assert sorted(int(k) for k in metrics["layers"]) == layers
    for layer, per in metrics["layers"].items():
        assert list(per) == list(METRICS)
        for m, cell in per.items():
            assert len(cell["values"]) == repeats
            assert cell["mean"] is not None and cell["std"] is not None, (layer, m)
            assert cell["std"] >= 0
            if m in IN_UNIT_RANGE:
                assert all(0.0 <= v <= 1.0 for v in cell["values"]), (layer, m, cell)
            else:
                assert all(v >= 0.0 for v in cell["values"]), (layer, m, cell)
    assert metrics["better"] == {m: "higher" if HIGHER_IS_BETTER[m] else "lower" for m in METRICS}


def test_cli_writes_every_metric_for_every_layer(run_dir, example_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(run_dir), "--shards", str(example_shards), "--out", str(out),
                        "--repeats", "2", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    check_metrics(metrics, [1, 2], 2)
    s = metrics["settings"]
    assert s["step"] == 5 and s["protocol"] == "standard" and s["random_init"] is False
    manifest = read_manifest(example_shards)
    assert s["train_songs"] == manifest.splits["train"].songs and s["test_songs"] == manifest.splits["test"].songs
    assert s["clusters"] == 1000 and s["clusters_used"] == s["train_bars"] // 10
    md = (out / "metrics.md").read_text()
    assert "song_clustering ↓" in md and "| 2 |" in md
    png = (out / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    captured = capsys.readouterr()
    assert "metrics.json" in captured.out
    assert sorted(f.name for f in out.iterdir()) == ["layers.png", "metrics.json", "metrics.md"], "the feature folder is removed"
    for stage in ("repeat 2/2: sampling train", "repeat 2/2: features", "repeat 2/2: probes"):
        assert stage in captured.err, stage
    assert s["precision"] == "fp32", "auto is fp32 on CPU"


def test_reference_protocol_and_random_init(run_dir, example_shards, tmp_path):
    ref = evaluate.evaluate(run_dir, example_shards, layers="last", repeats=1, protocol="reference", device="cpu")
    check_metrics(ref, [2], 1)
    assert ref["settings"]["protocol"] == "reference"
    kw = dict(layers="1", repeats=1, random_init=True, device="cpu", max_songs=6)
    a = evaluate.evaluate(run_dir, example_shards, seed=3, **kw)
    b = evaluate.evaluate(run_dir, example_shards, seed=3, **kw)
    c = evaluate.evaluate(run_dir, example_shards, seed=4, **kw)
    assert a["settings"]["random_init"] is True
    assert a["layers"] == b["layers"], "a seeded random init is reproducible"
    assert a["layers"] != c["layers"]


def test_compare_prints_both_side_by_side(tmp_path, capsys):
    def fake(step, random_init, base):
        return {
            "layers": {str(l): {m: {"mean": base + l / 100, "std": 0.0, "values": [base + l / 100]} for m in METRICS} for l in (1, 2)},
            "settings": {"step": step, "random_init": random_init},
        }

    (tmp_path / "a.json").write_text(json.dumps(fake(300, False, 0.8)))
    (tmp_path / "b.json").write_text(json.dumps(fake(300, True, 0.5)))
    assert evaluate.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    text = capsys.readouterr().out
    assert "step 300" in text and "random-init" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "metric" not in line}
    assert set(rows) == set(METRICS)
    assert "higher ↑" in rows["tempo"] and "0.820 (2)" in rows["tempo"] and rows["tempo"].count("step 300") == 2
    assert "lower ↓" in rows["song_clustering"] and "0.510 (1)" in rows["song_clustering"]
    assert rows["song_clustering"].count("random-init") == 2
    assert report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "trained", "baseline"]) == 0
    assert "| trained: best (layer) | baseline: best (layer) |" in capsys.readouterr().out


def test_bad_arguments_give_clear_errors(run_dir, example_shards, tmp_path, capsys):
    rc = evaluate.main(["--checkpoint", str(run_dir), "--shards", str(example_shards), "--out", str(tmp_path), "--layers", "7"])
    assert rc == 2 and "layers 1..2" in capsys.readouterr().err
    rc = evaluate.main(["--checkpoint", str(tmp_path / "nothing"), "--shards", str(example_shards), "--out", str(tmp_path)])
    assert rc == 2 and "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--shards", str(example_shards)])


class Crash(Exception):
    pass


def count_calls(monkeypatch, module, name, crash_at: int | None = None) -> list:
    """Wrap ``module.name``: record each call's arguments; raise Crash on call number ``crash_at``."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == crash_at:
            raise Crash(f"{name} call {crash_at}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_an_interrupted_evaluation_resumes_with_the_layers_it_finished(run_dir, example_shards, tmp_path, monkeypatch):
    from musicbert.probes import runner

    kwargs = dict(repeats=2, device="cpu", seed=3)
    expected = evaluate.evaluate(run_dir, example_shards, tmp_path / "whole", **kwargs)
    out = tmp_path / "eval"
    with monkeypatch.context() as m:  # repeat 1 scored, repeat 2 only its first layer, then a crash
        count_calls(m, runner, "score_layer", crash_at=4)
        with pytest.raises(Crash):
            evaluate.evaluate(run_dir, example_shards, out, **kwargs)
    assert (out / evaluate.JOURNAL).exists() and not (out / "metrics.json").exists()

    scored = count_calls(monkeypatch, runner, "score_layer")
    encoded = count_calls(monkeypatch, runner, "encode_bars")
    drawn = count_calls(monkeypatch, runner, "_draw_repeat")
    metrics = evaluate.evaluate(run_dir, example_shards, out, **kwargs)
    assert len(scored) == 1, "only repeat 2's second layer is scored again"
    assert [args[2] for args in encoded] == [[2]], "only that layer is encoded, once"
    assert [args[3] for args in drawn] == [1, 1], "repeat 1 is not sampled again; repeat 2 is (train and test)"
    assert metrics["layers"] == expected["layers"], "the same values as an uninterrupted run"
    assert {k: v for k, v in metrics["settings"].items() if k != "seconds"} == \
        {k: v for k, v in expected["settings"].items() if k != "seconds"}
    assert not (out / evaluate.JOURNAL).exists(), "the journal goes once the results are written"


def test_a_journal_of_other_settings_is_not_used(run_dir, example_shards, tmp_path, monkeypatch):
    from musicbert.probes import runner

    out = tmp_path / "eval"
    with monkeypatch.context() as m:
        count_calls(m, runner, "score_layer", crash_at=3)
        with pytest.raises(Crash):
            evaluate.evaluate(run_dir, example_shards, out, repeats=2, device="cpu", seed=3)
    scored = count_calls(monkeypatch, runner, "score_layer")
    evaluate.evaluate(run_dir, example_shards, out, repeats=2, device="cpu", seed=4)
    assert len(scored) == 4, "another seed draws other bars: every layer of every repeat is scored"


def test_the_journal_and_the_leftovers_of_cut_writes_are_removed_at_the_end(tmp_path):
    from musicbert.probes.journal import SampleSizes, ScoreJournal
    from musicbert.probes.scoring import LayerScores

    journal = ScoreJournal(tmp_path / "j.json", {"seed": 1})
    journal.record(0, SampleSizes(2, 1, 10, 5), 1, LayerScores({"tempo": float("nan")}, ["a note"], 2))
    (tmp_path / ".j.json.abc123").write_text("{")  # a write that kill -9 cut short
    (tmp_path / "other.json").write_text("{}")
    again = ScoreJournal(tmp_path / "j.json", {"seed": 1})
    scores = again.scores(0)[1]
    assert np.isnan(scores.values["tempo"]) and scores.notes == ["a note"] and scores.clusters == 2
    assert again.sizes(0) == SampleSizes(2, 1, 10, 5)
    assert ScoreJournal(tmp_path / "j.json", {"seed": 2}).scores(0) == {}, "another key: nothing reused"
    again.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]
