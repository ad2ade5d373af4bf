"""The preprocessing pool: no worker waits for a slow task, results in task order in bounded memory."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pytest

from preprocess import spill
from preprocess.pool import TaskPool
from preprocess.reorder import InOrder


def test_in_order_hands_on_in_index_order_and_holds_at_most_in_memory(tmp_path):
    order = np.random.default_rng(0).permutation(200).tolist()
    got = []
    held_most = 0
    with InOrder(in_memory=5, codec=spill, spill_dir=tmp_path) as ordered:
        for index in order:
            ordered.put(index, {"index": index, "payload": b"x" * index})
            held_most = max(held_most, ordered.held)
            got += list(ordered.ready())
            assert len(ordered) == ordered.held + len(list(tmp_path.glob(".spill-*/*")))  # the rest is on disk
        assert len(ordered) == 0
        assert ordered.spilled > 100
        with pytest.raises(ValueError, match="already"):
            ordered.put(3, None)
    assert [i for i, _ in got] == list(range(200))
    assert all(v == {"index": i, "payload": b"x" * i} for i, v in got)
    assert held_most <= 5
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone


def _wait_for_flag_then_square(flag: str, first_waits: bool, index: int) -> int:
    """Test task: task 0 finishes only once the flag exists (set by the last task) -- unless it is not told to wait."""
    if index == 0 and first_waits:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag):
            if time.monotonic() > deadline:
                raise TimeoutError("the last task never ran: the pool waited for the first")
            time.sleep(0.01)
    if index == int(Path(flag).suffix[1:]):
        Path(flag).touch()
    return index * index


def test_a_slow_task_holds_up_one_worker_not_the_pool(tmp_path):
    """Task 0 cannot finish before task 39 has: the other worker must run all of 1..39 meanwhile."""
    n = 40
    fn = functools.partial(_wait_for_flag_then_square, str(tmp_path / f"flag.{n - 1}"), True)
    spill = tmp_path / "spill"
    spill.mkdir()
    with TaskPool(fn, workers=2, timeout=120, buffer=4, spill_dir=spill) as pool:
        results = list(pool.map((i,) for i in range(n)))
    assert results == [(i, ("ok", i * i)) for i in range(n)]
    # 1..3 waited in memory (within 4 of the next one, 0), 4..38 on disk, and 39 too unless
    # task 0 (which polls for the flag task 39 writes) finished before 39's result came back
    assert pool.spilled in (n - 5, n - 4)
    assert list(spill.iterdir()) == []


def test_imap_unordered_yields_as_tasks_finish_and_a_timeout_costs_one_worker(tmp_path):
    fn = functools.partial(_wait_for_flag_then_square, str(tmp_path / "flag.1000"), True)  # task 0 waits for ever
    t0 = time.monotonic()
    with TaskPool(fn, workers=2, timeout=2) as pool:
        results = list(pool.imap_unordered((i,) for i in range(30)))
    assert [i for i, _ in results][-1] == 0  # the slow one last, the others meanwhile
    assert dict(results)[0][:2] == ("rejected", "timeout")
    assert sorted(results[:-1]) == [(i, ("ok", i * i)) for i in range(1, 30)]
    assert pool.restarts == 1
    assert time.monotonic() - t0 < 60
