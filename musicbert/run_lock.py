"""One run per run folder: an exclusive lock on ``RUN_DIR/.lock``, held for the life of the run.

:func:`acquire` takes a POSIX record lock (``fcntl.lockf``) on ``RUN_DIR/.lock`` without
waiting and writes who holds it into the file (host, pid, SLURM job id, start time), so that
a second run started on the same folder is refused with a message naming the holder
(:class:`RunDirBusy`).

Why a kernel lock and not a "lock file exists" test: the kernel drops the lock when the
holding process ends, however it ends (normal exit, exception, SIGTERM, ``kill -9``, OOM
killer). Nothing is left to clean up after a crash, so a requeued SLURM job can always take
the lock of its predecessor; the holder information left in the file is only a description.
A POSIX lock (unlike ``flock``) belongs to the process alone: DataLoader workers forked
after it is taken do not hold it, so it is free as soon as the trainer itself is gone.
(A POSIX lock is also released if the process closes *any* descriptor of the file, which is
why this module is the only code that opens it.)

Shared file systems: on NFS (v3 with lockd, v4) POSIX locks are enforced across clients;
after a node crash the server frees the lock when the client's lease expires (about 90 s on
NFSv4). Lustre enforces them across nodes only when mounted with ``-o flock``; with
``-o localflock`` they protect a folder only against runs on the same node, and with neither
option locking fails: the run then continues with a warning that the folder is not
protected. The lock guards the run folder against a second *run*; it does not stop someone
from deleting the folder.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run folder's lock; the message names it."""


class RunLock:
    """A held lock; :meth:`release` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the POSIX lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_record() -> dict:
    """What the lock file says about this process."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_holder(text: str) -> str:
    """One phrase naming the holder from the lock file's text (best effort: it may be mid-write)."""
    try:
        h = json.loads(text)
        job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        return f"pid {h['pid']} on {h['host']}{job}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process (no holder information recorded yet)"


def acquire(run_dir: str | Path) -> RunLock:
    """Lock ``run_dir`` for this process or raise :class:`RunDirBusy` naming the holder.

    Creates ``run_dir`` if needed. On a file system without lock support the run goes on
    unprotected, with a warning (see the module docstring).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            holder = describe_holder(path.read_text(errors="replace"))
            raise RunDirBusy(
                f"{run_dir} is in use by another run ({holder}); wait for it to end, stop it, or use another run_dir"
            ) from None
        log.warning("%s: cannot lock (%s); this file system has no locks, so a second run on this folder would not be refused", path, exc.strerror)
        return RunLock(path, None)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
    except OSError as exc:  # e.g. a full disk: say which file
        os.close(fd)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    return RunLock(path, fd)
