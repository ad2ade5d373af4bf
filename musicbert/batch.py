"""The batch one rank feeds the model in one step: bars packed end to end into rows.

Packing is what lets training skip padding: a row of length ``L`` holds several bars,
attention is kept inside each bar (``segments``), and positions restart at 0 for every
bar. A batch with one bar per row and ``<pad>`` after it is the unpacked special case.

Bars are numbered in row-major order of their first token (the ``Bar_0`` token):
the model returns bar states in that order and ``pair_anchor`` / ``pair_positive`` index it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [R, L]: input ids (masked view where masked), <pad> after the last bar
    segments: torch.Tensor  # int64 [R, L]: 1..k numbers the bars of a row, 0 on padding
    mlm_mask: torch.Tensor  # bool [R, L]: positions whose original token is to be predicted
    mlm_targets: torch.Tensor  # int64 [M]: original ids at mlm_mask, row-major order (M = mlm_mask.sum())
    pair_anchor: torch.Tensor  # int64 [P]: bar index of each pair's masked anchor (P = 0 in mode BERT)
    pair_positive: torch.Tensor  # int64 [P]: bar index of each pair's positive view

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def n_bars(self) -> int:
        return int(self.bar_starts().shape[0])

    @property
    def n_real_tokens(self) -> int:
        return int((self.segments > 0).sum())

    @property
    def padding_efficiency(self) -> float:
        """Share of computed positions that hold real tokens."""
        return self.n_real_tokens / max(1, self.segments.numel())

    def bar_starts(self) -> torch.Tensor:
        """``[n_bars, 2]`` (row, column) of each bar's first token, in bar order."""
        return torch.nonzero(bar_start_mask(self.segments))


def bar_start_mask(segments: torch.Tensor) -> torch.Tensor:
    """bool ``[R, L]``: True at the first token of every bar of a packed ``segments`` ``[R, L]``.

    The one place that finds bar starts: bar order (:meth:`Batch.bar_starts`), the model's
    positions and bar states, and the attention work of a batch all derive from it.
    """
    prev = F.pad(segments[:, :-1], (1, 0), value=0)
    return (segments > 0) & (segments != prev)


def bar_lengths(segments: torch.Tensor) -> torch.Tensor:
    """int64 ``[n_bars]``: the number of tokens of each bar, in bar order."""
    starts = torch.nonzero(bar_start_mask(segments).reshape(-1)).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([segments.numel()])])
    real_before = F.pad(torch.cumsum((segments.reshape(-1) > 0).long(), 0), (1, 0))
    return real_before[ends] - real_before[starts]


# One tensor per batch between processes: DataLoader shares every tensor through its own
# shared-memory segment and socket message, which costs more than making the batch.
_HEADER = 4  # int64 words: R, L, M, P


def batch_to_buffer(batch: Batch) -> torch.Tensor:
    """All of ``batch`` in one uint8 tensor (see :func:`batch_from_buffer`)."""
    R, L = batch.tokens.shape
    M, P = batch.mlm_targets.shape[0], batch.pair_anchor.shape[0]
    words = np.concatenate(  # NumPy: torch.cat is ~100x slower on these small mixed views
        [
            np.array([R, L, M, P], dtype=np.int64),
            batch.tokens.numpy().reshape(-1),
            batch.segments.numpy().reshape(-1),
            batch.mlm_targets.numpy(),
            batch.pair_anchor.numpy(),
            batch.pair_positive.numpy(),
        ]
    )
    return torch.from_numpy(np.concatenate([words.view(np.uint8), batch.mlm_mask.numpy().reshape(-1).view(np.uint8)]))


def batch_from_buffer(buf: torch.Tensor) -> Batch:
    """The batch packed by :func:`batch_to_buffer`; its fields are views of ``buf`` (pinned if it is)."""
    R, L, M, P = (int(x) for x in buf[: 8 * _HEADER].view(torch.int64))
    n_words = _HEADER + 2 * R * L + M + 2 * P
    words = buf[: 8 * n_words].view(torch.int64)
    cuts = np.cumsum([_HEADER, R * L, R * L, M, P, P]).tolist()
    return Batch(
        tokens=words[cuts[0] : cuts[1]].view(R, L),
        segments=words[cuts[1] : cuts[2]].view(R, L),
        mlm_mask=buf[8 * n_words : 8 * n_words + R * L].view(torch.bool).view(R, L),
        mlm_targets=words[cuts[2] : cuts[3]],
        pair_anchor=words[cuts[3] : cuts[4]],
        pair_positive=words[cuts[4] : cuts[5]],
    )
