"""Set-up of the data pipeline's DataLoader worker processes."""

from __future__ import annotations

import os
import signal
import threading

import torch


def worker_init(trainer_pid: int, _: int) -> None:
    """In each DataLoader worker: one thread, and SIGTERM/SIGINT only from the trainer.

    Workers share the trainer's process group, so a SIGTERM that torchrun or SLURM sends to
    the group (or to every process of the job) reaches them too; dying then would make the
    trainer fail (DataLoader raises on a dead worker) while it saves its checkpoint. So a
    worker ignores SIGINT, and SIGTERM unless the trainer itself sends it (DataLoader's and
    multiprocessing's shutdown do). A worker also exits by itself when the trainer is gone.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    # SIGTERM is blocked in every thread of this process (threads started later inherit
    # the mask) and taken by one thread that knows who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid in (trainer_pid, os.getppid()):
                os._exit(0)  # a clean exit: DataLoader reports a worker killed by a signal as an error

    threading.Thread(target=wait, name="sigterm-from-trainer", daemon=True).start()
