"""Bar embeddings from a model: the device, the layers, the batches (SPEC §6 "Features").

The bar embedding of layer ``i`` (1-based) is the hidden state of the bar's first token
(``Bar_0``) after block ``i``, for the unmasked bar, with the model in eval mode
(:func:`encode_bars`). Bars are packed several to a row, which the model keeps apart, so a
bar's embedding does not depend, beyond float rounding, on what it is batched with. A bar
longer than the model's ``max_len`` is cut to its first ``max_len - 1`` tokens plus
``<eob>`` (:func:`fit_bar`).

Used by the Python API (:mod:`musicbert.api`) and the probes (:mod:`musicbert.probes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from musicbert.feature_store import FeatureStore
from musicbert.model import unwrap
from musicbert.packing import pack_bars
from musicbert.vocab import VOCAB


class InferenceError(ValueError):
    """The model cannot be run as asked (bad layer list, device or precision); the message says why."""


def parse_layers(spec: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """``"all"`` / ``None`` -> 1..n_layers; ``"last"``; ``"1,6,12"``; an int or a list of ints (1-based)."""
    if spec is None or spec == "all":
        return list(range(1, n_layers + 1))
    if spec == "last":
        return [n_layers]
    if isinstance(spec, str):
        try:
            layers = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise InferenceError(f"layers {spec!r}: expected 'all', 'last' or comma-separated layer numbers like 1,6,12") from None
    elif isinstance(spec, int):
        layers = [spec]
    else:
        layers = [int(x) for x in spec]
    if not layers:
        raise InferenceError("no layers chosen")
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if bad:
        raise InferenceError(f"layer(s) {bad} out of range: this model has layers 1..{n_layers}")
    return sorted(set(layers))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"`` -> CUDA when there is a device, else CPU; a named device must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError("device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InferenceError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


PRECISIONS = ("auto", "fp32", "bf16")
CPU_BATCH_TOKENS = 16384  # tokens per forward on CPU: larger batches are no faster there
MAX_GPU_BATCH_TOKENS = 262144  # GPU throughput is saturated well before this
GPU_MEMORY_SHARE = 0.5  # share of the free GPU memory a batch's activations may take


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on a CUDA device that has bf16, fp32 elsewhere (always fp32 on CPU)."""
    if precision not in PRECISIONS:
        raise InferenceError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)  # not V100/T4's emulation
    return "bf16" if native else "fp32"


def auto_batch_tokens(model: torch.nn.Module, device: torch.device, precision: str) -> int:
    """Tokens per forward for inference: :data:`CPU_BATCH_TOKENS` on CPU; on CUDA as many as
    :data:`GPU_MEMORY_SHARE` of the free memory holds, from an upper bound of the activations
    one token needs at once (feed-forward hidden, a few ``dim``-wide tensors, a row of
    attention scores per head, its bar state after every layer were it a bar's first token),
    capped at :data:`MAX_GPU_BATCH_TOKENS`."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    cfg = unwrap(model).cfg
    element = 2 if precision == "bf16" else 4
    per_token = element * (cfg.ff_dim + 8 * cfg.dim + cfg.n_heads * cfg.max_len + cfg.n_layers * cfg.dim)
    free, _ = torch.cuda.mem_get_info(device)
    tokens = int(free * GPU_MEMORY_SHARE // per_token)
    return max(CPU_BATCH_TOKENS, min(MAX_GPU_BATCH_TOKENS, tokens))


def fit_bar(bar: np.ndarray, max_len: int) -> np.ndarray:
    """The bar as int64 ids, cut to its first ``max_len - 1`` tokens plus ``<eob>`` when longer than ``max_len``."""
    bar = np.asarray(bar, dtype=np.int64)
    if len(bar) > max_len:
        bar = np.concatenate([bar[: max_len - 1], [VOCAB.eob_id]])
    return bar


@torch.no_grad()
def encode_bars(
    model: torch.nn.Module,
    bars: Sequence[np.ndarray],
    layers: Sequence[int],
    device: str | torch.device | None = None,
    batch_tokens: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "features",
    out: FeatureStore | None = None,
) -> np.ndarray | FeatureStore:
    """Bar embeddings ``float32 [len(layers), len(bars), dim]`` of the given (1-based) layers,
    as an array, or written into ``out`` (a :class:`FeatureStore` of that shape, returned).

    Bars are packed into rows of ``model.cfg.max_len`` tokens, ``batch_tokens`` tokens per
    forward (None: :func:`auto_batch_tokens`). ``precision`` is ``fp32``, ``bf16`` (autocast)
    or ``auto`` (:func:`resolve_precision`). The model is put in eval mode for the call and
    given back in its previous mode (and on its previous device).
    """
    model = unwrap(model)
    device = resolve_device(device)
    cfg = model.cfg
    precision = resolve_precision(precision, device)
    if batch_tokens is None:
        batch_tokens = auto_batch_tokens(model, device, precision)
    layer_idx = torch.tensor([l - 1 for l in layers], dtype=torch.long)
    if out is None:
        features = np.zeros((len(layers), len(bars), cfg.dim), dtype=np.float32)
    elif (out.n_layers, out.n_bars, out.dim) != (len(layers), len(bars), cfg.dim):
        raise InferenceError(f"feature store of shape {(out.n_layers, out.n_bars, out.dim)} for {(len(layers), len(bars), cfg.dim)}")
    if not bars:
        return features if out is None else out
    lengths = [min(len(b), cfg.max_len) for b in bars]  # fit_bar's length; bars are fitted batch by batch
    row_len = max(lengths)
    batches = pack_bars(lengths, row_len, max(1, batch_tokens // row_len))
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    with _eval_on(model, device), tqdm(total=len(bars), desc=desc, unit="bar", dynamic_ncols=True, disable=not progress) as bar_progress:
        for rows in batches:
            tokens, segments, order = _pack_rows(bars, lengths, rows, row_len, cfg.max_len)
            with autocast:
                states = model(torch.from_numpy(tokens).to(device), torch.from_numpy(segments).to(device)).bar_states
            chosen = states.index_select(0, layer_idx.to(states.device)).float().cpu().numpy()
            if out is None:
                features[:, order] = chosen
            else:
                out.write(order, chosen)
            bar_progress.update(len(order))
    return features if out is None else out


def _pack_rows(
    bars: Sequence[np.ndarray], lengths: list[int], rows: list[list[int]], row_len: int, max_len: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One batch: token ids and segment ids (bar ``s`` of a row is segment ``s``, from 1;
    padding 0) of ``rows`` (lists of bar indices), and the bar indices in row order."""
    tokens = np.full((len(rows), row_len), VOCAB.pad_id, dtype=np.int64)
    segments = np.zeros((len(rows), row_len), dtype=np.int64)
    order: list[int] = []
    for r, members in enumerate(rows):
        col = 0
        for s, i in enumerate(members, start=1):
            n = lengths[i]
            tokens[r, col : col + n] = fit_bar(bars[i], max_len)
            segments[r, col : col + n] = s
            col += n
        order.extend(members)
    return tokens, segments, order


@contextlib.contextmanager
def _eval_on(model: torch.nn.Module, device: torch.device):
    """The model in eval mode on ``device`` for the block, then back in its previous mode and on its previous device."""
    was_training = model.training
    old_device = next(model.parameters()).device
    model.eval()
    model.to(device)
    try:
        yield
    finally:
        model.to(old_device)
        model.train(was_training)
