"""musicbert/checkpoint.py: atomic writes, pruning, corrupt-newest fallback, I/O errors, RNG round trip."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat

import numpy as np
import pytest
import torch

from musicbert import checkpoint as ckpt


def _state(x: float) -> dict:
    return {"model": {"w": torch.full((64, 64), x)}, "config": {"a": 1}, "vocab_sha256": "v", "rng": [ckpt.rng_state()]}


def test_save_prune_and_load(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30, 40]
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"step_{s:08d}.pt{ext}" for s in (20, 30, 40) for ext in ("", ".sha256")
    )
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "step_00000040.pt" and state["step"] == 40
    assert torch.equal(state["model"]["w"], torch.full((64, 64), 40.0))
    # weights_only loading is what the module uses; the file must also load that way directly
    assert torch.load(path, weights_only=True)["format"] == ckpt.FORMAT_NAME
    # resolve() accepts a file, a run dir or its checkpoints/ dir
    for where in (path, tmp_path, folder):
        assert ckpt.resolve(where)[1]["step"] == 40


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "no_sidecar_truncated"])
def test_corrupt_newest_falls_back(tmp_path, caplog, damage):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=3)
    newest = ckpt.checkpoint_path(tmp_path, 2)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte changed inside the tensor data: only the checksum sees it
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        newest.write_bytes(bytes(b))
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        newest.with_name(newest.name + ".sha256").unlink()
        newest.write_bytes(data[: len(data) - 100])
    with caplog.at_level(logging.WARNING, logger="musicbert.checkpoint"):
        path, state = ckpt.find_latest(tmp_path, quarantine_bad=True)
    assert state["step"] == 1 and path.name == "step_00000001.pt"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step_00000002.pt" in warning  # names the file ...
    assert any(w in warning for w in ("checksum", "cannot be read"))  # ... and why
    # moved aside: never tried again, kept for inspection
    assert (tmp_path / "checkpoints" / "step_00000002.pt.corrupt").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]


def test_no_checkpoint(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve(tmp_path)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=3)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, _state(2), keep=3)
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(names) == ["step_00000001.pt", "step_00000001.pt.sha256"]  # no partial file, no temp left


def test_disk_full_inside_torch_save_names_the_file(tmp_path, monkeypatch):
    # torch.save reports a failed write of its own as "RuntimeError: [enforce fail at
    # inline_container.cc] unexpected pos"; the caller must get the OSError with the file named.
    ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=3)

    class FillsUp:
        """A file that takes 4 KiB, then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.room = f, 4096

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

    real_init = ckpt._HashingWriter.__init__
    monkeypatch.setattr(ckpt._HashingWriter, "__init__", lambda self, f: real_init(self, FillsUp(f)))
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path, 2, _state(2), keep=3)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(ckpt.checkpoint_path(tmp_path, 2))
    assert "unexpected pos" in str(info.value.__cause__.__cause__)  # it did come through torch.save's RuntimeError
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]
    assert ckpt.find_latest(tmp_path)[1]["step"] == 1


def test_checkpoints_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=3)
    for p in (path, path.with_name(path.name + ".sha256")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_text("hello\n")
    with pytest.raises(ckpt.CheckpointError, match=r"model\.pt: not a checkpoint .* starts with b'hell'"):
        ckpt.load_checkpoint(fake)


def test_all_checkpoints_unreadable_lists_them_and_moves_nothing(tmp_path):
    for step in (1, 2):
        path = ckpt.save_checkpoint(tmp_path, step, _state(step), keep=3)
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ckpt.UnreadableCheckpoints) as info:
        ckpt.find_latest(tmp_path, quarantine_bad=True)
    message = str(info.value)
    assert "none of its 2 checkpoints can be read" in message
    assert "step_00000001.pt: checksum mismatch" in message and "step_00000002.pt: checksum mismatch" in message
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]  # nothing renamed


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.standard_normal(2), random.random(), random.gauss(0, 1))
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.standard_normal(2), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2:] == got[2:]
    with ckpt.preserved_rng():
        torch.rand(5)
    after = torch.rand(1)
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    torch.rand(3)
    assert torch.equal(after, torch.rand(1))


class _Counter:
    """A stateful object of the kind the trainer names (a data position, say)."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def _named(n: int) -> tuple[dict, dict]:
    torch.manual_seed(n)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "scaler": torch.amp.GradScaler("cpu", enabled=False)}, {"data": _Counter(n)}


def test_checkpointer_saves_and_restores_named_objects(tmp_path):
    shared, per_rank = _named(1)
    saver = ckpt.Checkpointer(tmp_path, 2, shared, per_rank, meta={"config": {"a": 1}, "vocab_sha256": "v"})
    rank_states = [saver.rank_state(), {"data": {"n": 7}}]  # rank 1's share, as gathered
    path = saver.save(5, rank_states)
    state = ckpt.load_checkpoint(path)  # weights_only=True
    assert state["step"] == 5 and state["world_size"] == 2 and state["data"] == [{"n": 1}, {"n": 7}]

    fresh_shared, fresh_rank = _named(2)
    ckpt.Checkpointer(tmp_path, 2, fresh_shared, fresh_rank, meta={}).load(state, rank=1)
    for a, b in zip(shared["model"].parameters(), fresh_shared["model"].parameters()):
        assert torch.equal(a, b)
    assert fresh_shared["optimizer"].state_dict()["state"][0]["exp_avg"].equal(shared["optimizer"].state_dict()["state"][0]["exp_avg"])
    assert fresh_rank["data"].n == 7  # this rank's share


def test_checkpointer_refuses_a_name_used_twice(tmp_path):
    with pytest.raises(ValueError, match="data"):
        ckpt.Checkpointer(tmp_path, 1, {"data": _Counter()}, {"data": _Counter()}, meta={})
    with pytest.raises(ValueError, match="step"):
        ckpt.Checkpointer(tmp_path, 1, {"step": _Counter()}, {}, meta={})


def test_rng_state_object_round_trip():
    saved = ckpt.RNGState().state_dict()
    first = (torch.rand(3), np.random.rand(), random.random())
    ckpt.RNGState().load_state_dict(saved)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_vocabulary_check_names_the_file():
    ckpt.check_vocabulary({"vocab_sha256": ckpt.VOCAB.sha256}, "a.pt")
    with pytest.raises(ckpt.CheckpointError, match="a.pt: trained with another vocabulary"):
        ckpt.check_vocabulary({"vocab_sha256": "0" * 64}, "a.pt")
