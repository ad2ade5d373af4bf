"""Exact resume of the training stream, and shards that are missing or corrupt."""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import subprocess
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from synthetic_shards import make_shards

from musicbert.config import load_config
from musicbert.data import DataWarning, TrainStream

FIELDS = ("tokens", "segments", "mlm_mask", "mlm_targets", "pair_anchor", "pair_positive")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("resume"), {"train": [6] * 5, "val": [3]}, bars=(1, 25))


def config(root: Path, workers: int, *overrides: str):
    # A small batch so that shards are used up, closed and replaced within a few batches.
    return load_config(None, [f"data.shards={root}", f"data.workers={workers}", "data.max_tokens=2048", *overrides])


def assert_same(a, b) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def roundtrip(state: dict, tmp_path: Path) -> dict:
    """Through JSON and a weights_only torch checkpoint, as the trainer stores it."""
    state = json.loads(json.dumps(state))
    torch.save({"data": [state]}, tmp_path / "ckpt.pt")
    return torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"][0]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(
    ("workers", "n", "mode"),
    [(0, 7, "BERT-neighbor"), (0, 5, "BERT-aug"), (2, 7, "BERT-neighbor"), (2, 6, "BERT-dropout"), (3, 8, "BERT")],
)
def test_resume_is_exact(synthetic, tmp_path, workers, n, mode):
    cfg = config(synthetic, workers, f"objective.mode={mode}")
    stream = TrainStream(cfg)
    reference = [next(stream) for _ in range(2 * n)]
    stream.close()

    first = TrainStream(cfg)
    head = [next(first) for _ in range(n)]
    state = roundtrip(first.state_dict(), tmp_path)
    first.close()
    resumed = TrainStream(cfg, state=state)
    tail = [next(resumed) for _ in range(n)]
    resumed.close()
    for a, b in zip(reference, head + tail):
        assert_same(a, b)
    assert resumed.state_dict()["consumed"] == 2 * n

    # load_state_dict on an existing stream does the same
    again = TrainStream(cfg)
    again.load_state_dict(state)
    assert_same(next(again), reference[n])
    again.close()


def test_resume_twice(synthetic, tmp_path):
    cfg = config(synthetic, 0)
    ref = TrainStream(cfg)
    reference = [next(ref) for _ in range(9)]
    stream = TrainStream(cfg)
    got = []
    for _ in range(3):
        got += [next(stream) for _ in range(3)]
        stream = TrainStream(cfg, state=roundtrip(stream.state_dict(), tmp_path))
    for a, b in zip(reference, got):
        assert_same(a, b)


def test_foreign_state_starts_a_fresh_stream(synthetic):
    cfg = config(synthetic, 0)
    stream = TrainStream(cfg)
    first = next(stream)
    state = stream.state_dict()
    with pytest.warns(DataWarning, match="rank 0"):
        other = TrainStream(cfg, rank=1, state=state)
    assert not torch.equal(next(other).tokens, first.tokens)
    with pytest.raises(RuntimeError):
        stream.load_state_dict(state)  # already iterating


def corrupt_copy(src: Path, dst: Path) -> tuple[str, str]:
    """A copy of ``src`` whose manifest also lists a missing shard, a truncated one and one with a bad sample."""

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    good = manifest["splits"]["train"]["shards"]
    data = (dst / good[0]).read_bytes()
    (dst / "train-truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    # a shard whose first sample has a broken tokens.npy
    with tarfile.open(dst / good[1]) as tin, tarfile.open(dst / "train-badsample.tar", "w") as tout:
        first_key = None
        for member in tin.getmembers():
            payload = tin.extractfile(member).read()
            key = member.name.split(".")[0]
            first_key = first_key or key
            if key == first_key and member.name.endswith("tokens.npy"):
                payload = b"not an npy file"
                member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    manifest["splits"]["train"]["shards"] = [*good, "train-missing.tar", "train-truncated.tar", "train-badsample.tar"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return "train-missing.tar", first_key


def test_bad_shards_are_skipped_with_a_warning(synthetic, tmp_path):
    root = tmp_path / "bad"
    missing, bad_key = corrupt_copy(synthetic, root)
    cfg = config(root, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = TrainStream(cfg)
        batches = [next(stream) for _ in range(40)]  # more than one pass over the 8 shards
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any(missing in m for m in messages), messages
    assert any("train-truncated.tar" in m for m in messages), messages
    assert any("train-badsample.tar" in m and bad_key in m for m in messages), messages
    assert all(b.n_bars > 0 for b in batches)


def test_no_readable_shard_raises(tmp_path):
    root = make_shards(tmp_path / "s", {"train": [2], "val": [1]})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = ["gone-1.tar", "gone-2.tar"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no readable bars"):
            next(TrainStream(config(root, 0)))


def test_fewer_shards_than_readers_warns(synthetic):
    cfg = config(synthetic, 4)
    with pytest.warns(DataWarning, match="5 training shards for 2 ranks x 4 workers"):
        TrainStream(cfg, 0, 2)


@pytest.mark.slow
def test_workers_survive_a_sigterm_meant_for_the_trainer(synthetic):
    """torchrun/SLURM send SIGTERM to the whole process group; the workers must outlive the checkpoint."""
    cfg = config(synthetic, 2)
    stream = TrainStream(cfg)
    next(stream)
    workers = multiprocessing.active_children()  # the stream's DataLoader workers
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *[str(w.pid) for w in workers]], check=True)  # sent by another process
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    for _ in range(6):
        next(stream)
    stream.close()  # the trainer's own shutdown still ends them
    for w in workers:
        w.join(10)
    assert not any(w.is_alive() for w in workers)
