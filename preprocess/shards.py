"""Writing a preprocessor output folder: shards, ``manifest.json``, ``errors.jsonl``.

* The split of a song is a pure function of its id and the seed (:func:`assign_split`),
  so it does not depend on file order or worker count.
* Within a split, samples are written in the order of the sorted relative paths, shards
  of ``shard_size`` songs named ``<split>-NNNNNN.tar``; each is written under a temporary
  name and renamed when complete. Tar members have fixed mtime/owner/mode, so two runs
  with the same inputs and options give byte-identical shards.
* The whole folder is built in a hidden sibling ``.<name>.tmp-<pid>-<random>`` and only
  swapped in at the end (:class:`OutputDir`): ``OUT`` is never half old, half new. A
  non-empty ``OUT`` is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from musicbert.shards import ERRORS, MANIFEST, SPLITS, Manifest, SplitInfo
from musicbert.vocab import VOCAB


class OutputExists(Exception):
    """``--out`` is not empty and ``--overwrite`` was not given."""


def assign_split(song_id: str, seed: int, fractions: tuple[float, ...]) -> str:
    """The split of a song: a uniform number from SHA-256(seed, id) against the cumulative fractions."""
    h = hashlib.sha256(f"{seed}:{song_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    acc = 0.0
    for name, frac in zip(SPLITS, fractions):
        acc += frac
        if u < acc:
            return name
    return SPLITS[len(fractions) - 1]  # rounding: u just below 1.0


def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> fractions of train/val/test (non-negative, summing to 1)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--split must be three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"--split must be three non-negative fractions summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


def looks_like_output(folder: Path) -> bool:
    """True if ``folder`` holds a manifest, or only files this module writes (shards, errors.jsonl)."""
    if (folder / MANIFEST).is_file():
        return True
    names = [p.name for p in folder.iterdir()]
    return all(p.endswith((".tar", ".tar.part", ".part")) or p in (ERRORS, MANIFEST) for p in names)


class OutputDir:
    """A temporary sibling of ``out`` that replaces ``out`` on :meth:`commit`."""

    def __init__(self, out: str | Path, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise OutputExists(f"{self.out} exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()):
            if not overwrite:
                raise OutputExists(
                    f"{self.out} is not empty; pass --overwrite to replace it (it is swapped only "
                    f"when the new output is complete) or choose another --out"
                )
            if not looks_like_output(self.out):
                raise OutputExists(
                    f"{self.out} does not look like a preprocessor output folder (no {MANIFEST}, and files "
                    f"other than shards); --overwrite would delete it, so remove it yourself if you mean it"
                )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()

    def commit(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Members ``<key>.<name>`` in name order, with fixed metadata (reproducible bytes).

    The same layout as ``webdataset.TarWriter(mtime=0)`` writes, without importing
    webdataset (which imports torch: seconds and hundreds of MB in every worker).
    """
    key = sample["__key__"]
    for name in sorted(k for k in sample if not k.startswith("_")):
        data = sample[name]
        if isinstance(data, str):
            data = data.encode("utf-8")
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uname = info.gname = "musicbert"
        tar.addfile(info, io.BytesIO(data))


@dataclass
class SplitWriter:
    """Shards of one split: ``<split>-NNNNNN.tar`` with ``shard_size`` songs each."""

    root: Path
    split: str
    shard_size: int
    songs: int = 0
    bars: int = 0
    tokens: int = 0
    shards: list[str] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _in_shard: int = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self._tar = tarfile.open(self.root / (name + ".part"), "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self.shards[-1]
        os.replace(self.root / (name + ".part"), self.root / name)
        self._tar = None

    def write(self, sample: dict, n_bars: int, n_tokens: int) -> None:
        """Add one WebDataset sample (``__key__`` + member name -> bytes) to the current shard."""
        if self._tar is None:
            self._open()
        write_sample(self._tar, sample)
        self._in_shard += 1
        self.songs += 1
        self.bars += n_bars
        self.tokens += n_tokens
        if self._in_shard >= self.shard_size:
            self._close()

    def close(self) -> SplitInfo:
        self._close()
        return SplitInfo(self.songs, self.bars, self.tokens, tuple(self.shards))


def write_manifest(root: Path, splits: dict[str, SplitInfo], options: dict, extra: dict) -> dict:
    """``manifest.json`` via :class:`musicbert.shards.Manifest`, plus run totals under extra keys."""
    data = Manifest(root, splits, len(VOCAB), VOCAB.sha256, options).to_json()
    data.update(extra)
    tmp = root / (MANIFEST + ".part")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)
    return data


class ErrorLog:
    """``errors.jsonl``: one JSON line per file that was not used."""

    def __init__(self, root: Path) -> None:
        self.path = root / ERRORS
        self._fh = open(self.path, "w", encoding="utf-8")
        self.count = 0
        self.by_reason: dict[str, int] = {}

    def write(self, path: str, reason: str, message: str) -> None:
        self._fh.write(json.dumps({"path": path, "reason": reason, "message": message}, ensure_ascii=False) + "\n")
        self.count += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def close(self) -> None:
        self._fh.close()
