"""Evaluate a checkpoint: the seven probing metrics of SPEC §6 for every chosen layer.

::

    python -m musicbert.evaluate --checkpoint runs/demo --shards shards/demo --out runs/demo/eval
        [--layers all|last|1,6,12] [--repeats 5] [--protocol standard|reference]
        [--random-init] [--seed 0] [--device auto|cpu|cuda] [--clusters 1000] [--max-songs N]
        [--train-bars 5] [--test-bars 10] [--precision auto|fp32|bf16] [--batch-tokens N]
        [--work-dir DIR] [--threads N]
        [--labels [NAME=]FILE.csv ...]
    python -m musicbert.evaluate --compare A/metrics.json B/metrics.json [--names A B]

``--checkpoint`` is a ``.pt`` file or a run folder (its newest valid checkpoint).
``--random-init`` evaluates an untrained model of the checkpoint's configuration,
initialised from ``--seed``: the baseline every trained result must beat.

For each repeat, 5 bars are drawn from every train-split song (probe training set) and 10
from every test-split song (probe test set); the bar embeddings of all chosen layers are
computed in one pass and written to a temporary file, and the probes of
:mod:`musicbert.probes` are fitted and scored one layer at a time (a progress bar on
stderr names each stage, sampling / features / probes, with its ETA). The metrics, their
directions and both scoring protocols (``standard``: AUC from decision scores, tempo by
argmax; ``reference``: the reference implementation's scoring, AUC on hard predictions
with the chord threshold -0.8, tempo as exact match of a multi-output ridge classifier)
are described in :mod:`musicbert.probes`.

Outputs in ``--out``:
``metrics.json``  ``{"layers": {"1": {"chords": {"mean", "std", "values"}, ...}, ...},
                  "better": {metric: "higher"|"lower"}, "settings": {...}}`` (std over repeats,
                  population std; undefined values are ``null``);
``metrics.md``    the same as a table;
``layers.png``    each metric against layer.

An interrupted evaluation resumes: run the same command again. Each layer's scores of each
repeat are recorded in ``OUT/.evaluate-journal.json`` as soon as they are known, and what is
recorded is not computed again (:mod:`musicbert.probes.journal`); the file is deleted once
``metrics.json`` is written.

``--labels [NAME=]FILE.csv`` (repeatable) adds one metric per file, probed on the same bars:
annotated labels per bar or per song (format and scoring in :mod:`musicbert.custom_labels`).
Its values sit beside the seven in ``metrics.json`` (and its direction in ``better``); what
matched the shards and what did not is under ``"labels": {NAME: {...}}``.

Cost: memory is bounded by one layer, not by the whole feature set. Per repeat the
features of all chosen layers, (train + test bars) x layers x dim x 4 bytes, go to a
temporary file in ``--work-dir`` (default: ``--out``; a file without a name, whose space
the system frees when the process ends, even by ``kill -9``; Lakh MIDI at BERT-base size,
550k bars x 12 layers x 768: 20 GB of disk). In RAM are one
repeat's sampled bars and labels (about 0.5 kB a bar) and, while a layer is probed, that
layer's training features (n_train x dim x 4 bytes; Lakh: 1.35 GB) with the probe's working
set; BENCHMARKS.md ("Evaluation memory") measures it and projects 1.5-2.1 GiB for Lakh.
Feature extraction runs under bf16 autocast on a GPU (``--precision auto``, the default;
fp32 on CPU) with batches sized to the free GPU memory (``--batch-tokens``). On Lakh at
BERT-base size, features take about 10 minutes on one GPU (an estimate) and the probes
about 1.5 CPU-core hours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from musicbert.api import ModelLoadError, load_model
from musicbert.custom_labels import LabelTable, load_label_tables
from musicbert.inference import CPU_BATCH_TOKENS, PRECISIONS, InferenceError, resolve_device, resolve_precision
from musicbert.probes import (
    DEFAULT_CLUSTERS,
    HIGHER_IS_BETTER,
    METRICS,
    PROTOCOLS,
    TEST_BARS_PER_SONG,
    TRAIN_BARS_PER_SONG,
    ProbeError,
    probe_model,
)
from musicbert.probes.journal import ScoreJournal
from musicbert.report import compare, markdown_report, markdown_table, plot_layers, read_metrics
from musicbert.shards import MANIFEST, ShardFormatError

JOURNAL = ".evaluate-journal.json"  # in --out while an evaluation is under way (see musicbert.probes.journal)


def _clean(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def summarise(values: list[float]) -> dict:
    """``{"mean", "std", "values"}`` over the repeats that are defined (population std)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": _clean(float(np.mean(finite))) if finite else None,
        "std": _clean(float(np.std(finite))) if finite else None,
        "values": [_clean(v) for v in values],
    }


def evaluate(
    checkpoint: str | Path,
    shards: str | Path,
    out: str | Path | None = None,
    layers: str = "all",
    repeats: int = 5,
    protocol: str = "standard",
    random_init: bool = False,
    seed: int = 0,
    device: str = "auto",
    clusters: int = DEFAULT_CLUSTERS,
    max_songs: int | None = None,
    precision: str = "auto",
    batch_tokens: int | None = None,
    progress: bool = False,
    train_bars_per_song: int = TRAIN_BARS_PER_SONG,
    test_bars_per_song: int = TEST_BARS_PER_SONG,
    work_dir: str | Path | None = None,
    labels: Sequence[str] = (),
    journal: str | Path | None = None,
) -> dict:
    """Run the evaluation and return the ``metrics.json`` dict; with ``out``, write the three files.

    The features go to a temporary file in ``work_dir`` (default: ``out``, else the
    system's temporary folder), deleted at the end. ``labels``: ``[NAME=]FILE.csv`` specs of
    annotated labels (:mod:`musicbert.custom_labels`). ``journal``: the file that records
    finished layers so that a rerun after an interruption resumes (default: ``OUT/``
    :data:`JOURNAL` with ``out``, none without); removed once the results are complete.
    """
    # Over 60 lines: 19 keyword arguments and the "settings" table of metrics.json, each
    # written out once in the file's key order; the work itself is the 20 lines below.
    if repeats < 1:
        raise ProbeError(f"repeats ({repeats}) must be >= 1")
    started = time.time()
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    tables = load_label_tables(labels, shards)
    model, info = load_model(checkpoint, random_init=random_init, seed=seed)
    work_root = work_dir if work_dir is not None else out
    if work_root is not None:
        Path(work_root).mkdir(parents=True, exist_ok=True)
    if journal is None and out is not None:
        journal = Path(out) / JOURNAL
    scores_journal = None if journal is None else open_journal(
        journal, info, shards, tables, dev, random_init=random_init, seed=seed, protocol=protocol, clusters=clusters,
        max_songs=max_songs, bars_per_song=[train_bars_per_song, test_bars_per_song], precision=precision)
    result = probe_model(
        model, shards, layers, repeats=repeats, protocol=protocol, clusters=clusters, seed=seed, device=dev,
        max_songs=max_songs, batch_tokens=batch_tokens, precision=precision, progress=progress,
        train_per_song=train_bars_per_song, test_per_song=test_bars_per_song, work_dir=work_root,
        labels=tables, journal=scores_journal,
    )
    import sklearn

    higher = {**HIGHER_IS_BETTER, **{t.name: t.higher_is_better for t in tables}}
    metrics = {
        "layers": {str(l): {m: summarise(v) for m, v in result.values[l].items()} for l in result.layers},
        "better": {m: "higher" if higher[m] else "lower" for m in higher},
        "settings": {
            "checkpoint": info["checkpoint"],
            "step": info["step"],
            "random_init": info["random_init"],
            "shards": str(shards),
            "protocol": protocol,
            "repeats": repeats,
            "seed": seed,
            "layers": result.layers,
            "train_split": "train",
            "test_split": "test",
            "train_songs": result.train_songs,
            "test_songs": result.test_songs,
            "train_bars": result.train_bars[0] if len(set(result.train_bars)) == 1 else result.train_bars,
            "test_bars": result.test_bars[0] if len(set(result.test_bars)) == 1 else result.test_bars,
            "train_bars_per_song": train_bars_per_song,
            "test_bars_per_song": test_bars_per_song,
            "max_songs": max_songs,
            "clusters": clusters,
            "clusters_used": result.clusters_used[0] if len(result.clusters_used) == 1 else result.clusters_used,
            "device": str(dev),
            "precision": precision,
            "model": info["config"]["model"],
            "sklearn": sklearn.__version__,
            "seconds": round(time.time() - started, 2),
            "notes": sorted(set(result.notes)),
        },
    }
    if tables:
        metrics["labels"] = {t.name: t.summary for t in tables}
    if out is not None:
        write_outputs(metrics, out)
    if scores_journal is not None:
        scores_journal.remove()
    return metrics


def open_journal(
    path: str | Path, info: dict, shards: str | Path, tables: Sequence[LabelTable], dev: torch.device, **settings
) -> ScoreJournal:
    """The journal at ``path``, keyed by all that decides the scores: the checkpoint and shard
    files, the device type, the label files, the metrics, scikit-learn's version and
    ``settings``. The repeats and layers are not in the key: more of either reuse what is recorded."""
    import sklearn

    key = {"checkpoint": checkpoint_identity(info), "shards": shards_identity(shards), "device": dev.type,
           "labels": [[t.name, file_sha256(t.file)] for t in tables], "metrics": list(METRICS),
           "sklearn": sklearn.__version__, **settings}
    return ScoreJournal(path, key)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(info: dict) -> dict:
    """The checkpoint file, its step and its size and modification time (cheap, unlike hashing a large file)."""
    st = os.stat(info["checkpoint"])
    return {"path": str(Path(info["checkpoint"]).resolve()), "step": info["step"], "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def shards_identity(shards: str | Path) -> dict:
    """The shard folder and its manifest's hash (preprocessing again writes another manifest)."""
    return {"path": str(Path(shards).resolve()), "manifest_sha256": file_sha256(Path(shards) / MANIFEST)}


def write_outputs(metrics: dict, out: str | Path) -> None:

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    (out / "metrics.md").write_text(markdown_report(metrics))
    plot_layers(metrics, out / "layers.png")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m musicbert.evaluate",
        description="Probe a checkpoint's bar embeddings layer by layer (SPEC §6), or compare two metrics.json.",
    )
    p.add_argument("--checkpoint", help="a .pt checkpoint or a run folder (its newest valid checkpoint)")
    p.add_argument("--shards", help="shard folder written by python -m preprocess (train and test splits are used)")
    p.add_argument("--out", help="output folder for metrics.json, metrics.md, layers.png")
    p.add_argument("--layers", default="all", help="'all' (default), 'last' or comma-separated layers like 1,6,12")
    p.add_argument("--repeats", type=int, default=5, help="sampling repeats (mean and std are reported; default 5)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard", help="scoring (see musicbert.probes; default standard)")
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained model of the checkpoint's configuration")
    p.add_argument("--seed", type=int, default=0, help="sampling, k-means and --random-init seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda[:N]")
    p.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help=f"k of the song-clustering k-means (default {DEFAULT_CLUSTERS})")
    p.add_argument("--max-songs", type=int, default=None, help="use at most this many songs of each split")
    p.add_argument("--train-bars", type=int, default=TRAIN_BARS_PER_SONG,
                   help=f"bars drawn per train-split song (default {TRAIN_BARS_PER_SONG}, as the reference)")
    p.add_argument("--test-bars", type=int, default=TEST_BARS_PER_SONG,
                   help=f"bars drawn per test-split song (default {TEST_BARS_PER_SONG}, as the reference)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="feature extraction: auto (default: bf16 autocast on a GPU with bf16, fp32 on CPU), fp32 or bf16")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help=f"tokens per forward pass (default: {CPU_BATCH_TOKENS} on CPU, as many as half the free GPU memory holds on CUDA)")
    p.add_argument("--work-dir", default=None,
                   help="folder for the temporary feature file (default: --out); it needs (bars x layers x dim x 4) bytes")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: PyTorch's choice)")
    p.add_argument("--labels", action="append", default=[], metavar="[NAME=]FILE.csv",
                   help="annotated labels (columns path,[bar,]label) to probe as one more metric, named NAME or "
                        "after the file; repeatable (see musicbert.custom_labels)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two metrics.json side by side and exit")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="with --compare: column names")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[evaluate] %(message)s")  # e.g. resuming from the journal
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.compare:
        print(compare(read_metrics(args.compare[0]), read_metrics(args.compare[1]), tuple(args.names) if args.names else None))
        return 0
    missing = [f"--{k}" for k in ("checkpoint", "shards", "out") if getattr(args, k) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)} (or use --compare A B)")

    try:
        metrics = evaluate(
            args.checkpoint, args.shards, args.out, layers=args.layers, repeats=args.repeats, protocol=args.protocol,
            random_init=args.random_init, seed=args.seed, device=args.device, clusters=args.clusters,
            max_songs=args.max_songs, precision=args.precision, batch_tokens=args.batch_tokens, progress=True,
            train_bars_per_song=args.train_bars, test_bars_per_song=args.test_bars, work_dir=args.work_dir,
            labels=args.labels,
        )
    except (InferenceError, ModelLoadError, ShardFormatError) as exc:  # ProbeError is an InferenceError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    s = metrics["settings"]
    print(markdown_table(metrics))
    print(
        f"\n{'random-init' if s['random_init'] else 'step ' + str(s['step'])}, protocol {s['protocol']}, "
        f"{s['repeats']} repeats, {s['train_songs']}/{s['test_songs']} train/test songs, "
        f"k = {s['clusters_used']}, {s['seconds']} s; wrote {Path(args.out) / 'metrics.json'}, metrics.md, layers.png"
    )
    for name, info in metrics.get("labels", {}).items():
        print(f"labels {name}: {info['kind']} ({info['metric']}), {info['matched']} of {info['labelled']} labelled "
              f"songs/bars matched; {info['unknown_paths']} unknown path(s), "
              f"{info['bars_before_song'] + info['bars_after_song']} bar(s) outside their song, {info['bars_not_kept']} not kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
