"""A small process pool that survives its workers: per-task deadline, crash recovery, no idle workers.

``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one worker dies
(``BrokenProcessPool``) and cannot stop a task that runs too long. Here every worker is a
``multiprocessing.Process`` with its own pipe and runs one task at a time:

* a task that runs past ``timeout`` seconds -> the worker is killed (SIGKILL) and
  replaced, the task's result is ``("rejected", "timeout", ...)``;
* a worker that dies (segfault, OOM kill, ``os._exit``) -> replaced, the task's result
  is ``("rejected", "worker_crashed", ...)`` with the exit code or signal;
* a task function that raises :class:`MidiRejected` -> ``("rejected", reason, message)``;
  ``MemoryError`` -> ``out_of_memory``; any other exception -> ``error`` with the
  exception and where it was raised (the run goes on);
* each worker may get an address-space limit (``memory_mb``) so that a huge file raises
  ``MemoryError`` in that worker instead of exhausting the machine.

A worker gets the next task as soon as it is free, whatever the others are doing: a slow
file (up to its time limit) holds up one worker, never the pool.
:meth:`TaskPool.imap_unordered` yields ``(index, result)`` as tasks finish;
:meth:`TaskPool.map` yields them in task order through :class:`~preprocess.reorder.InOrder`,
which keeps at most ``buffer`` results in memory and parks those further ahead in files
under ``spill_dir`` until their turn, in :mod:`preprocess.spill`'s format: what a task
returns must be made of what that format stores (:meth:`TaskPool.map` raises
``TypeError`` on the first result that is not). Tasks are read from the iterable only as
workers become free.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from contextlib import closing
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from musicbert.tokenizer.errors import MidiRejected
from preprocess import spill
from preprocess.reorder import InOrder

Result = tuple  # ("ok", payload) | ("rejected", reason, message)


def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    try:
        import resource

        with open("/proc/self/statm") as fh:  # current virtual size: libraries, heap, thread stacks
            base = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = base + memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError, ImportError):
        pass  # not Linux: no limit (the size and note limits still apply)


def _describe(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def run_task(fn: Callable[..., Any], args: tuple) -> Result:
    """Run one task and turn its outcome into a result tuple (used in workers and in-process)."""
    try:
        return ("ok", fn(*args))
    except MidiRejected as exc:
        return ("rejected", exc.reason, exc.message)
    except MemoryError:
        return ("rejected", "out_of_memory", "MemoryError: the worker's memory limit was reached")
    except RecursionError as exc:
        return ("rejected", "error", _describe(exc))
    except Exception as exc:  # noqa: BLE001 - one file's bug must not stop the corpus
        return ("rejected", "error", _describe(exc))


def _worker_main(conn, fn: Callable[..., Any], memory_mb: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's clean-up handler
    _limit_memory(memory_mb)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, args = msg
        result = run_task(fn, args)
        try:
            conn.send((index, result))
        except MemoryError:
            conn.send((index, ("rejected", "out_of_memory", "result too large to send")))
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable payload
            conn.send((index, ("rejected", "error", f"cannot send result: {_describe(exc)}")))


@dataclass
class _Worker:
    proc: Any
    conn: Any
    task: tuple | None = None  # (index, args)
    deadline: float = 0.0


class TaskPool:
    """``workers`` processes running ``fn(*args)``; see the module docstring.

    ``buffer`` (default ``4 * workers``) bounds the results :meth:`map` holds in memory
    while it waits for an earlier one; ``spill_dir`` is where it parks the others (default:
    the system's temporary folder).
    """

    def __init__(self, fn: Callable[..., Any], workers: int, timeout: float | None = None,
                 memory_mb: int | None = None, buffer: int | None = None,
                 spill_dir: str | Path | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.fn = fn
        self.n = workers
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.buffer = buffer if buffer is not None else 4 * workers
        self.spill_dir = spill_dir
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.ctx = mp.get_context(method)
        self.workers: list[_Worker] = []
        self.restarts = 0
        self.spilled = 0  # results map() parked in a file while an earlier one was running

    # -- workers --------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child, self.fn, self.memory_mb), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop_worker(self, w: _Worker, kill: bool) -> None:
        if kill and w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)
        try:
            w.conn.close()
        except OSError:
            pass

    def _replace(self, w: _Worker) -> _Worker:
        self._stop_worker(w, kill=True)
        self.workers.remove(w)
        new = self._start_worker()
        self.workers.append(new)
        self.restarts += 1
        return new

    def _send(self, w: _Worker, index: int, args: tuple) -> None:
        w.task = (index, args)
        w.deadline = time.monotonic() + self.timeout if self.timeout else float("inf")
        try:
            w.conn.send((index, args))
        except OSError:
            pass  # a dead worker: found by _finished through its sentinel

    def _finished(self, busy: list[_Worker]) -> list[tuple[_Worker, int, Result]]:
        """Wait until at least one busy worker is done (result, crash or deadline): ``(worker, index, result)``.

        The worker returned is free for the next task: the same one, or its replacement.
        """
        wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=min(wait_s, 3600.0)))
        now = time.monotonic()
        done = []
        for w in busy:
            index, _ = w.task
            if w.conn in ready or w.proc.sentinel in ready:
                try:
                    got = w.conn.recv() if w.conn.poll() else None
                except (EOFError, OSError):
                    got = None
                if got is not None:
                    w.task = None
                    done.append((w, got[0], got[1]))
                    continue
                if not w.proc.is_alive() or w.proc.sentinel in ready:
                    w.proc.join(timeout=5)
                    code = w.proc.exitcode
                    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                    w.task = None
                    done.append((self._replace(w), index, ("rejected", "worker_crashed", f"the worker process died ({how})")))
                    continue
            if now >= w.deadline:
                w.task = None
                done.append((self._replace(w), index, ("rejected", "timeout", f"took longer than the {self.timeout:g} s limit; worker killed")))
        return done

    def close(self) -> None:
        for w in self.workers:
            try:
                if w.task is None and w.proc.is_alive():
                    w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2
        for w in self.workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._stop_worker(w, kill=True)
        self.workers = []

    def __enter__(self) -> "TaskPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loops ------------------------------------------------------------------
    def imap_unordered(self, tasks: Iterable[tuple]) -> Iterator[tuple[int, Result]]:
        """Yield ``(index, result)`` for every task (an args tuple for ``fn``) as it finishes."""
        todo = enumerate(tasks)

        def give_work(free: list[_Worker]) -> None:
            for w in free:
                nxt = next(todo, None)
                if nxt is None:
                    return
                self._send(w, *nxt)

        if not self.workers:
            self.workers = [self._start_worker() for _ in range(self.n)]
        try:
            give_work(self.workers)
            while True:
                busy = [w for w in self.workers if w.task is not None]
                if not busy:
                    return
                done = self._finished(busy)
                give_work([w for w, _, _ in done])  # before the consumer takes its time with the results
                for _, index, result in done:
                    yield index, result
        finally:
            # leave no worker running a task we no longer wait for (e.g. the consumer stopped)
            for w in list(self.workers):
                if w.task is not None:
                    w.task = None
                    self._stop_worker(w, kill=True)
                    self.workers.remove(w)

    def map(self, tasks: Iterable[tuple]) -> Iterator[tuple[int, Result]]:
        """Yield ``(index, result)`` for every task, in task order (see :class:`~preprocess.reorder.InOrder`)."""
        finished = self.imap_unordered(tasks)
        with closing(finished), InOrder(self.buffer, spill, self.spill_dir) as ordered:
            try:
                for index, result in finished:
                    ordered.put(index, result)
                    yield from ordered.ready()
            finally:
                self.spilled += ordered.spilled


def run_in_process(fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[tuple[int, Result]]:
    """The same results without worker processes (``--workers 0``: debugging, profiling)."""
    for index, args in enumerate(tasks):
        yield index, run_task(fn, args)


__all__ = ["TaskPool", "run_in_process", "run_task"]
