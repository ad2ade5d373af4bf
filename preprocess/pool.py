"""A small process pool that survives its workers: per-task deadline, crash recovery, ordered results.

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

:meth:`TaskPool.map` yields ``(index, result)`` in task order whatever order the workers
finish in; at most ``window`` tasks are dispatched beyond the oldest unfinished one, so
the results waiting to be yielded take bounded memory.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

from preprocess.errors import MidiRejected

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
    """``workers`` processes running ``fn(*args)``; see the module docstring."""

    def __init__(self, fn: Callable[..., Any], workers: int, timeout: float | None = None,
                 memory_mb: int | None = None, window: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.fn = fn
        self.n = workers
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.window = window if window is not None else max(64, 16 * workers)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.ctx = mp.get_context(method)
        self.workers: list[_Worker] = []
        self.restarts = 0

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

    # -- the loop -------------------------------------------------------------------
    def map(self, tasks: Iterable[tuple]) -> Iterator[tuple[int, Result]]:
        """Yield ``(index, result)`` for every task (an args tuple for ``fn``), in task order."""
        todo = iter(enumerate(tasks))
        exhausted = False
        done: dict[int, Result] = {}
        next_out = 0
        n_sent = 0
        idle: deque[_Worker] = deque()
        if not self.workers:
            self.workers = [self._start_worker() for _ in range(self.n)]
        idle.extend(self.workers)

        def replace(w: _Worker) -> None:
            self._stop_worker(w, kill=True)
            self.workers.remove(w)
            nw = self._start_worker()
            self.workers.append(nw)
            idle.append(nw)
            self.restarts += 1

        try:
            while True:
                # dispatch
                while idle and not exhausted and n_sent < next_out + self.window:
                    try:
                        index, args = next(todo)
                    except StopIteration:
                        exhausted = True
                        break
                    w = idle.popleft()
                    w.task = (index, args)
                    w.deadline = time.monotonic() + self.timeout if self.timeout else float("inf")
                    try:
                        w.conn.send((index, args))
                    except OSError:
                        pass  # a dead worker: found below through its sentinel
                    n_sent += 1
                busy = [w for w in self.workers if w.task is not None]
                while next_out in done:
                    yield next_out, done.pop(next_out)
                    next_out += 1
                if not busy:
                    if exhausted:
                        return
                    continue
                now = time.monotonic()
                wait_s = max(0.0, min(w.deadline for w in busy) - now)
                handles = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
                ready = set(wait(handles, timeout=min(wait_s, 3600.0)))
                now = time.monotonic()
                for w in busy:
                    index, _ = w.task
                    if w.conn in ready or w.proc.sentinel in ready:
                        try:
                            got = w.conn.recv() if w.conn.poll() else None
                        except (EOFError, OSError):
                            got = None
                        if got is not None:
                            done[got[0]] = got[1]
                            w.task = None
                            idle.append(w)
                            continue
                        if not w.proc.is_alive() or w.proc.sentinel in ready:
                            w.proc.join(timeout=5)
                            code = w.proc.exitcode
                            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                            done[index] = ("rejected", "worker_crashed", f"the worker process died ({how})")
                            w.task = None
                            replace(w)
                            continue
                    if now >= w.deadline:
                        done[index] = ("rejected", "timeout", f"took longer than the {self.timeout:g} s limit; worker killed")
                        w.task = None
                        replace(w)
        finally:
            # leave no worker running a task we no longer wait for (e.g. the consumer stopped)
            for w in list(self.workers):
                if w.task is not None:
                    w.task = None
                    self._stop_worker(w, kill=True)
                    self.workers.remove(w)


def run_in_process(fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[tuple[int, Result]]:
    """The same results without worker processes (``--workers 0``: debugging, profiling)."""
    for index, args in enumerate(tasks):
        yield index, run_task(fn, args)


__all__ = ["TaskPool", "run_in_process", "run_task"]
