"""What an evaluation has finished, on disk, so that an interrupted one resumes.

Probing the Lakh MIDI Dataset at BERT-base size fits 12 layers x 5 repeats of probes,
about 1.5 CPU-core hours after about 10 GPU-minutes of features (BENCHMARKS.md): a
preempted or crashed evaluation should not start again from nothing. :class:`ScoreJournal` records each layer's scores of each repeat as
soon as they are known, in one JSON file rewritten atomically (temporary file, then
rename), under a *key*: every setting that decides the scores. A journal whose key differs
(another checkpoint step, other settings) is ignored and replaced.

What a rerun does with it (:func:`musicbert.probes.probe_model`): a repeat whose layers
are all recorded is neither sampled nor encoded again; a repeat with some layers recorded
is sampled again (the same bars: sampling depends on the seed and the repeat only) and
only its missing layers are encoded and scored. On the same device and precision the
result is the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from musicbert.probes.scoring import LayerScores

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class SampleSizes:
    """Songs and bars of one repeat's probe training and test samples."""

    train_songs: int
    test_songs: int
    train_bars: int
    test_bars: int


class ScoreJournal:
    """Finished ``(repeat, layer)`` scores and each repeat's sample sizes, kept in ``path``."""

    def __init__(self, path: str | Path, key: dict) -> None:
        self.path = Path(path)
        self.key = json.loads(json.dumps(key))  # as it reads back from the file
        self._sizes: dict[int, SampleSizes] = {}
        self._scores: dict[int, dict[int, LayerScores]] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("evaluation journal %s is unreadable (%s): starting from the first repeat", self.path, exc)
            return
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != self.key:
            log.info("evaluation journal %s was made with other settings: starting from the first repeat", self.path)
            return
        for r, entry in data["repeats"].items():
            self._sizes[int(r)] = SampleSizes(**entry["sizes"])
            self._scores[int(r)] = {int(layer): _scores_from_json(s) for layer, s in entry["layers"].items()}
        done = sum(len(layers) for layers in self._scores.values())
        log.info("evaluation journal %s: resuming with %d layer scores already done", self.path, done)

    def sizes(self, repeat: int) -> SampleSizes | None:
        return self._sizes.get(repeat)

    def scores(self, repeat: int) -> dict[int, LayerScores]:
        """``{layer: scores}`` recorded for ``repeat`` (empty when none)."""
        return dict(self._scores.get(repeat, {}))

    def record(self, repeat: int, sizes: SampleSizes, layer: int, scores: LayerScores) -> None:
        """Add one layer's scores of ``repeat`` and rewrite the file."""
        if self._sizes.setdefault(repeat, sizes) != sizes:
            raise ValueError(f"repeat {repeat} was recorded with sample sizes {self._sizes[repeat]}, now {sizes}")
        self._scores.setdefault(repeat, {})[layer] = scores
        self._write()

    def remove(self) -> None:
        """Delete the journal, and the temporary files of writes that a kill cut short."""
        self.path.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(f"{self._temporary_prefix}*"):
            leftover.unlink(missing_ok=True)

    @property
    def _temporary_prefix(self) -> str:
        return f".{self.path.name}."

    def _write(self) -> None:
        data = {
            "format": FORMAT,
            "key": self.key,
            "repeats": {
                str(r): {
                    "sizes": vars(self._sizes[r]),
                    "layers": {str(layer): _scores_to_json(s) for layer, s in sorted(layers.items())},
                }
                for r, layers in sorted(self._scores.items())
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self._temporary_prefix, dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, allow_nan=False)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _scores_to_json(s: LayerScores) -> dict:
    values = {m: (v if math.isfinite(v) else None) for m, v in s.values.items()}  # NaN: undefined
    return {"values": values, "notes": s.notes, "clusters": s.clusters}


def _scores_from_json(d: dict) -> LayerScores:
    values = {m: (float("nan") if v is None else float(v)) for m, v in d["values"].items()}
    return LayerScores(values=values, notes=list(d["notes"]), clusters=int(d["clusters"]))
