"""Preprocessor, corpus runs: shards and manifest, determinism, --overwrite, broken files, crashes."""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import shutil
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from conftest import EXAMPLE_SHARDS_OPTIONS, EXAMPLES_MIDI
from musicbert.shards import Song, read_manifest
from musicbert.tokenizer.encode import song_from_midi, song_id
from musicbert.tokenizer.midi import Limits
from preprocess.__main__ import main as cli_main
from preprocess.run import Options, encode_file, find_midi_files, preprocess_corpus
from preprocess.shards import OutputExists, assign_split, parse_split


def read_songs(root: Path, split: str) -> list[Song]:
    manifest = read_manifest(root)
    songs = []
    for url in manifest.shard_paths(split):
        for sample in wds.WebDataset(url, shardshuffle=False):  # raw bytes per member
            songs.append(Song.from_sample(sample, source=url))
    return songs


def errors_of(root: Path) -> dict[str, dict]:
    lines = (root / "errors.jsonl").read_text().splitlines()
    return {e["path"]: e for e in map(json.loads, lines)}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# --- the example folder ------------------------------------------------------------------------


def test_example_shards_cover_every_file(example_shards):
    manifest = read_manifest(example_shards)
    errors = errors_of(example_shards)
    kept = {}
    for split in ("train", "val", "test"):
        songs = read_songs(example_shards, split)
        info = manifest.splits[split]
        assert info.songs == len(songs) > 0
        assert info.bars == sum(s.n_bars for s in songs)
        assert info.tokens == sum(len(s.tokens) for s in songs)
        assert [s.path for s in songs] == sorted(s.path for s in songs)  # deterministic order
        for s in songs:
            assert assign_split(s.id, 7, (0.8, 0.1, 0.1)) == split and s.id == song_id(s.path)
            assert (np.diff(s.offsets) >= 30).all() and (np.diff(s.offsets) <= 512).all()
            kept[s.path] = s
    assert len(manifest.splits["train"].shards) == -(-manifest.splits["train"].songs // 8)
    files = find_midi_files(EXAMPLES_MIDI)
    assert len(files) == 34 and set(kept) | set(errors) == set(files) and not set(kept) & set(errors)
    assert {e["reason"] for e in errors.values()} == {"not_4_4"}
    # the shards hold exactly what encoding the file directly gives
    s = kept["d_dm01.mid"]
    direct = song_from_midi(EXAMPLES_MIDI / "d_dm01.mid", "d_dm01.mid")
    for name in ("tokens", "offsets", "bar_index", "instruments", "chords", "groove", "tempo", "velocity", "duration"):
        np.testing.assert_array_equal(getattr(s, name), getattr(direct, name))
    data = json.loads((example_shards / "manifest.json").read_text())
    assert data["files"] == 34 and data["rejected"] == 4 and data["options"]["seed"] == 7
    assert [manifest.splits[k].songs for k in ("train", "val", "test")] == [24, 3, 3]


def _first_file_waits_for_the_last(src: str, flag: str, first: str, last: str, rel: str) -> tuple:
    """Test task: the first file finishes only after the last one has, so every other result arrives early."""
    if rel == first:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag):
            assert time.monotonic() < deadline, "the last file never finished: the pool did not run past the first"
            time.sleep(0.01)
    result = encode_file(src, Limits(), True, rel)
    if rel == last:
        Path(flag).touch()
    return result


@pytest.mark.slow
def test_one_and_two_workers_give_identical_folders_whatever_order_files_finish_in(example_shards, tmp_path):
    preprocess_corpus(EXAMPLES_MIDI, tmp_path / "w1", Options(**dict(EXAMPLE_SHARDS_OPTIONS, workers=1)))
    files = find_midi_files(EXAMPLES_MIDI)
    task = functools.partial(_first_file_waits_for_the_last, str(EXAMPLES_MIDI), str(tmp_path / "flag"), files[0], files[-1])
    summary = preprocess_corpus(EXAMPLES_MIDI, tmp_path / "w2", Options(**dict(EXAMPLE_SHARDS_OPTIONS, workers=2)), task=task)
    assert summary.spilled > 0  # files 1.. finished before file 0, some waited on disk
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2") == tree_bytes(example_shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "w1", "w2"]  # no spill folder left


def test_split_is_a_function_of_id_and_seed():
    ids = [song_id(f"x/{i}.mid") for i in range(4000)]
    splits = [assign_split(i, 7, (0.8, 0.1, 0.1)) for i in ids]
    assert splits == [assign_split(i, 7, (0.8, 0.1, 0.1)) for i in reversed(ids)][::-1]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert 3000 < counts["train"] < 3400 and 300 < counts["val"] < 500 and 300 < counts["test"] < 500
    assert splits != [assign_split(i, 8, (0.8, 0.1, 0.1)) for i in ids]
    assert {assign_split(i, 7, (1.0, 0.0, 0.0)) for i in ids} == {"train"}
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.1", "0.5,0.5,0.5", "a,b,c", "-0.1,0.6,0.5"):
        with pytest.raises(ValueError):
            parse_split(bad)


# --- output folder semantics ----------------------------------------------------------------------


def small_src(tmp_path: Path, names=("d_dm01.mid", "d_dm02.mid", "d_dm06.mid")) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy(EXAMPLES_MIDI / name, (src / "sub" if i % 2 else src) / name)
    return src


def test_cli_refuses_non_empty_out_and_overwrite_replaces_it(tmp_path, capsys):
    src = small_src(tmp_path)
    out = tmp_path / "out"
    args = ["--src", str(src), "--out", str(out), "--workers", "1", "--no-progress"]
    assert cli_main(args) == 0
    assert "3 files" in capsys.readouterr().out
    first = tree_bytes(out)
    (out / "train-000099.tar").write_bytes(b"left over from an older run")
    assert cli_main(args) == 2
    assert "not empty" in capsys.readouterr().err and (out / "train-000099.tar").exists()
    with pytest.raises(OutputExists):
        preprocess_corpus(src, out, Options())
    assert cli_main(args + ["--overwrite"]) == 0
    assert tree_bytes(out) == first  # replaced as a whole: nothing of the old folder is left
    assert set(errors_of(out)) == {"d_dm06.mid"}
    m = read_manifest(out)
    assert sum(s.songs for s in m.splits.values()) == 2
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}  # no temporary folder left
    # an empty existing folder is fine without --overwrite; in-process gives the same bytes too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["--src", str(src), "--out", str(empty), "--workers", "0", "--no-progress"]) == 0
    assert tree_bytes(empty) == first


def test_overwrite_refuses_folders_that_are_not_preprocessor_output(tmp_path, capsys):
    src = small_src(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    args = ["--src", str(src), "--workers", "0", "--no-progress", "--overwrite"]
    assert cli_main(args + ["--out", str(precious)]) == 2
    assert "does not look like a preprocessor output" in capsys.readouterr().err
    assert (precious / "thesis.tex").exists()
    assert cli_main(args + ["--out", str(tmp_path)]) == 2  # --out containing --src
    assert "contains --src" in capsys.readouterr().err
    assert (src / "d_dm01.mid").exists()


def _interrupting_task(rel):
    if rel.endswith("d_dm02.mid"):
        raise KeyboardInterrupt
    return encode_file(str(EXAMPLES_MIDI), Limits(), True, rel.split("/")[-1])


def test_interrupted_run_leaves_the_old_output_untouched(tmp_path):
    src = small_src(tmp_path)
    out = tmp_path / "out"
    preprocess_corpus(src, out, Options(workers=0))
    before = tree_bytes(out)
    with pytest.raises(KeyboardInterrupt):
        preprocess_corpus(src, out, Options(workers=0, seed=5), overwrite=True, task=_interrupting_task)
    assert tree_bytes(out) == before
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}


def test_find_midi_files_is_recursive_sorted_and_case_insensitive(tmp_path):
    for rel in ("b/z.MID", "a.kar", "b/a.midi", "c.txt", "b/c/d.mid"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert find_midi_files(tmp_path) == ["a.kar", "b/a.midi", "b/c/d.mid", "b/z.MID"]


# --- robustness -------------------------------------------------------------------------------------

ROBUSTNESS_KEPT = {
    "drums_only_type0_gmd_funk80.mid",
    "karaoke_lyrics_twinkle.kar",
    "no_ts_meta_busy_schedule.mid",
    "odd_tpb89_freedoom_map19.mid",
    "symusic_eof_but_mido_ok.mid",
    "tempo_98_changes_2drumtracks_lakh_pop.mid",
    "track_explosion_380tracks.mid",
    "type0_lakh_pop_d6caebd.mid",
    "type0_multitrack_drums_freedoom_dm24.mid",
    "very_long_877bars_blupi.mid",
}
ROBUSTNESS_REJECTED = {
    "bad_keysig_mode255_simutrans05.mid": "unreadable",
    "not_midi_text.mid": "not_midi",
    "no_notes_empty.mid": "no_notes",
    "tiny_4notes_freedoom_dummy.mid": "too_few_bars",
    "tiny_type0_tpb90_bad_databyte.mid": "too_few_bars",  # read thanks to clip=True; 3 notes
    "truncated_48KiB_lakh_pop.mid": "unreadable",
    "truncated_half_freedoom_dm01.mid": "unreadable",
    "truncated_header_plus_freedoom_dm01.mid": "unreadable",
    "bad_databyte_control168.mid": "not_4_4",  # read thanks to clip=True; 2/4
}


@pytest.mark.slow
def test_robustness_folder(shared_data, tmp_path):
    src = shared_data / "robustness"
    out = tmp_path / "out"
    summary = preprocess_corpus(src, out, Options(workers=2, timeout=120))
    files = set(find_midi_files(src))
    assert len(files) == 29
    errors = errors_of(out)
    kept = {s.path: s for split in ("train", "val", "test") for s in read_songs(out, split)}
    assert set(kept) | set(errors) == files and not set(kept) & set(errors)
    assert set(kept) == ROBUSTNESS_KEPT
    for path, reason in ROBUSTNESS_REJECTED.items():
        assert errors[path]["reason"] == reason, errors[path]
    assert all(e["reason"] == "not_4_4" for p, e in errors.items() if p not in ROBUSTNESS_REJECTED)
    assert all(e["message"] for e in errors.values())
    assert summary.songs == len(kept) and summary.worker_restarts == 0
    long = kept["very_long_877bars_blupi.mid"]
    assert long.n_bars > 500 and long.bar_index.max() < 877


@pytest.mark.slow
def test_random_byte_corruption_never_stops_the_run(tmp_path):
    rng = np.random.default_rng(1234)
    sources = sorted(EXAMPLES_MIDI.glob("*.mid"))
    src = tmp_path / "fuzz"
    src.mkdir()
    for k in range(30):
        data = bytearray(sources[int(rng.integers(len(sources)))].read_bytes())
        mode = k % 3
        if mode == 0:  # flip random bytes
            for i in rng.integers(0, len(data), int(rng.integers(1, 40))):
                data[i] = int(rng.integers(0, 256))
        elif mode == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        else:  # overwrite a run of bytes (headers included)
            i = int(rng.integers(0, max(1, len(data) - 64)))
            data[i : i + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        (src / f"fuzz_{k:02d}.mid").write_bytes(bytes(data))
    out = tmp_path / "out"
    summary = preprocess_corpus(src, out, Options(workers=2, timeout=60, memory_mb=2048))
    errors = errors_of(out)
    kept = {s.path for split in ("train", "val", "test") for s in read_songs(out, split)}
    assert kept | set(errors) == set(find_midi_files(src)) and len(kept) + len(errors) == 30
    assert summary.songs == len(kept)
    assert "error" not in {e["reason"] for e in errors.values()}, [e for e in errors.values() if e["reason"] == "error"]


# --- pathological workers -----------------------------------------------------------------------------


def _misbehaving_task(src, rel):
    """Test task: some files crash the worker, hang, blow memory or raise; the others encode."""
    name = rel.split("/")[-1]
    if name.startswith("segv"):
        faulthandler.disable()  # pytest's faulthandler would print the dying worker's stack
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("exit"):
        os._exit(3)
    if name.startswith("hang"):
        time.sleep(600)
    if name.startswith("oom"):
        return np.ones(2**34, dtype=np.uint8).sum()  # 16 GiB: above the worker's memory limit
    if name.startswith("bug"):
        raise ZeroDivisionError("a bug")
    return encode_file(src, Limits(), False, rel)


@pytest.mark.slow
def test_crashing_hanging_and_oom_workers_are_recorded_and_replaced(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["a_ok.mid", "bug.mid", "exit.mid", "hang.mid", "m_ok.mid", "oom.mid", "segv.mid", "z_ok.mid"]
    for n in names:
        shutil.copy(EXAMPLES_MIDI / "d_dm02.mid", src / n)
    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = preprocess_corpus(src, out, Options(workers=2, timeout=3, memory_mb=1024), task=functools.partial(_misbehaving_task, str(src)))
    assert time.monotonic() - t0 < 60
    errors = errors_of(out)
    assert {p: e["reason"] for p, e in errors.items()} == {
        "bug.mid": "error",
        "exit.mid": "worker_crashed",
        "hang.mid": "timeout",
        "oom.mid": "out_of_memory",
        "segv.mid": "worker_crashed",
    }
    assert "SIGSEGV" in errors["segv.mid"]["message"] and "exit code 3" in errors["exit.mid"]["message"]
    assert "ZeroDivisionError" in errors["bug.mid"]["message"]
    assert summary.songs == 3 and summary.worker_restarts == 3
    songs = [s.path for split in ("train", "val", "test") for s in read_songs(out, split)]
    assert sorted(songs) == ["a_ok.mid", "m_ok.mid", "z_ok.mid"]


def test_shards_are_plain_tars_with_fixed_metadata(example_shards):
    with tarfile.open(example_shards / "val-000000.tar") as tar:
        members = tar.getmembers()
    assert members and all(m.mtime == 0 and m.uname == "musicbert" for m in members)
    assert not [p for p in example_shards.iterdir() if p.name.endswith(".part")]


def test_python_m_preprocess_runs(tmp_path):
    import subprocess
    import sys

    src = small_src(tmp_path, names=("d_dm01.mid", "d_dm06.mid"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "--src", str(src), "--out", str(out), "--workers", "1", "--seed", "3",
         "--split", "1,0,0", "--shard-size", "5"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 files" in proc.stdout and "not_4_4 1" in proc.stdout
    m = read_manifest(out)
    assert m.splits["train"].songs == 1 and m.options["seed"] == 3 and m.options["shard_size"] == 5
    assert "warning: split 'val' is empty" in proc.stderr
