"""Per-bar embeddings of MIDI files, from the command line.

::

    python -m musicbert.embed --checkpoint runs/demo [--layer N|all|1,6,12] --out emb.npz song.mid more/*.mid DIR

A folder argument stands for the ``.mid`` / ``.midi`` files under it. Files that cannot be
used (not 4/4, unreadable, no bar long enough, ...) are reported on stderr with the reason
and skipped. Exit status 0: at least one file embedded; 1: no file could be embedded (an
error says so and no ``.npz`` is written); 2: the checkpoint or ``--layer`` is unusable.
The Python API is :mod:`musicbert.api`.

``FILE.npz`` (read with ``np.load(path)``; nothing is pickled), all embedded bars of all files
in one table, files in the order given:

================ ======================== ==========================================
key              shape                    meaning
================ ======================== ==========================================
embeddings       [n_layers, n, dim]       float32 bar embeddings, always 3-D (``--layer 12``
                                          gives ``n_layers`` 1): layer ``layers[i]`` is ``embeddings[i]``
layers           [n_layers]               1-based layer numbers
file_index       [n]                      which entry of ``files`` the bar comes from
bar_index        [n]                      index of the bar among its song's bars
files            [n_files]                paths of the embedded files
rejected_files   [n_rejected]             paths of the files that could not be used
rejected_reasons [n_rejected]             reason codes (``not_4_4``, ``not_midi``, ...; see
                                          ``musicbert/tokenizer/errors.py``)
rejected_messages [n_rejected]            the explanation, one line each
================ ======================== ==========================================
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

MIDI_SUFFIXES = (".mid", ".midi")


def expand_paths(args: list[str]) -> list[str]:
    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MIDI_SUFFIXES)
        else:
            out.append(a)
    return out


def _layer_arg(text: str):
    if text in ("all", "last"):
        return text
    if "," in text:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer {text!r}: expected a layer number, 'all' or a list like 1,6,12") from None


def save_npz(path: str | Path, results, rejected, layers: list[int]) -> None:
    """Write the table of the module docstring; ``results`` must not be empty."""
    # the API gives [n_bars, dim] for one layer and [n_layers, n_bars, dim] for several
    emb = np.concatenate([r.embeddings.reshape(len(layers), r.n_bars, -1) for r in results], axis=1)
    np.savez(
        path,
        embeddings=emb.astype(np.float32),
        layers=np.asarray(layers, dtype=np.int64),
        file_index=np.concatenate([np.full(r.n_bars, i, dtype=np.int64) for i, r in enumerate(results)]),
        bar_index=np.concatenate([r.bar_index for r in results]),
        files=np.asarray([r.path for r in results], dtype=str),
        rejected_files=np.asarray([r.path for r in rejected], dtype=str),
        rejected_reasons=np.asarray([r.reason for r in rejected], dtype=str),
        rejected_messages=np.asarray([r.message.replace("\n", " ") for r in rejected], dtype=str),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musicbert.embed", description="Per-bar embeddings of MIDI files.")
    p.add_argument("--checkpoint", required=True, help="a .pt checkpoint or a run folder (its newest valid checkpoint)")
    p.add_argument("--layer", type=_layer_arg, default="last", help="layer number (1-based), 'all', or a list like 1,6,12 (default: last)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: PyTorch's choice)")
    p.add_argument("midi", nargs="+", help="MIDI files or folders holding them")
    args = p.parse_args(argv)
    # torch and the model are imported here, not at the top, so that --help answers at once
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from musicbert.api import ModelLoadError, load
    from musicbert.inference import InferenceError

    paths = expand_paths(args.midi)
    if not paths:
        print("error: no MIDI files found in the given folders", file=sys.stderr)
        return 1
    try:
        enc = load(args.checkpoint, device=args.device)
        layer = None if args.layer == "last" else args.layer
        layers, _ = enc.resolve_layers(layer)
        results, rejected = enc.embed_midis(paths, layer, progress=True)
    except (ModelLoadError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in rejected:
        print(f"skipped {r.message} [{r.reason}]", file=sys.stderr)
    if not results:
        print(f"error: none of the {len(paths)} files could be embedded (see above); {args.out} not written", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(out, results, rejected, layers)
    n_bars = sum(r.n_bars for r in results)
    print(f"embedded {len(results)} of {len(paths)} files ({n_bars} bars, layers {layers}) -> {out}"
          + (f"; {len(rejected)} skipped (see above)" if rejected else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
