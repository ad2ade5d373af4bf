"""Training checkpoints: atomic writes, a checksum beside each file, newest-valid-first resume.

Layout (``RUN_DIR/checkpoints/``)::

    step_00002000.pt          torch.save of the dict below (loadable with weights_only=True)
    step_00002000.pt.sha256   "<hex digest>  step_00002000.pt" (``sha256sum -c`` reads it)

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
renamed over its final name with :func:`os.replace` (atomic on POSIX), and the folder is
fsynced; the ``.sha256`` file is written the same way right after. A crash therefore leaves
either the old set of checkpoints or the old set plus a complete new one, never a
half-written file under a final name. Only the newest ``keep`` checkpoints are kept.
Files get the permissions the umask allows (``0666 & ~umask``, as ``open`` would give), so the
rest of a project group can read a run's checkpoints. A failed write (disk full, quota,
permission) raises :class:`OSError` naming the checkpoint file, whatever layer it came from
(``torch.save`` reports a failed write of its own as ``RuntimeError: ... unexpected pos``),
and leaves the earlier checkpoints as they were.

Reading (:func:`find_latest`): checkpoints are tried newest first; one that is truncated,
corrupt (checksum mismatch, not a zip, missing keys) or from another format is reported with
a logged warning naming the file and the reason, and the previous one is tried. A file
without its ``.sha256`` (a crash between the two renames, or a copy) is accepted if it loads
and has the expected keys. When checkpoints exist but none can be read,
:class:`UnreadableCheckpoints` lists them all (and nothing is moved aside): that is a damaged
run, not a new one.

Saving and restoring a run (:class:`Checkpointer`): the trainer names its stateful objects
(anything with ``state_dict()`` / ``load_state_dict()``) once, and the checkpointer writes
each one's state under its name and hands it back on resume, as torchtitan's checkpointer
does. Objects shared by all ranks (model, optimiser, schedule, scaler, counters) are saved
from rank 0; per-rank objects (the data stream's position, the RNG states: :class:`RNGState`)
are gathered from every rank and saved as a list in rank order.

Checkpoint dict (``FORMAT_VERSION`` 2); only tensors, numbers, strings, None and
lists/tuples/dicts of those, so ``torch.load(weights_only=True)`` reads it:

============== ==================================================================
key            value
============== ==================================================================
format         ``"musicbert-checkpoint"``
format_version 2 (version 1, before the checkpointer, kept the schedule as the update count
               of a hand-written class and the counters under ``extra``; it is not read)
step           optimizer steps taken (training resumes at step + 1)
config         ``Config.to_dict()`` of the run
vocab_sha256   hash of the vocabulary the model was trained with
world_size     number of ranks that wrote it
*name*         ``state_dict()`` of each shared object the trainer named: ``model`` (the
               unwrapped model, no ``module.`` prefix), ``optimizer`` (AdamW), ``schedule``
               (``LambdaLR``), ``scaler`` (GradScaler; ``{}`` when disabled), ``meter``
               (skipped steps, tokens seen, wall time)
*name*         list, one per rank, for each per-rank object: ``data`` (the rank's
               ``TrainStream.state_dict()``), ``rng`` (see :func:`rng_state`)
============== ==================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from musicbert.vocab import VOCAB

log = logging.getLogger(__name__)

FORMAT_NAME = "musicbert-checkpoint"
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "format_version", "step", "model", "config", "vocab_sha256")
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6


class CheckpointError(RuntimeError):
    """A checkpoint file is unusable; the message names the file and the reason."""


class UnreadableCheckpoints(CheckpointError):
    """A run folder has checkpoints and none of them can be read; ``failures`` says why for each."""

    def __init__(self, run_dir: Path, failures: list[tuple[Path, CheckpointError]]):
        self.failures = failures
        listing = "".join(f"\n  {exc}" for _, exc in failures)
        super().__init__(f"{run_dir}: none of its {len(failures)} checkpoints can be read:{listing}")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``RUN_DIR/checkpoints``, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


# ----------------------------------------------------------------------------- writing


class _HashingWriter:
    """File wrapper that hashes what torch.save writes through it.

    It also keeps the first :class:`OSError` of a write: torch.save turns it into a
    ``RuntimeError`` about an unexpected position, which names neither the file nor the cause.
    """

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread starts
    # creating files (a thread creating a file in between would get umask 0).
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _atomic_write(path: Path, write) -> Any:
    """Write ``path`` via a temporary file + fsync + os.replace; ``write(f)`` fills the file.

    An :class:`OSError` on the way (``ENOSPC``, ``EDQUOT``, ``EACCES``, ...) is raised again
    with ``filename`` set to ``path``; the temporary file is removed and ``path`` is untouched.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(Path(tmp))
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        _remove(Path(tmp))
        raise
    _fsync_dir(path.parent)
    return result


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then keep only the newest ``keep``.

    ``state`` must hold the keys of the module docstring (``format`` and ``step`` are set here).
    Call on one rank only.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(run_dir, step)
    state = {**state, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": int(step)}

    def write_pt(f):
        w = _HashingWriter(f)
        try:
            torch.save(state, w)
        except RuntimeError as exc:
            if w.error is not None:
                raise w.error from exc
            raise
        return w.sha.hexdigest()

    digest = _atomic_write(path, write_pt)
    _atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and their checksums), and stale temp files."""
    found = list_checkpoints(run_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        _remove(path)
        _remove(path.with_name(path.name + ".sha256"))
    for tmp in checkpoint_dir(run_dir).glob(".step_*.tmp"):
        _remove(tmp)


# ----------------------------------------------------------------------------- reading


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check one checkpoint file (weights_only=True); raise :class:`CheckpointError` naming why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().split()[:1]
        actual = _file_sha256(path)
        if expected != [actual]:
            raise CheckpointError(
                f"{path}: checksum mismatch (file is truncated or corrupt; {sidecar.name} says "
                f"{(expected or ['nothing'])[0][:16]}..., file hashes to {actual[:16]}..., size {path.stat().st_size} bytes)"
            )
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        raise CheckpointError(
            f"{path}: not a checkpoint (a checkpoint is a zip archive written by torch.save; this file starts with {head!r})"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'empty or truncated'})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a musicbert checkpoint (missing keys {missing})")
    if state["format"] != FORMAT_NAME or state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {state['format']!r} version {state['format_version']!r}; "
            f"this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{path}: file name says step {int(m.group(1))} but it holds step {state['step']}")
    return state


def check_vocabulary(state: dict, path: str | Path) -> None:
    """Refuse a checkpoint written with another vocabulary: its token ids mean other tokens."""
    sha = state.get("vocab_sha256")
    if sha is not None and sha != VOCAB.sha256:
        raise CheckpointError(f"{path}: trained with another vocabulary (hash differs from this code's)")


def find_latest(
    run_dir: str | Path, map_location: str | torch.device = "cpu", quarantine_bad: bool = False
) -> tuple[Path, dict] | None:
    """Newest valid checkpoint of a run as ``(path, state)``, or None when the run has none.

    Unusable newer files are skipped with a warning naming the file and the reason; with
    ``quarantine_bad`` (the trainer, on resume) they are also renamed to ``*.corrupt`` so that
    they are never tried again and cannot outrank the checkpoints the resumed run writes.
    Raises :class:`UnreadableCheckpoints` when there are checkpoints but none can be read
    (nothing is renamed then).
    """
    failures: list[tuple[Path, CheckpointError]] = []
    for _step, path in reversed(list_checkpoints(run_dir)):
        try:
            found = path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            failures.append((path, exc))
            continue
        for bad, exc in failures:
            if quarantine_bad:
                log.warning("skipping checkpoint %s; moved aside to %s", exc, quarantine(bad).name)
            else:
                log.warning("skipping checkpoint %s", exc)
        return found
    if failures:
        raise UnreadableCheckpoints(Path(run_dir), failures)
    return None


def resolve(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict]:
    """Load a checkpoint given a file or a run folder (its newest valid checkpoint).

    For tools (evaluation, embedding) that accept either.
    """
    path = Path(path)
    if path.is_dir():
        run_dir = path.parent if path.name == CHECKPOINT_DIR else path
        found = find_latest(run_dir, map_location)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint found (looked in {checkpoint_dir(run_dir)})")
        return found
    return path, load_checkpoint(path, map_location)


def quarantine(path: Path) -> Path:
    """Rename an unusable checkpoint to ``*.corrupt`` (kept for inspection, ignored from now on)."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.exists():
        os.replace(sidecar, target.with_name(target.name + ".sha256"))
    return target


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, NumPy global, Python) as weights_only-safe values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


@contextlib.contextmanager
def preserved_rng():
    """Run a block (validation, probes) without moving any RNG the training steps use."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState:
    """This process's RNG states as a stateful object (see :func:`rng_state`)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


# ----------------------------------------------------------------------------- named stateful objects


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """Saves and restores a run's named stateful objects (see the module docstring).

    ``shared`` objects are the same on every rank and saved once; ``per_rank`` objects are
    gathered from every rank. On restore, objects are loaded in the order given, shared ones
    first: put the RNG last, after everything that draws random numbers when it is set up.
    ``meta`` (e.g. the config) is saved as it is.
    """

    def __init__(self, run_dir: str | Path, keep: int, shared: dict[str, Stateful], per_rank: dict[str, Stateful], meta: dict):
        clash = set(shared) & set(per_rank) | (set(shared) | set(per_rank)) & (set(meta) | {"step", "world_size", "format", "format_version"})
        if clash:
            raise ValueError(f"checkpoint names used twice: {sorted(clash)}")
        self.run_dir, self.keep = Path(run_dir), keep
        self.shared, self.per_rank, self.meta = shared, per_rank, meta

    def rank_state(self) -> dict:
        """This rank's share (every rank; gather them to the writer)."""
        return {name: obj.state_dict() for name, obj in self.per_rank.items()}

    def save(self, step: int, rank_states: list[dict]) -> Path:
        """Write the checkpoint of ``step`` (one rank), given every rank's :meth:`rank_state` in rank order."""
        state = {**self.meta, "world_size": len(rank_states)}
        state |= {name: obj.state_dict() for name, obj in self.shared.items()}
        state |= {name: [r[name] for r in rank_states] for name in self.per_rank}
        return save_checkpoint(self.run_dir, step, state, keep=self.keep)

    def load(self, state: dict, rank: int) -> None:
        """Restore every named object from a checkpoint dict (this rank's share of the per-rank ones).

        An empty saved state is not loaded: a disabled GradScaler saves ``{}``, and an
        enabled one cannot load that (a run resumed with another precision starts its scale afresh).
        """
        for name, obj in self.shared.items():
            if state[name]:
                obj.load_state_dict(state[name])
        for name, obj in self.per_rank.items():
            obj.load_state_dict(state[name][rank])
